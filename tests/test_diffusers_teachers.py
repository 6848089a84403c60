"""Diffusers teachers: the adapter agrees with the diffusers schedulers' own formulas and loops."""

import json

import pytest
import torch

from diffusers_tiny import sd3_transformer, text_cond, unet2d, unet2d_condition, vae
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.solvers import euler
from fewstep.teachers import load_teacher
from fewstep.teachers.diffusers import DiffusersDenoiser, TextConditioning, load_diffusers, save_uncond

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def ddim(prediction="epsilon", **kw):
    return diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False, **kw)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_x0_matches_scheduler_formula(prediction):
    unet = unet2d(num_class_embeds=11).double()
    sched = ddim(prediction)
    sched.set_timesteps(10)
    den = DiffusersDenoiser(unet, sched)
    assert den.num_classes == 10 and den.sample_shape == (1, 8, 8)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 7, 10])  # 10 is the null class
    for t in (900, 400, 0):
        ts = torch.full((3,), t)
        x_t = sched.add_noise(x0, eps, ts)
        with torch.no_grad():
            out = unet(x_t, ts, class_labels=labels).sample
            ref = sched.step(out, t, x_t).pred_original_sample
            abar = sched.alphas_cumprod[t].double()
            sigma = ((1 - abar) / abar).sqrt()
            mine = den(x_t / abar.sqrt(), sigma.expand(3), labels)
        assert torch.allclose(mine, ref, atol=1e-5, rtol=1e-5), (prediction, t, (mine - ref).abs().max())


@pytest.mark.parametrize("spacing,steps", [("leading", 5), ("trailing", 4)])
def test_euler_equals_ddim_loop(spacing, steps):
    unet = unet2d(num_class_embeds=11).double()
    sched = ddim("epsilon", timestep_spacing=spacing)
    den = DiffusersDenoiser(unet, sched)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([3, 5])
    w = 2.5
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:  # diffusers' loop with classifier-free guidance on eps
            e_c = unet(x, t, class_labels=labels).sample
            e_u = unet(x, t, class_labels=torch.full_like(labels, 10)).sample
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    sigmas = den.scheduler_sigmas(steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    mine = euler(cfg(den, w), den.start(noise, sigmas[0]), sigmas, labels)
    assert torch.allclose(mine, x, atol=1e-6), (mine - x).abs().max()


def test_flow_x0_and_euler_match_flowmatch_scheduler():
    net = sd3_transformer().double()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    den = DiffusersDenoiser(net, sched, sigma_max=1e7)
    cond = text_cond(2, pooled=6).to(dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x0, noise = (
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.7, 0.2], dtype=torch.float64)
    x_t = t[:, None, None, None] * noise + (1 - t[:, None, None, None]) * x0  # FlowMatch's forward process
    with torch.no_grad():
        v = net(
            hidden_states=x_t,
            encoder_hidden_states=cond.encoder_hidden_states,
            pooled_projections=cond.pooled,
            timestep=t * 1000,
        ).sample
        mine = den(x_t / (1 - t[:, None, None, None]), t / (1 - t), cond)
    assert torch.allclose(mine, x_t - t[:, None, None, None] * v, atol=1e-10)
    # the scheduler's Euler loop from t = 1 (fewstep starts at sigma_max = 1e7, i.e. t = 1 - 1e-7)
    for kwargs in ({}, {"sigmas": [0.9, 0.6, 0.3, 0.1]}):
        sched.set_timesteps(4, **kwargs)
        x = noise.clone()
        with torch.no_grad():
            for ts in sched.timesteps:
                out = net(
                    hidden_states=x,
                    encoder_hidden_states=cond.encoder_hidden_states,
                    pooled_projections=cond.pooled,
                    timestep=ts.expand(2).double(),
                ).sample
                x = sched.step(out, ts, x).prev_sample
        sigmas = den.scheduler_sigmas(4, **kwargs)
        mine = euler(den, den.start(noise, sigmas[0]), sigmas, cond)
        assert torch.allclose(mine, x, atol=2e-5), (kwargs, (mine - x).abs().max())


def test_sdxl_unet_text_conditioning_guidance_and_vae():
    unet = unet2d_condition(sdxl=True).double()
    sched = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction")
    ae = vae().double()
    uncond = text_cond(1, sdxl=True, seed=9).to(dtype=torch.float64)
    den = DiffusersDenoiser(unet, sched, vae=ae, uncond=uncond)
    assert den.sample_shape == (4, 8, 8) and den.sigma_data == 1.0
    cond = text_cond(2, sdxl=True).to(dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = 600
    abar = sched.alphas_cumprod[t].double()
    sigma, x_t = ((1 - abar) / abar).sqrt(), x * abar.sqrt()
    w = 4.0

    def v_of(c):
        added = {"text_embeds": c.pooled, "time_ids": c.time_ids}
        return unet(x_t, torch.tensor(t), encoder_hidden_states=c.encoder_hidden_states, added_cond_kwargs=added).sample

    with torch.no_grad():
        v = v_of(cond.expand(2))
        v = v_of(uncond.expand(2)) + w * (v - v_of(uncond.expand(2)))
        ref = abar.sqrt() * x_t - (1 - abar).sqrt() * v  # v-prediction -> x0
        mine = cfg(den, w)(x, sigma.expand(2), cond)
        assert torch.allclose(mine, ref, atol=1e-5), (mine - ref).abs().max()
        # cond=None is the unconditional embedding
        assert torch.allclose(den(x, sigma.expand(2)), den(x, sigma.expand(2), uncond), atol=0)
        # the VAE: encode/decode scale latents as the pipelines do
        img = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
        lat = den.encode(img)
        assert torch.allclose(lat, ae.encode(img).latent_dist.mode() * ae.config.scaling_factor)
        assert torch.allclose(den.decode(lat), ae.decode(lat / ae.config.scaling_factor).sample)


def test_bad_conditioning_is_named():
    den = DiffusersDenoiser(unet2d_condition(sdxl=True), diffusers.DDPMScheduler())
    x, s = torch.randn(2, 4, 8, 8), torch.full((2,), 3.0)
    with pytest.raises(
        FewstepError, match=r"encoder_hidden_states has shape \(2, 5, 10\).*expects \(batch, tokens, 12\)"
    ):
        den(x, s, TextConditioning(torch.randn(2, 5, 10), torch.randn(2, 6), torch.randn(2, 6)))
    with pytest.raises(FewstepError, match="time_ids conditioning is missing"):
        den(x, s, TextConditioning(torch.randn(2, 5, 12), torch.randn(2, 6)))
    with pytest.raises(FewstepError, match="holds 3 prompts for a batch of 2"):
        den(x, s, text_cond(3, sdxl=True))
    with pytest.raises(FewstepError, match="needs cond=TextConditioning"):
        den(x, s)
    with pytest.raises(FewstepError, match="unconditional embedding"):
        cfg(den, 3.0)
    labelled = DiffusersDenoiser(unet2d(num_class_embeds=11), diffusers.DDPMScheduler())
    with pytest.raises(FewstepError, match=r"integer tensor of shape \(2,\)"):
        labelled(torch.randn(2, 1, 8, 8), s, torch.tensor([[1], [2]]))
    with pytest.raises(FewstepError, match="unconditional; pass cond=None"):
        DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler())(torch.randn(2, 1, 8, 8), s, torch.tensor([1, 2]))


def test_bad_schedulers_are_named():
    with pytest.raises(FewstepError, match="prediction_type 'flow_prediction'.*epsilon, v_prediction, sample"):
        DiffusersDenoiser(unet2d(), diffusers.DDPMScheduler(prediction_type="flow_prediction"))
    with pytest.raises(FewstepError, match="scheduler CMStochasticIterativeScheduler is not supported"):
        DiffusersDenoiser(unet2d(), diffusers.CMStochasticIterativeScheduler())
    with pytest.raises(FewstepError, match="use_dynamic_shifting"):
        DiffusersDenoiser(sd3_transformer(), diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_load_teacher_recognises_pipeline_and_model_folders(tmp_path):
    unet, sched = unet2d(num_class_embeds=11), diffusers.DDPMScheduler(prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 20.0]), torch.tensor([1, 10])
    ref = DiffusersDenoiser(unet, sched)(x, s, y)
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):  # pipeline, and bare model + ../scheduler
        den = load_teacher(folder)
        assert isinstance(den, DiffusersDenoiser) and den.formulation.prediction == "v_prediction"
        assert not any(p.requires_grad for p in den.parameters())
        assert torch.allclose(den(x, s, y), ref, atol=1e-6)


def test_latent_pipeline_folder_with_vae_and_uncond(tmp_path):
    unet, ae = unet2d_condition(), vae()
    pipe = diffusers.StableDiffusionPipeline(
        vae=ae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    save_uncond(tmp_path / "sd", text_cond(1, seed=3))
    den = load_teacher(tmp_path / "sd")
    assert den.vae is not None and den.uncond is not None
    x = torch.randn(2, 4, 8, 8)
    assert cfg(den, 2.0)(x, torch.full((2,), 5.0), text_cond(2)).shape == x.shape
    # the same model without its VAE is refused, naming the fix
    import shutil

    shutil.rmtree(tmp_path / "sd" / "vae")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index["vae"] = [None, None]
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FewstepError, match="latent model but no vae/ folder"):
        load_teacher(tmp_path / "sd")
    assert load_diffusers(tmp_path / "sd", vae=False).vae is None


def test_not_a_diffusers_folder_and_pickles_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FewstepError, match="no config.json or model_index.json"):
        load_teacher(tmp_path / "a")
    with pytest.raises(FewstepError, match="not a diffusers folder"):
        load_diffusers(tmp_path / "a")
    unet2d().save_pretrained(tmp_path / "m" / "unet", safe_serialization=False)
    (tmp_path / "m" / "unet" / "scheduler_config.json").write_text(json.dumps(dict(diffusers.DDPMScheduler().config)))
    with pytest.raises(FewstepError, match="no .safetensors weights.*pickle"):
        load_teacher(tmp_path / "m" / "unet")
    (tmp_path / "n").mkdir()
    unet2d().save_pretrained(tmp_path / "n")
    with pytest.raises(FewstepError, match="no scheduler config"):
        load_teacher(tmp_path / "n")
