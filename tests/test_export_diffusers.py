"""Exported students load in stock diffusers and sample the same images as fewstep's samplers."""

import pytest
import torch

from diffusers_tiny import sd3_transformer, text_cond, unet2d, unet2d_condition, vae
from fewstep.errors import FewstepError
from fewstep.export import export_diffusers, read_export
from fewstep.export.diffusers import sampler_sigmas
from fewstep.solvers import euler, sample
from fewstep.teachers.diffusers import DiffusersDenoiser
from fewstep.teachers.diffusers.students import LCMStudent, guidance_scale_embedding, lcm_sample, ode_student

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def perturb(module, scale=0.02, seed=0):
    """Stand in for training: move every weight, so the student differs from its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def to_image(x):
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_lcm_student_exports_to_consistency_pipeline(tmp_path, prediction):
    teacher = DiffusersDenoiser(unet2d(num_class_embeds=11), diffusers.DDPMScheduler(prediction_type=prediction))
    student = perturb(LCMStudent(teacher)).eval()
    out = export_diffusers(
        student, tmp_path / "out", teacher=teacher, steps=2, info={"teacher": "tiny", "method": "lcm"}
    )
    assert {"model_index.json", "unet", "scheduler", "README.md"} <= {p.name for p in out.iterdir()}
    assert list((out / "unet").glob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert (
        "teacher: tiny" in card and "method: lcm" in card and "LCMScheduler" in card and "label 10 is the null" in card
    )
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ConsistencyModelPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    labels = [1, 5, 10]
    for steps in (1, 2, 4):
        images = pipe(batch_size=3, class_labels=labels, num_inference_steps=steps, generator=gens(3), output_type="pt")
        mine = to_image(lcm_sample(student, gens(3), steps, torch.tensor(labels)))
        assert torch.allclose(images.images, mine, atol=2e-4), (steps, (images.images - mine).abs().max())
    # the student is not the teacher: exporting the teacher's weights would give other images
    other = pipe(batch_size=3, class_labels=labels, num_inference_steps=1, generator=gens(3), output_type="pt")
    teacher_x = to_image(lcm_sample(LCMStudent(teacher).eval(), gens(3), 1, torch.tensor(labels)))
    assert (other.images - teacher_x).abs().max() > 1e-2


def test_ode_student_exports_with_euler_trailing(tmp_path):
    teacher = DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler(prediction_type="v_prediction"))
    student = perturb(ode_student(teacher)).eval()
    out = export_diffusers(student, tmp_path / "ode", teacher=teacher, steps=4)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    for steps in (1, 4):
        images = pipe(batch_size=2, num_inference_steps=steps, generator=gens(2), output_type="pt").images
        noise = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in gens(2)])
        sigmas = sampler_sigmas(student, steps)
        # Euler with trailing spacing starts at sigma_max * z, exactly as fewstep's solvers do
        mine, nfe = sample(student, noise, "euler", steps, sigmas=sigmas)
        assert nfe == steps
        assert torch.allclose(images, to_image(mine), atol=1e-5), (steps, (images - to_image(mine)).abs().max())


def test_guidance_embedded_latent_student_exports_to_stable_diffusion(tmp_path):
    ae = vae()
    teacher = DiffusersDenoiser(unet2d_condition(), diffusers.DDPMScheduler(), vae=ae, uncond=text_cond(1, seed=5))
    student = perturb(LCMStudent(teacher, guidance_embed_dim=8), seed=1).eval()
    assert student.model.config.time_cond_proj_dim == 8
    out = export_diffusers(student, tmp_path / "sd", teacher=teacher, steps=4, guidance=6.0)
    facts = read_export(out)
    assert facts["guidance_embedded"] and facts["pipeline"] == "StableDiffusionPipeline"
    assert "guidance_scale=6.0" in (out / "README.md").read_text()
    # the tiny teacher has no text encoder: diffusers wants that said when loading
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and type(pipe.scheduler).__name__ == "LCMScheduler"
    w = torch.tensor([5.0, 1.0])
    assert torch.allclose(pipe.get_guidance_scale_embedding(w, 8), guidance_scale_embedding(w, 8))
    cond = text_cond(2)
    for steps, gs in ((1, 6.0), (4, 6.0), (2, 3.0)):
        images = pipe(
            prompt_embeds=cond.encoder_hidden_states,
            num_inference_steps=steps,
            guidance_scale=gs,
            generator=gens(2),
            output_type="pt",
        ).images
        mine = to_image(teacher.decode(lcm_sample(student, gens(2), steps, cond, guidance=gs)))
        assert torch.allclose(images, mine, atol=2e-4), (steps, (images - mine).abs().max())
    # w really is an input: another guidance scale gives other images
    other = pipe(
        prompt_embeds=cond.encoder_hidden_states,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=gens(2),
        output_type="pt",
    ).images
    assert (other - images).abs().max() > 1e-3


def test_lcm_student_starts_as_teacher_x0():
    teacher = DiffusersDenoiser(unet2d_condition(), diffusers.DDPMScheduler(), vae=vae())
    student = LCMStudent(teacher, guidance_embed_dim=8)
    x, s, cond = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 40.0]), text_cond(2)
    with torch.no_grad():
        x0_t, x_t, _, t = teacher.native_x0(x, s, cond)
        c_skip = 0.25 / ((10 * t) ** 2 + 0.25)
        ref = c_skip[:, None, None, None] * x_t + (1 - c_skip)[:, None, None, None].sqrt() * x0_t
        assert torch.allclose(student(x, s, cond, extra=torch.tensor([[4.0], [9.0]])), ref, atol=1e-5)
    with pytest.raises(FewstepError, match="embeds the guidance scale; pass extra"):
        student(x, s, cond)
    with pytest.raises(FewstepError, match="has no guidance input"):
        LCMStudent(DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler()), guidance_embed_dim=8)


def test_flow_student_exports_to_sd3(tmp_path):
    teacher = DiffusersDenoiser(
        sd3_transformer(),
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.1),
        sigma_max=1e6,
    )
    student = perturb(ode_student(teacher)).eval()
    out = export_diffusers(student, tmp_path / "sd3", teacher=teacher, steps=4)
    none = {
        k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    }
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), **none)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    cond = text_cond(2, pooled=6)
    images = pipe(
        prompt_embeds=cond.encoder_hidden_states,
        pooled_prompt_embeds=cond.pooled,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=gens(2),
        output_type="pt",
        height=16,
        width=16,
    ).images
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens(2)])
    sigmas = sampler_sigmas(student, 4)
    with torch.no_grad():
        mine = to_image(teacher.decode(euler(student, student.start(noise, sigmas[0]), sigmas, cond)))
    assert torch.allclose(images, mine, atol=2e-4), (images - mine).abs().max()


def test_export_refuses_native_students_and_existing_folders(tmp_path):
    from fewstep.denoiser import EDMDenoiser
    from fewstep.networks.unet import UNet, UNetConfig
    from fewstep.students import ConsistencyStudent

    native = ConsistencyStudent(EDMDenoiser(UNet(UNetConfig(channels=8, channel_mult=(1,), blocks=1)), (1, 8, 8)))
    with pytest.raises(
        FewstepError, match="cannot be exported as a stock diffusers pipeline.*distil a diffusers teacher"
    ):
        export_diffusers(native, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    teacher = DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler())
    with pytest.raises(FewstepError, match="already exists"):
        export_diffusers(ode_student(teacher), tmp_path / "full")
    assert (tmp_path / "full" / "f").read_text() == "x"


def test_sdxl_student_exports_with_added_conditions(tmp_path):
    teacher = DiffusersDenoiser(unet2d_condition(sdxl=True), diffusers.DDPMScheduler(), vae=vae())
    student = perturb(LCMStudent(teacher, guidance_embed_dim=8), seed=2).eval()
    out = export_diffusers(student, tmp_path / "sdxl", teacher=teacher, steps=2, guidance=3.0)
    none = {k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), **none)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    cond = text_cond(2, sdxl=True)
    # SDXL's micro-conditioning: (original size, crop corner, target size) of a 16x16 image
    cond.time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(2, 6)
    images = pipe(
        prompt_embeds=cond.encoder_hidden_states,
        pooled_prompt_embeds=cond.pooled,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=gens(2),
        output_type="pt",
    ).images
    mine = to_image(teacher.decode(lcm_sample(student, gens(2), 2, cond, guidance=3.0)))
    assert torch.allclose(images, mine, atol=2e-4), (images - mine).abs().max()
