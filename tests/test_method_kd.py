"""Knowledge distillation: the regression loss on stored teacher pairs."""

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.pairs import generate_pairs, load_pairs
from fewstep.solvers import sample
from fewstep.students import OneStepGenerator
from fewstep.teachers.analytic import ring2d
from fewstep.teachers.native import build_model


def mlp_student(teacher, hidden=32, depth=1):
    net = {"dim": 2, "hidden": hidden, "depth": depth, "num_classes": teacher.num_classes}
    den = {
        "sample_shape": [2],
        "num_classes": teacher.num_classes,
        "sigma_min": teacher.sigma_min,
        "sigma_max": teacher.sigma_max,
        "sigma_data": 0.5,
    }
    return OneStepGenerator(build_model("mlp", net, den), teacher.sigma_max)


class ExactODEStudent(torch.nn.Module):
    """A 'student' that reproduces the pairs: it runs the teacher's own solver."""

    def __init__(self, teacher, steps):
        super().__init__()
        self.teacher, self.steps = teacher, steps
        self.w = torch.nn.Parameter(torch.zeros(()))  # so the method can find a device

    def forward(self, z, cond=None):
        return sample(self.teacher, z, "heun", self.steps, cond)[0] + self.w


@pytest.fixture
def setup(tmp_path):
    teacher = ring2d(k=4, std=0.1)
    generate_pairs(teacher, tmp_path, n=64, solver="heun", steps=8, shard_size=64, batch=64, progress=False)
    return teacher, load_pairs(tmp_path)


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_loss_is_zero_for_a_student_that_reproduces_the_pairs(setup, loss):
    teacher, pairs = setup
    kd = get_method("kd")
    m = kd(teacher, kd.Config(loss=loss), student=ExactODEStudent(teacher, 8), pairs=pairs)
    exact = m.loss_on(pairs.noise, pairs.x0, pairs.labels)
    assert exact < 1e-10
    torch.manual_seed(0)
    wrong = m.loss_on(pairs.noise, pairs.x0 + 0.1, pairs.labels).item()  # off by 0.1 in every coordinate
    assert wrong == pytest.approx(0.01 if loss == "l2" else 0.1, rel=1e-3)


def test_short_run_lowers_the_loss_and_teacher_gets_no_gradient(setup):
    teacher, pairs = setup
    torch.manual_seed(0)
    kd = get_method("kd")
    m = kd(teacher, kd.Config(lr=3e-3), student=mlp_student(teacher), pairs=pairs)
    spec = m.optimizers()["student"]
    assert set(m.networks()) == {"student"} and spec.every == 1
    opt = torch.optim.Adam(m.student.parameters(), lr=spec.lr, betas=spec.betas)
    first = m.loss_on(pairs.noise, pairs.x0, pairs.labels).item()
    for step in range(150):
        loss = m.losses(Batch(size=32), step, {"student"})["student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.loss_on(pairs.noise, pairs.x0, pairs.labels).item() < 0.5 * first
    assert all(p.grad is None for p in teacher.parameters()) and not any(b.requires_grad for b in teacher.buffers())
    assert m.losses(Batch(size=4), 0, set()) == {}
    assert m.sample(torch.randn(3, 2), 1, torch.tensor([0, 1, 2])).shape == (3, 2)
    with pytest.raises(FewstepError, match="steps=1"):
        m.sample(torch.randn(3, 2), 2)


def test_kd_on_an_edm_teacher_copies_it_and_checks_the_pairs(tmp_path):
    from fewstep.methods.kd import KD

    net = {"dim": 2, "hidden": 16, "depth": 1, "num_classes": 0}
    den = {"sample_shape": [2], "num_classes": 0, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    teacher = build_model("mlp", net, den).eval().requires_grad_(False)
    generate_pairs(teacher, tmp_path / "p", n=8, steps=3, progress=False)
    m = KD(teacher, KD.Config(pairs=str(tmp_path / "p")))
    z = torch.randn(4, 2)
    assert torch.equal(m.student(z), teacher(80.0 * z, torch.full((4,), 80.0)))  # starts as the teacher
    loss = m.losses(Batch(size=8), 0, {"student"})["student"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(FewstepError, match="regression loss|KD loss"):
        KD(teacher, KD.Config(pairs=str(tmp_path / "p"), loss="lpips"))
    other = build_model("mlp", {**net, "dim": 3}, {**den, "sample_shape": [3]}).eval()
    with pytest.raises(FewstepError, match="do not fit"):
        KD(other, KD.Config(pairs=str(tmp_path / "p"))).losses(Batch(size=2), 0, {"student"})
    retrained = build_model("mlp", net, den).eval()  # same shape, other weights
    with pytest.raises(FewstepError, match="another teacher"):
        KD(retrained, KD.Config(pairs=str(tmp_path / "p"))).losses(Batch(size=2), 0, {"student"})


def test_fewstep_pairs_then_distill_kd_and_load_run(tmp_path, capsys):
    from engine_helpers import tiny_teacher
    from fewstep.cli import main
    from fewstep.runs import load_run
    from fewstep.teachers.native import save_model

    teacher_dir = str(save_model(tiny_teacher(), tmp_path / "teacher"))
    pairs = str(tmp_path / "pairs")
    assert main(["pairs", "--teacher", teacher_dir, "--n", "32", "--steps", "4", "--out", pairs, "--quiet"]) == 0
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", teacher_dir, "--method", "kd", "--out", str(out), "--max-steps", "4",
               "--batch", "8", "--set", f"pairs={pairs}", "--set", "sample_n=0", "--set", "cpu=true"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = load_run(out)
    z, y = torch.randn(5, 2), torch.tensor([0, 1, 0, 1, 0])
    assert m.sample(z, 1, y).shape == (5, 2) and m.run.step == 4
