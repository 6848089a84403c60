"""Students that are not teacher copies (issue 19): smaller networks with the compress warm-up,
default networks for analytic teachers, network objects, and LoRA on fewstep's own networks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine_helpers import tiny_data, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.methods import available, get_method
from fewstep.networks.mlp import MLP, MLPConfig
from fewstep.runs.folder import run_cost
from fewstep.students import (
    ConsistencyStudent,
    OneStepGenerator,
    add_lora,
    lora_rank,
    merge_lora,
    student_network,
)
from fewstep.teachers import load_teacher
from fewstep.teachers.native import build_model
from fewstep.train import distill, load_run

FAST = {"batch": 8, "sample_n": 0, "cpu": True, "checkpoint_every": 1000}


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def unet_teacher(channels: int = 16):
    torch.manual_seed(0)
    net = {"resolution": 8, "in_channels": 1, "channels": channels, "channel_mult": [1, 2], "blocks": 1,
           "attn_resolutions": [], "num_classes": 3}  # fmt: skip
    t = build_model("unet", net, {"sample_shape": [1, 8, 8], "num_classes": 3})
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.05)
    return t.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from fewstep.teachers.native import save_model

    return str(save_model(tiny_teacher(hidden=64), tmp_path_factory.mktemp("students") / "teacher"))


# --- networks --------------------------------------------------------------------------------------
def test_presets_scale_the_teachers_width_to_the_parameter_fraction():
    t = load_teacher("builtin:digits")
    full = count(t)
    for name, fraction in (("half", 0.5), ("quarter", 0.25)):
        s = student_network(t, name)
        assert abs(count(s) / full - fraction) < 0.05, (name, count(s), full)
        assert s.net.config.channel_mult == t.net.config.channel_mult and s.net.config.blocks == t.net.config.blocks
        assert (s.sigma_max, s.sigma_data, s.num_classes, s.sample_shape) == (
            t.sigma_max, t.sigma_data, t.num_classes, t.sample_shape)  # fmt: skip
        assert s.training and all(p.requires_grad for p in s.parameters())
    assert student_network(t, {"channels": 8}).net.config.channels == 8
    with pytest.raises(FewstepError, match="unknown student network 'tiny'; use a preset"):
        student_network(t, "tiny")
    with pytest.raises(FewstepError, match="unknown unet option 'width'"):
        student_network(t, {"width": 3})


def test_analytic_teachers_get_a_default_network_for_their_shape():
    ring, image = load_teacher("analytic:gaussians8"), load_teacher("analytic:image")
    s = student_network(ring)
    assert isinstance(s.net, MLP) and s.net.config.dim == 2 and s.num_classes == ring.num_classes
    u = student_network(image)
    assert type(u.net).__name__ == "UNet" and u.sample_shape == image.sample_shape
    assert u.sigma_data == pytest.approx(image.sigma_data)
    with pytest.raises(FewstepError, match="presets scale the teacher's network"):
        student_network(ring, "half")


def test_a_network_object_is_wrapped_in_edm_preconditioning():
    ring = load_teacher("analytic:gaussians8")
    net = MLP(MLPConfig(dim=2, hidden=16, depth=1, num_classes=8))
    s = student_network(ring, net)
    assert s.net is not net and s.sigma_data == pytest.approx(ring.sigma_data)
    x, sigma = torch.randn(4, 2), torch.full((4,), 0.5)
    assert s(x, sigma).shape == (4, 2)


# --- compress: the maths ----------------------------------------------------------------------------
def test_compress_terms_vanish_for_a_teacher_copy_and_feature_kd_matches_every_block():
    t = unet_teacher()
    c = get_method("compress")
    m = c(t)  # the default student is a teacher copy: identity projections, zero KD terms
    assert m.matched and all(isinstance(p, nn.Identity) for p in m.projections)
    x0, labels = torch.randn(6, 1, 8, 8) * 0.5, torch.randint(0, 3, (6,))
    sigma, noise = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0]), torch.randn(6, 1, 8, 8)
    terms = m.loss_terms(x0, labels, sigma, noise)
    assert float(terms["out"]) == 0.0 and float(terms["feat"]) == 0.0 and float(terms["task"]) > 0

    small = c(t, student=student_network(t, {"channels": 8}))
    assert small.matched and len(small.projections) == 8  # down 2, middle 2, up 4 ResBlocks
    assert all(isinstance(p, nn.Conv2d) and p.in_channels in (8, 16) for p in small.projections)
    terms = small.loss_terms(x0, labels, sigma, noise)
    x = x0 + sigma[:, None, None, None] * noise
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    d_s, d_t = small.student(x, sigma, labels), t(x, sigma, labels)
    assert float(terms["out"]) == pytest.approx(float((w * (d_s - d_t).pow(2).mean((1, 2, 3))).mean()), rel=1e-5)
    assert float(terms["task"]) == pytest.approx(float((w * (d_s - x0).pow(2).mean((1, 2, 3))).mean()), rel=1e-5)
    loss = terms["task"] + terms["out"] + terms["feat"]
    loss.backward()
    assert all(p.grad is None for p in t.parameters())  # the frozen teacher gets no gradient
    assert all(p.grad is not None for p in small.projections.parameters())
    assert not c(load_teacher("analytic:image"), student=student_network(load_teacher("analytic:image"))).matched


# --- runs ------------------------------------------------------------------------------------------
def test_a_smaller_student_is_warmed_up_by_compress_then_wrapped_by_the_method(teacher_dir, tmp_path):
    out = tmp_path / "cd"
    m = distill(teacher_dir, "cd", max_steps=3, out=out, data=tiny_data(), student_net={"hidden": 16},
                warmup_steps=4, **FAST)  # fmt: skip
    warm = tmp_path / "cd.warmup"
    assert (warm / "student" / "config.json").is_file()
    assert isinstance(m.student, ConsistencyStudent) and m.student.net.net.config.hidden == 16
    config = json.loads((out / "config.json").read_text())
    assert config["init"]["warmup"] and config["init"]["chain"] == ["compress"]
    assert config["student"]["net"]["net"]["hidden"] == 16 and config["student"]["lora_rank"] is None
    assert run_cost(out)["chain"] == ["compress", "cd"] and run_cost(out)["steps"] == 4 + 3
    # the student started from the warm-up's evaluation-EMA network, wrapped in consistency scalings
    warm_net = load_run(warm).student
    again = load_run(out)
    assert isinstance(again.student, ConsistencyStudent) and again.student.net.net.config.hidden == 16
    assert torch.equal(again.student.net.net.out.weight, m.student.net.net.out.weight)
    assert count(again.student) == count(warm_net)
    # the teacher is untouched and frozen
    assert not any(p.requires_grad for p in again.teacher.parameters())
    # resumed, the run keeps its student network; a second run reuses the finished warm-up
    distill(None, resume=True, out=out, max_steps=4, **FAST)
    assert load_run(out).run.step == 4
    with pytest.raises(FewstepError, match=r"the warm-up of the sid student .*needs data"):
        distill(teacher_dir, "sid", max_steps=1, out=tmp_path / "sid", student_net={"hidden": 16}, **FAST)
    assert not (tmp_path / "sid").exists()
    # run again over the same --out: the finished warm-up is reused, not retrained
    before = (warm / "student" / "model.safetensors").stat().st_mtime_ns
    distill(teacher_dir, "cd", max_steps=2, out=out, data=tiny_data(), student_net={"hidden": 16}, warmup_steps=4,
            overwrite=True, **FAST)  # fmt: skip
    assert (warm / "student" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FewstepError, match="is not this run's warm-up"):
        distill(teacher_dir, "cd", max_steps=1, out=out, data=tiny_data(), student_net={"hidden": 8},
                warmup_steps=4, overwrite=True, **FAST)  # fmt: skip


def test_kd_trains_a_smaller_student_from_its_own_start(teacher_dir, tmp_path):
    m = distill(teacher_dir, "kd", max_steps=2, out=tmp_path / "kd", student_net={"hidden": 16}, num_pairs=32,
                solver_steps=2, **FAST)  # fmt: skip
    assert not (tmp_path / "kd.warmup").exists()
    assert isinstance(m.student, OneStepGenerator) and m.student.net.net.config.hidden == 16
    assert load_run(tmp_path / "kd").student.net.net.config.hidden == 16


@pytest.mark.parametrize("name", sorted(set(available()) - {"denoise"}))
def test_every_method_runs_on_an_analytic_image_teacher(name, tmp_path):
    out = tmp_path / name
    opts = {"num_pairs": 16, "solver_steps": 2} if name in ("kd", "dmd", "reflow", "instaflow", "traflow") else {}
    if name in ("progressive", "guided", "lightning"):
        opts.update(start_steps=4, steps_per_round=1)
    if name == "guided":
        opts.update(stage_one_steps=1)
    if name == "tract":
        opts.update(phases=(4, 1), steps_per_phase=1)
    kw = dict(max_steps=2, warmup_steps=2, student_net={"channels": 8}, **{**FAST, "batch": 4})
    if name in ("sida", "dsno"):  # a fake score's UNet encoder / temporal layers in a UNet; a mixture has none
        with pytest.raises(FewstepError, match="UNet|teacher-shaped network only"):
            distill("analytic:image", name, out=out, **kw)
        return
    if name == "tcm":  # a second stage: from an ect run
        opts["init"] = str(distill("analytic:image", "ect", out=tmp_path / "ect", **kw).run.path)
        del kw["student_net"], kw["warmup_steps"]  # the network comes from the ect run
    m = distill("analytic:image", name, out=out, **kw, **opts)
    x = m.sample(torch.randn(2, 1, 8, 8), steps=1 if 1 in m.default_steps else m.default_steps[0],
                 cond=torch.tensor([0, 3]))  # fmt: skip
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert json.loads((out / "config.json").read_text())["student"]["net"]["net"]["channels"] == 8
    load_run(out)


def test_the_cli_distills_and_evaluates_an_analytic_teacher_with_exact_metrics(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "cd"
    args = ["distill", "--teacher", "analytic:gaussians8", "--method", "cd", "--out", str(out), "--max-steps", "3",
            "--warmup-steps", "3", "--batch", "16", "--student-net", '{"hidden": 32, "depth": 2}']  # fmt: skip
    assert main(args) == 0
    assert "warm-up: training the student network with compress" in capsys.readouterr().out
    assert main(["eval", str(out), "--n", "500", "--seeds", "1", "--baselines", "euler", "--baseline-nfe", "1",
                 "--fidelity-n", "16", "--steps", "1"]) == 0  # fmt: skip
    report = (out / "report.md").read_text()
    assert "log-lik." in report and "modes" in report


def test_student_options_refused_with_one_line(teacher_dir, tmp_path):
    from fewstep.cli import main

    with pytest.raises(FewstepError, match="unknown student network 'eighth'"):
        distill(teacher_dir, "cd", max_steps=1, out=tmp_path / "a", student_net="eighth", **FAST)
    with pytest.raises(FewstepError, match="--student-net with --init"):
        distill(teacher_dir, "cd", max_steps=1, out=tmp_path / "b", student_net="half", init=teacher_dir, **FAST)
    with pytest.raises(FewstepError, match="lora_rank must be >= 1"):
        distill(teacher_dir, "cd", max_steps=1, out=tmp_path / "c", lora_rank=0, **FAST)
    assert main(["distill", "--teacher", teacher_dir, "--method", "cd", "--out", str(tmp_path / "d"),
                 "--student-net", "{oops"]) != 0  # fmt: skip
    assert not any((tmp_path / n).exists() for n in "abcd")


class Linear2D(nn.Module):
    """A network fewstep does not know: ``F(x, c_noise) = A [x, c_noise]``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, c_noise, labels=None, extra=None):
        return self.lin(torch.cat([x, c_noise.reshape(-1, 1).expand(len(x), 1)], 1))


def test_a_module_student_is_rebuilt_from_its_config_or_given_again(tmp_path):
    kw = {"max_steps": 2, "num_pairs": 16, "solver_steps": 2, **FAST}
    net = MLP(MLPConfig(dim=2, hidden=16, depth=1, num_classes=8))
    distill("analytic:gaussians8", "kd", out=tmp_path / "mlp", student=net, **kw)
    assert load_run(tmp_path / "mlp").student.net.net.config.hidden == 16  # a fewstep network: rebuilt
    out = tmp_path / "own"
    m = distill("analytic:gaussians8", "kd", out=out, student=Linear2D(), **kw)
    with pytest.raises(FewstepError, match="a Linear2D given as an object.*pass it again"):
        load_run(out)
    again = load_run(out, student=Linear2D())
    assert torch.equal(again.student.net.net.lin.weight, m.student.net.net.lin.weight)


# --- LoRA on native networks ------------------------------------------------------------------------
def test_lora_adapters_start_at_the_teacher_train_alone_and_merge_exactly():
    t = unet_teacher()
    s = copy_of(t)
    add_lora(s, 4)
    assert lora_rank(s) == 4
    trainable = [n for n, p in s.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("embed." in n for n in trainable)  # the conditioning embedding is not adapted
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 2])
    assert torch.allclose(s(x, sigma, labels), t(x, sigma, labels), atol=1e-6)  # B = 0 at first
    with torch.no_grad():
        for n, p in s.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    merged = merge_lora(s)
    assert lora_rank(merged) is None and count(merged) == count(t)
    assert torch.allclose(merged(x, sigma, labels), s(x, sigma, labels), atol=1e-5)
    assert not torch.allclose(merged(x, sigma, labels), t(x, sigma, labels), atol=1e-4)


def copy_of(t):
    import copy

    return copy.deepcopy(t).train().requires_grad_(True)


def test_a_lora_run_saves_adapters_and_a_merged_student(tmp_path):
    from fewstep.teachers.native import save_model

    teacher = save_model(unet_teacher(), tmp_path / "teacher")
    data = tiny_image_data()
    out = tmp_path / "dmd2"
    m = distill(str(teacher), "dmd2", max_steps=2, out=out, data=data, lora_rank=2, gan=False, **FAST)
    trainable = [n for n, p in m.student.named_parameters() if "lora_" in n]
    assert trainable and lora_rank(m.student) == 2
    adapters = load_file(out / "lora.safetensors")
    assert set(adapters) == {n for n in m.student.state_dict() if "lora_" in n}
    full = load_teacher(out / "student")  # the merged student is a plain fewstep model
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0]), torch.tensor([0, 1])
    assert torch.allclose(full(x, sigma, labels), m.student(x, sigma, labels), atol=1e-5)
    again = load_run(out)
    assert lora_rank(again.student) == 2
    assert torch.allclose(again.student(x, sigma, labels), m.student(x, sigma, labels), atol=1e-6)
    # the base weights did not move: only the adapters trained
    base = unet_teacher()
    w = dict(again.student.named_parameters())
    assert torch.equal(w["net.conv_in.base_layer.weight"], base.net.conv_in.weight)


def load_file(path):
    from safetensors.torch import load_file as lf

    return lf(str(path))


def tiny_image_data():
    from fewstep.data import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(64, 1, 8, 8, generator=g) * 0.5, torch.randint(0, 3, (64,), generator=g), 3, "img")
