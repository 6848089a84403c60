"""Consistency distillation (and the LCM options) against the analytic teacher's exact answers."""

import math

import pytest
import torch
from torch import nn

from fewstep import solvers
from fewstep.denoiser import EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.methods import Batch, EMASpec, get_method
from fewstep.methods._trajectory import sampling_sigmas
from fewstep.methods.cd import CDConfig, LCMConfig
from fewstep.networks.mlp import MLP, MLPConfig
from fewstep.students import ConsistencyStudent
from fewstep.teachers.analytic import GaussianMixture, ring2d
from fewstep.teachers.native import build_model

CD = get_method("cd")


class ExactConsistency(nn.Module):
    """The true consistency function of a one-component mixture N(mu, s^2 I): the exact ODE flow
    from ``sigma`` down to ``sigma_min`` (so ``f(x, sigma_min) = x``). ``power != 1`` breaks it."""

    def __init__(self, gm: GaussianMixture, power: float = 1.0) -> None:
        super().__init__()
        self.gm, self.power = gm, power
        self.extras: list = []

    def forward(self, x, sigma, cond=None, extra=None):
        self.extras.append(extra)
        s2, smin = float(self.gm.stds[0]) ** 2, self.gm.sigma_min
        ratio = ((s2 + smin**2) / (s2 + sigma**2)).sqrt() ** self.power
        mu = self.gm.means[0].to(x.dtype)
        return mu + ratio.reshape(-1, *[1] * (x.ndim - 1)) * (x - mu)


def gaussian(std: float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[0.7, -0.4]], dtype=torch.float64), std, sigma_min=sigma_min, sigma_max=sigma_max
    )


def all_pair_loss(method: CD, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean consistency loss over every adjacent grid pair, each on the same data and noise."""
    grid, k = method.grid.to(x0.dtype), method.config.skip
    losses = []
    for n in range(len(grid) - k):
        t_hi, t_lo = grid[n + k].expand(len(x0)), grid[n].expand(len(x0))
        losses.append(method.consistency_loss(x0, None, t_hi, t_lo, noise))
    return torch.stack(losses).mean()


def tiny_unet_teacher(num_classes: int = 3, dropout: float = 0.0) -> EDMDenoiser:
    net = {
        "channels": 8,
        "channel_mult": [1, 2],
        "blocks": 1,
        "attn_resolutions": [],
        "num_classes": num_classes,
        "dropout": dropout,
    }
    den = {"sample_shape": [1, 8, 8], "num_classes": num_classes}
    torch.manual_seed(0)
    return build_model("unet", net, den).eval().requires_grad_(False)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_teacher_step_equals_the_solver_on_the_same_pair(mixture64, solver):
    method = CD(mixture64, CDConfig(solver=solver), student=ExactConsistency(gaussian(0.3)))
    x = torch.randn(6, 2, dtype=torch.float64) * 4
    t = torch.tensor([8.0, 8.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    t_next = torch.tensor([5.0, 5.0, 2.0, 0.7, 0.3, 0.002], dtype=torch.float64)
    got = method.teacher_step(x, t, t_next)
    for i in range(6):
        want = solvers.SOLVERS[solver](mixture64, x[i : i + 1], torch.stack([t[i], t_next[i]]))
        assert torch.allclose(got[i : i + 1], want, atol=1e-12, rtol=1e-12)


def test_exact_consistency_function_has_zero_loss_where_heun_is_exact():
    """For a point mass D(x) = mu, the ODE is linear in sigma, Heun is exact, and so is the loss."""
    gm = gaussian(0.0, sigma_min=0.5, sigma_max=20.0)
    x0 = gm.means.expand(32, 2)
    noise = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = CD(gm, CDConfig(num_scales=10), student=ExactConsistency(gm))
    assert all_pair_loss(exact, x0, noise) < 1e-28
    wrong = CD(gm, CDConfig(num_scales=10), student=ExactConsistency(gm, power=0.8))
    assert all_pair_loss(wrong, x0, noise) > 1e-3


@pytest.mark.parametrize("solver,order", [("heun", 2), ("euler", 1)])
def test_exact_consistency_loss_vanishes_at_the_teacher_solvers_order(solver, order):
    """With s > 0 the loss of the exact consistency function is the solver's local error squared:
    doubling N divides it by ~2^(2(order+1)) (64 for Heun, 16 for Euler)."""
    gm = gaussian(0.5)
    x0 = gm.sample(256, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = {
        n: all_pair_loss(CD(gm, CDConfig(num_scales=n, solver=solver), student=ExactConsistency(gm)), x0, noise)
        for n in (18, 36, 72)
    }
    rates = [math.log2(loss[18] / loss[36]), math.log2(loss[36] / loss[72])]
    assert all(abs(r - 2 * (order + 1)) < 1.0 for r in rates), (loss, rates)
    assert loss[72] < (1e-8 if solver == "heun" else 1e-6)


def test_guided_ddim_step_is_lcm_equation_9(mixture64):
    """Euler/DDIM on the guided denoiser = z + (1 + w') Phi(c) - w' Phi(empty)."""
    method = CD(mixture64, CDConfig(solver="ddim", guidance=(1.0, 5.0)), student=ExactConsistency(gaussian(0.3)))
    x = torch.randn(4, 2, dtype=torch.float64) * 3
    t, t_next = torch.full((4,), 3.0, dtype=torch.float64), torch.full((4,), 1.2, dtype=torch.float64)
    labels, w = torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 2.0, 3.5, 5.0], dtype=torch.float64)
    phi = lambda lab: (1 - 1.2 / 3.0) * (mixture64(x, t, lab) - x)  # DDIM increment from x0-prediction
    wp = (w - 1)[:, None]
    want = x + (1 + wp) * phi(labels) - wp * phi(torch.full_like(labels, mixture64.num_classes))
    assert torch.allclose(method.teacher_step(x, t, t_next, labels, w), want, atol=1e-12)


def test_lcm_student_is_told_w_prime_in_range(mixture64):
    student = ExactConsistency(gaussian(0.3))
    method = CD(mixture64, CDConfig(guidance=(2.0, 4.0), skip=3), student=student)
    x = mixture64.sample(64, generator=torch.Generator().manual_seed(0))
    method.losses(Batch(64, x, torch.randint(0, 2, (64,))), 0, {"student"})
    (w_student,), (w_target,) = student.extras, method.target.extras
    assert w_student.shape == (64, 1) and w_student.min() >= 1.0 and w_student.max() <= 3.0
    assert w_student.std() > 0.3  # drawn per sample
    assert torch.equal(w_student, w_target)  # the target network sees the same w' as the student


def test_draw_pair_spans_skip_grid_points():
    gm = gaussian(0.3)
    method = CD(gm, CDConfig(num_scales=40, skip=5), student=ExactConsistency(gm))
    t_hi, t_lo = method.draw_pair(torch.zeros(500, 2, dtype=torch.float64))
    idx_hi = torch.searchsorted(method.grid, t_hi)
    idx_lo = torch.searchsorted(method.grid, t_lo)
    assert torch.equal(idx_hi - idx_lo, torch.full_like(idx_hi, 5))
    assert idx_lo.min() == 0 and idx_hi.max() == 39  # every pair is reachable


@pytest.mark.parametrize("config", [CDConfig(num_scales=6), CDConfig(num_scales=6, guidance=(1.0, 3.0))])
def test_frozen_teacher_and_target_get_no_gradient(config):
    teacher = tiny_unet_teacher()
    method = CD(teacher, config)
    assert set(method.frozen()) == {"teacher"} and set(method.networks()) == {"student"}
    assert method.emas() == {"target": EMASpec("student", 0.95)}
    assert method.target is not method.student
    loss = method.losses(Batch(4, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])), 0, {"student"})["student"]
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert torch.isfinite(method.sample(torch.randn(2, 1, 8, 8), steps=2, cond=torch.tensor([0, 1]))).all()


def test_lcm_preset_defaults():
    lcm = get_method("lcm")
    assert lcm.paper == "2310.04378" and issubclass(lcm, CD)
    c = LCMConfig()
    assert (c.solver, c.skip, c.distance, c.huber_c, c.guidance) == ("ddim", 20, "huber", 0.001, (6.0, 16.0))
    assert (c.optimizer, c.warmup, c.grad_clip) == ("adamw", 500, 1.0)  # diffusers' LCM scripts
    method = lcm(tiny_unet_teacher())
    assert method.student.net.net.config.extra_dims == 1  # w' enters as an extra scalar
    c = method.config  # a full student: the LCM script's target copy and the README's lr
    assert (c.target_decay, c.lr, c.grid) == (0.95, 1e-6, "karras") and method.emas()["target"].decay == 0.95
    schedule = method.optimizers()["student"].lr_schedule
    assert [schedule(k) for k in (0, 249, 499, 5000)] == [1 / 500, 0.5, 1.0, 1.0]


def test_bad_options_raise_one_line_errors(mixture64):
    with pytest.raises(FewstepError, match="distance"):
        CD(mixture64, CDConfig(distance="lpips"), student=nn.Identity())
    with pytest.raises(FewstepError, match="skip"):
        CD(mixture64, CDConfig(num_scales=5, skip=5), student=nn.Identity())
    with pytest.raises(FewstepError, match="class-conditional"):
        CD(gaussian(0.3), CDConfig(guidance=(1.0, 2.0)), student=nn.Identity())
    method = CD(mixture64, CDConfig(), student=nn.Identity())
    with pytest.raises(FewstepError, match="real data"):
        method.losses(Batch(4), 0, {"student"})


def test_one_step_sample_of_the_exact_consistency_function_is_the_teacher_ode():
    gm = gaussian(0.5)
    method = CD(gm, CDConfig(), student=ExactConsistency(gm))
    z = torch.randn(16, 2, dtype=torch.float64)
    ref = solvers.reference(gm, z * 80.0, torch.tensor([80.0, 0.0], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert torch.allclose(method.sample(z, steps=1), ref, atol=1e-4)


def test_multistep_sampling_renoises_to_the_data_distribution():
    """f(x0 + tau z, tau) of an exact f keeps N(mu, s^2): mean and std survive 3-step sampling."""
    torch.manual_seed(0)
    gm = gaussian(0.5)
    method = CD(gm, CDConfig(sample_sigmas=(3.0, 0.8)), student=ExactConsistency(gm))
    x = method.sample(torch.randn(20000, 2, dtype=torch.float64), steps=3)
    assert torch.allclose(x.mean(0), gm.means[0], atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), 0.5, dtype=torch.float64), rtol=0.03)
    with pytest.raises(FewstepError, match="intermediate sigmas"):
        CD(gm, CDConfig(sample_sigmas=(0.8, 3.0)), student=ExactConsistency(gm)).sample(torch.randn(2, 2), steps=3)


def test_sampling_levels_default_to_a_karras_grid_and_given_ones_apply_to_their_step_count():
    assert sampling_sigmas(1, 0.002, 80.0) == [80.0]
    two = sampling_sigmas(2, 0.002, 80.0)
    assert two[0] == 80.0 and two[1] == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7)
    assert sampling_sigmas(2, 0.002, 80.0, (0.821,)) == [80.0, 0.821]
    assert sampling_sigmas(4, 0.002, 80.0, (0.821,)) == sampling_sigmas(4, 0.002, 80.0)


def test_short_run_moves_the_one_step_student_toward_the_teacher_ode():
    torch.manual_seed(0)
    teacher = ring2d(std=0.1)
    net = MLP(MLPConfig(dim=2, hidden=64, depth=2, num_classes=8))
    student = ConsistencyStudent(EDMDenoiser(net, (2,), num_classes=8, sigma_data=0.5))
    method = CD(teacher, CDConfig(num_scales=12, target_decay=0.9, lr=2e-3), student=student)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 8
    ref = solvers.reference(teacher, z * 80.0, torch.tensor([80.0, 0.0]), labels, rtol=1e-6, atol=1e-6)

    def error() -> float:
        return float((method.sample(z, steps=1, cond=labels) - ref).pow(2).sum(1).mean().sqrt())

    before = error()
    opt = torch.optim.Adam(student.parameters(), lr=method.config.lr)
    mu = method.emas()["target"].value(0)
    for step in range(150):
        lab = torch.randint(0, 8, (128,))
        loss = method.losses(Batch(128, teacher.sample(128, cond=lab), lab), step, {"student"})["student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the engine's EMA rule, theta^- <- mu theta^- + (1 - mu) theta
            for p_t, p_s in zip(method.target.parameters(), student.parameters(), strict=True):
                p_t.lerp_(p_s, 1 - mu)
    after = error()
    assert after < 0.5 * before, (before, after)


def test_student_dropout_is_set_and_the_teacher_keeps_its_own():
    teacher = tiny_unet_teacher(dropout=0.1)
    rates = lambda m: {b.dropout for b in m.modules() if hasattr(b, "conv1")}
    assert rates(CD(teacher).student) == {0.0} and rates(teacher) == {0.1}
    kept = CD(teacher, CDConfig(dropout=None)).student
    assert rates(kept) == {0.1} and kept.net.net.config.dropout == 0.1
    with pytest.raises(FewstepError, match="dropout"):
        CD(teacher, CDConfig(dropout=1.0))


@pytest.mark.parametrize("name", ["cd", "lcm"])
def test_the_engine_trains_it_and_moves_the_target_by_its_ema_rule(tmp_path, name):
    """One engine iteration: theta^- <- mu theta^- + (1 - mu) theta, with theta^- starting at theta_0."""
    from engine_helpers import tiny_data, tiny_teacher
    from fewstep.train import distill

    teacher = tiny_teacher()
    options = {"target_decay": 0.7, "num_scales": 6, "skip": 1, "lr": 1e-2}
    if name == "lcm":
        options["guidance"] = (1.0, 3.0)
    torch.manual_seed(0)  # the engine seeds with the run's seed before building the method
    init = get_method(name)(teacher, get_method(name).Config(**options)).student.state_dict()
    method = distill(teacher, name, max_steps=1, out=tmp_path / "run", data=tiny_data(), batch=8, sample_n=0,
                     ema_decay=0.0, cpu=True, options=options)  # fmt: skip
    theta, target = method.student.state_dict(), method.target.state_dict()
    assert any(not torch.equal(theta[k], init[k]) for k in init)
    for k in init:
        assert torch.allclose(target[k], 0.7 * init[k] + 0.3 * theta[k], atol=1e-6), k
