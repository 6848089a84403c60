"""LoRA students: one network in memory, only adapters train, exported weights load in diffusers."""

import copy

import pytest
import torch

from diffusers_tiny import text_cond, unet2d, unet2d_condition, vae
from fewstep.errors import FewstepError
from fewstep.export import export_diffusers
from fewstep.export.lora import export_lora
from fewstep.teachers import load_teacher
from fewstep.teachers.diffusers import DiffusersDenoiser
from fewstep.teachers.diffusers.lora import LoRAStudent, LoRATeacher
from fewstep.teachers.diffusers.students import lcm_sample

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def train_adapters(student, seed=0):
    """Stand in for training: give the adapters non-zero values (B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def sd_folder(tmp_path):
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet2d_condition(),
        scheduler=diffusers.DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def test_one_network_in_memory_and_only_adapters_learn():
    base = DiffusersDenoiser(unet2d(num_class_embeds=11), diffusers.DDPMScheduler())
    original = copy.deepcopy(base)
    teacher = LoRATeacher(base, rank=4)
    student = teacher.consistency_student()
    assert isinstance(student, LoRAStudent) and student.model is teacher.model  # shared, not copied
    assert list(teacher.parameters()) == []  # the network belongs to the student
    n_base = sum(p.numel() for p in original.parameters())
    n_all = sum(p.numel() for p in {id(p): p for p in student.model.parameters()}.values())
    n_lora = sum(p.numel() for p in student.parameters())
    assert n_all == n_base + n_lora and 0 < n_lora < n_base
    assert all("lora_" in k for k in student.state_dict()) and len(student.state_dict()) == len(
        list(student.parameters())
    )
    train_adapters(student)
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 30.0]), torch.tensor([2, 10])
    with torch.no_grad():
        assert torch.allclose(teacher(x, s, y), original(x, s, y), atol=1e-6)  # adapters off = the base model
    out = student(x, s, y)
    with torch.no_grad():
        teacher(x, s, y)  # a teacher call between forward and backward must not break the student's graph
    out.square().mean().backward()
    lora = [p for n, p in student.model.named_parameters() if "lora_" in n]
    frozen = [p for n, p in student.model.named_parameters() if "lora_" not in n]
    assert all(p.requires_grad and p.grad is not None for p in lora)
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    # the student differs from the teacher's own LCM student once the adapters moved
    from fewstep.teachers.diffusers.students import LCMStudent

    with torch.no_grad():
        assert (student(x, s, y) - LCMStudent(original)(x, s, y)).abs().max() > 1e-4


def test_state_dict_round_trip_and_mismatch():
    teacher = LoRATeacher(DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler()), rank=2)
    student = teacher.trainable_copy()
    train_adapters(student)
    other = LoRATeacher(DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler()), rank=2).trainable_copy()
    other.load_state_dict(student.state_dict())
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 9.0])
    with torch.no_grad():
        assert torch.allclose(other(x, s), student(x, s))
    with pytest.raises(FewstepError, match="do not match this student's adapters"):
        LoRATeacher(DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler()), rank=3).trainable_copy().load_state_dict(
            {k + "x": v for k, v in student.state_dict().items()}
        )


def test_lora_export_loads_with_load_lora_weights(tmp_path):
    folder = sd_folder(tmp_path)
    teacher = load_teacher(f"lora:4:{folder}")
    assert isinstance(teacher, LoRATeacher) and teacher.rank == 4
    student = teacher.consistency_student()
    train_adapters(student)
    out = export_lora(student, tmp_path / "lora", teacher=teacher, steps=4, info={"teacher": str(folder)})
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "scheduler").is_dir()
    assert "load_lora_weights" in (out / "README.md").read_text()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    cond, t = text_cond(2), torch.tensor([500, 20])
    x_t = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        before = pipe.unet(x_t, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        pipe.load_lora_weights(str(out))
        after = pipe.unet(x_t, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        mine = student.model(x_t, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        base = teacher.base.network(x_t, t.float(), cond)  # adapters on here: the student's network
    assert torch.allclose(after, mine, atol=1e-5), (after - mine).abs().max()
    assert torch.allclose(base, mine, atol=1e-5)
    assert (after - before).abs().max() > 1e-3  # the LoRA changes the network
    # sampled as LCM-LoRA is: LCMScheduler, guidance_scale=1 (no second pass)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(prompt_embeds=cond.encoder_hidden_states, num_inference_steps=2, guidance_scale=1.0,
                  generator=gens, output_type="pt").images  # fmt: skip
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        ref = teacher.decode(lcm_sample(student.student, gens, 2, cond))
    assert torch.allclose(images, (ref / 2 + 0.5).clamp(0, 1), atol=2e-4)


def test_unet2d_lora_exports_merged(tmp_path):
    teacher = LoRATeacher(DiffusersDenoiser(unet2d(num_class_embeds=11), diffusers.DDPMScheduler()), rank=2)
    student = teacher.consistency_student()
    train_adapters(student)
    with pytest.raises(FewstepError, match="no LoRA loader for UNet2DModel.*--format diffusers"):
        export_lora(student, tmp_path / "l", teacher=teacher)
    out = export_diffusers(student, tmp_path / "merged", teacher=teacher, steps=2)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    images = pipe(batch_size=2, class_labels=[4, 10], num_inference_steps=2, generator=gens(), output_type="pt").images
    with torch.no_grad():
        ref = lcm_sample(student.student, gens(), 2, torch.tensor([4, 10]))
    assert torch.allclose(images, (ref / 2 + 0.5).clamp(0, 1), atol=2e-4)
    with pytest.raises(FewstepError, match="cannot add LCM's guidance input"):
        teacher.consistency_student(extra_dims=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cd", "perflow"])  # perflow: the paper's plug-and-play LoRA accelerator
def test_engine_trains_only_the_adapters(tmp_path, name):
    from fewstep.train import distill, load_run

    diffusers.DDPMPipeline(unet=unet2d(num_class_embeds=11), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        tmp_path / "teacher"
    )
    before = DiffusersDenoiser(unet2d(num_class_embeds=11), diffusers.DDPMScheduler()).model.state_dict()
    method = distill(f"lora:4:{tmp_path / 'teacher'}", name, max_steps=2, out=tmp_path / "run", data="digits",
                     batch=8, sample_n=0, options={"lr": 1e-2})  # fmt: skip
    assert isinstance(method.student, LoRAStudent)
    assert all("lora_" in k for k in method.student.state_dict())
    base = {k.replace("base_layer.", ""): v for k, v in method.student.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in before.items())  # the frozen weights never moved
    assert any(v.abs().max() > 0 for k, v in method.student.state_dict().items() if "lora_B" in k)  # adapters did
    again = load_run(tmp_path / "run")
    for k, v in method.student.state_dict().items():
        assert torch.equal(again.student.state_dict()[k], v)
