"""Reflow, PeRFlow, TraFlow, BOOT and DSNO against exact answers.

A one-component mixture N(MU, S^2 I) has a closed-form probability-flow ODE (``x_sigma - MU``
scales as ``sqrt(S^2 + sigma^2)``), so its (noise, sample) pairs, the straight flow of those pairs,
the teacher's trajectory and its DDIM steps are all known. A point mass (S -> 0) has straight
trajectories itself.
"""

import json
import math

import pytest
import torch
from torch import nn

from dm_helpers import tiny_images, tiny_teacher
from fewstep.conversions import flow_time_velocity, pair_line, uniform_flow_sigmas
from fewstep.denoiser import CallCounter, EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.methods.boot import signal_step
from fewstep.methods.dsno import TimeConv
from fewstep.methods.reflow import straightness
from fewstep.solvers import ddim_step, euler, heun
from fewstep.teachers.analytic import GaussianMixture

S, MU, SMAX = 0.3, 0.4, 80.0
Reflow, PeRFlow, TraFlow, BOOT, DSNO = (get_method(n) for n in ("reflow", "perflow", "traflow", "boot", "dsno"))


def gaussian(std: float = S, dim: int = 3) -> GaussianMixture:
    return GaussianMixture(torch.full((1, dim), MU, dtype=torch.float64), std)


def a_of(std: float = S) -> float:
    return std / math.sqrt(std**2 + SMAX**2)


def exact_pair(z: torch.Tensor, std: float = S) -> torch.Tensor:
    """The ODE answer from ``SMAX z``: ``MU + a (SMAX z - MU)``."""
    return MU + a_of(std) * (SMAX * z - MU)


class StraightFlow(nn.Module):
    """The denoiser of the straight (1-rectified) flow of the Gaussian's exact pairs: on the pair's
    line ``x = (1 - sigma/SMAX) y + sigma z`` with ``y = MU + a (SMAX z - MU)`` it returns ``y``."""

    sigma_max, sigma_min, sigma_data, num_classes, sample_shape = SMAX, 0.002, 0.5, 0, (3,)

    def forward(self, x, sigma, cond=None):
        s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x)
        k, a = 1 - s / SMAX, a_of()
        z = (x - k * (1 - a) * MU) / (k * a * SMAX + s)
        return MU + a * (SMAX * z - MU)


# --- reflow ------------------------------------------------------------------------------------------
def test_the_reflow_target_on_a_pair_is_the_pairs_straight_line_velocity():
    torch.manual_seed(0)
    z, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t_max = SMAX / (1 + SMAX)
    assert torch.equal(pair_line(y, z, torch.full((5,), SMAX, dtype=torch.float64), SMAX), SMAX * z)
    assert torch.equal(pair_line(y, z, torch.zeros(5, dtype=torch.float64), SMAX), y)
    for sigma in (0.01, 0.5, 3.0, 40.0):
        s = torch.full((5,), sigma, dtype=torch.float64)
        v = flow_time_velocity(pair_line(y, z, s, SMAX), y, s)  # the velocity a denoiser answering y implies
        assert torch.allclose(v, z - y / t_max, atol=1e-12)


def test_reflow_of_exact_pairs_is_straight_and_its_one_step_reaches_the_distribution():
    torch.manual_seed(0)
    teacher, flow = gaussian(), StraightFlow()
    z = torch.randn(256, 3, dtype=torch.float64)
    y = exact_pair(z)
    assert torch.allclose(teacher.exact_flow(SMAX * z, SMAX, 0.0), y, atol=1e-10)  # the pairs are the ODE's
    m = Reflow(teacher, student=flow)
    t = torch.rand(256, dtype=torch.float64) * 0.98 + 0.001
    assert float(m.loss_on(z, y, None, t)) < 1e-20  # the straight flow is the reflow loss's minimiser
    m.student = teacher  # the teacher's own flow is curved: the loss on its pairs is not zero
    assert float(m.loss_on(z, y, None, t)) > 1e-3
    assert straightness(flow, z) < 1e-20 < 1e-3 < straightness(teacher, z)
    m.student = flow
    assert torch.allclose(m.sample(z, steps=1), y, atol=1e-10)  # one Euler step: the exact sample
    distill = Reflow(teacher, Reflow.Config(phase="distill"), student=flow)
    assert float(distill.loss_on(z, y, None)) < 1e-20


def test_reflow_sampler_is_euler_on_a_uniform_flow_time_grid():
    sig = uniform_flow_sigmas(4, SMAX)
    t = sig / (1 + sig)
    assert torch.allclose(t, torch.linspace(SMAX / (1 + SMAX), 0, 5, dtype=torch.float64), atol=1e-12) and sig[-1] == 0
    teacher = tiny_teacher("unet", num_classes=2)
    m = Reflow(teacher)
    with CallCounter(m.student) as calls:
        m.sample(torch.randn(2, 1, 8, 8), 4, torch.tensor([0, 1]))
    assert calls.calls == 4


def test_reflow_round_two_reads_pairs_of_the_flow_it_starts_from_and_keeps_it(tmp_path, monkeypatch):
    from fewstep.pairs import teacher_fingerprint
    from fewstep.train import distill, load_run

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    teacher = tiny_teacher("unet", num_classes=2)
    common = dict(batch=4, sample_n=0, cpu=True, log_every=1, num_pairs=8, solver_steps=2)
    distill(teacher, "reflow", max_steps=2, out=tmp_path / "rf1", **common)
    m = distill(teacher, "reflow", max_steps=2, out=tmp_path / "rf2", init=str(tmp_path / "rf1"),
                pairs_from="init", **common)  # fmt: skip
    before = load_run(tmp_path / "rf1", teacher=teacher).student
    assert m.pairs.meta["teacher_sha256"] == teacher_fingerprint(m.source) == teacher_fingerprint(before)
    assert m.pairs.meta["teacher_sha256"] != teacher_fingerprint(teacher)
    after = load_run(tmp_path / "rf2", teacher=teacher)  # the source flow is saved with the run
    assert teacher_fingerprint(after.source) == teacher_fingerprint(before)
    assert json.loads((tmp_path / "rf2" / "config.json").read_text())["init"]["method"] == "reflow"
    with pytest.raises(FewstepError, match="phase"):
        Reflow(teacher, Reflow.Config(phase="both"))


def test_instaflow_guides_its_pairs_with_the_papers_scales():
    teacher = tiny_teacher("unet", num_classes=2)
    InstaFlow = get_method("instaflow")
    assert InstaFlow(teacher).config.guidance == 6.0
    assert InstaFlow(teacher, InstaFlow.Config(phase="distill")).config.guidance == 1.5
    assert InstaFlow(teacher, InstaFlow.Config(guidance=2.0)).config.guidance == 2.0


# --- PeRFlow -----------------------------------------------------------------------------------------
def test_perflow_windows_and_window_ends():
    teacher = gaussian()
    m = PeRFlow(teacher, PeRFlow.Config(solving_steps=256), student=teacher)
    t_max = SMAX / (1 + SMAX)
    t = torch.tensor([t_max, 0.75 * t_max, 0.5 * t_max + 1e-4, 0.25 * t_max, 1e-3], dtype=torch.float64)
    t_s, t_e = m.window(t)
    # (t_e, t_s]: a boundary belongs to the window it starts (the reference's get_window)
    assert torch.allclose(t_s / t_max, torch.tensor([1, 0.75, 0.75, 0.25, 0.25], dtype=torch.float64))
    assert torch.allclose(t_e / t_max, torch.tensor([0.75, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    # the window end is the teacher's ODE across the window (DDIM converges to the exact flow)
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    ts, te = torch.full((4,), 0.75 * t_max, dtype=torch.float64), torch.full((4,), 0.5 * t_max, dtype=torch.float64)
    s_s, s_e = ts / (1 - ts), te / (1 - te)
    end = m.window_end(x / (1 + s_s[:, None]), ts, te) * (1 + s_e[:, None])
    assert torch.allclose(end, teacher.exact_flow(x, float(s_s[0]), float(s_e[0])), atol=1e-3)


def test_perflow_loss_is_zero_where_the_teachers_windows_are_straight():
    point = gaussian(std=1e-9)  # a point mass: its trajectories are straight lines to MU
    m = PeRFlow(point, student=point)
    torch.manual_seed(0)
    x0 = torch.full((64, 3), MU, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 1e-3
    assert float(m.loss_on(x0, None, t, torch.randn_like(x0))) < 1e-16
    curved = PeRFlow(gaussian(), student=gaussian())  # the Gaussian's own flow bends inside a window
    x0 = MU + S * torch.randn(64, 3, dtype=torch.float64)
    assert float(curved.loss_on(x0, None, t, torch.randn_like(x0))) > 1e-4


def test_perflow_samples_one_euler_step_per_window():
    teacher = tiny_teacher("unet", num_classes=2)
    m = PeRFlow(teacher)
    with CallCounter(m.student) as calls:
        m.sample(torch.randn(2, 1, 8, 8), 4, torch.tensor([0, 1]))
    assert calls.calls == 4
    with pytest.raises(FewstepError, match="multiple of 4"):
        m.sample(torch.randn(2, 1, 8, 8), 2)
    m.losses(Batch(4, tiny_images(4).x, torch.tensor([0, 1, 0, 1])), 0, {"student"})["student"].backward()
    assert all(p.grad is None for p in teacher.parameters())


# --- BOOT --------------------------------------------------------------------------------------------
def test_boots_signal_step_is_the_teachers_ddim_step():
    torch.manual_seed(0)
    teacher = gaussian()
    eps, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    t, s = torch.full((6,), 5.0, dtype=torch.float64), torch.full((6,), 2.0, dtype=torch.float64)
    x_t = y + t[:, None] * eps
    f = teacher(x_t, t)
    x_s = ddim_step(x_t, f, t, s)
    assert torch.allclose(signal_step(y, f, t, s), x_s - s[:, None] * eps, atol=1e-12)


def test_boots_losses_vanish_on_the_teachers_own_signal_trajectory(monkeypatch):
    """The signal-ODE run by the teacher (DDIM along the grid from the boundary value) makes both
    the bootstrapping and the boundary loss exactly zero."""
    teacher = gaussian()
    m = BOOT(teacher, student=nn.Identity())  # the student is replaced by the exact table below
    torch.manual_seed(0)
    eps = torch.randn(8, 3, dtype=torch.float64)
    grid = m.grid.to(torch.float64)
    table = {SMAX: teacher(SMAX * eps, torch.full((8,), SMAX, dtype=torch.float64))}
    y = table[SMAX]
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        ta, tb = torch.full((8,), a, dtype=torch.float64), torch.full((8,), b, dtype=torch.float64)
        y = signal_step(y, teacher(y + a * eps, ta), ta, tb)
        table[b] = y
    monkeypatch.setattr(
        m, "signal", lambda e, s, cond=None: torch.stack([table[v][j] for j, v in enumerate(s.tolist())])
    )
    i = torch.randint(0, len(grid) - 1, (8,))
    bs, bc = m.loss_on(eps, None, i)
    assert float(bs.max()) < 1e-24 and float(bc.max()) < 1e-24
    # the signal at 0 is the sample of the teacher's DDIM from x_T = sigma_max eps + y_T (BOOT's boundary)
    assert torch.allclose(table[0.0], euler(teacher, SMAX * eps + table[SMAX], grid), atol=1e-10)


def test_boots_heun_target_is_the_teachers_heun_step_read_as_a_signal():
    teacher = gaussian()
    m = BOOT(teacher, BOOT.Config(solver="heun"), student=nn.Identity())
    torch.manual_seed(0)
    eps = torch.randn(4, 3, dtype=torch.float64)
    grid = m.grid.to(torch.float64)
    y = {float(v): MU + 0.1 * torch.randn(4, 3, dtype=torch.float64) for v in grid.tolist()}
    m.signal = lambda e, s, cond=None: torch.stack([y[v][j] for j, v in enumerate(s.tolist())])
    i = torch.tensor([0, 3, 9, 17])
    t, s = grid[i], grid[i + 1]
    x_t = m.signal(eps, t) + t[:, None] * eps
    want = torch.stack([heun(teacher, x_t[j : j + 1], torch.stack([t[j], s[j]])) for j in range(4)])[:, 0]
    bs, _ = m.loss_on(eps, None, i)
    target = want - s[:, None] * eps  # the Heun step's x_s, read as a signal
    assert torch.allclose(bs, (m.signal(eps, s) - target).pow(2).mean(1) / (1 - s / t) ** 2, atol=1e-12)


def test_boot_starts_at_the_boundary_value_and_freezes_the_teacher():
    teacher = tiny_teacher("unet", num_classes=2)
    m = BOOT(teacher)
    torch.manual_seed(0)
    eps, cond = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    top = torch.full((4,), SMAX)
    with torch.no_grad():
        f_top = teacher(SMAX * eps, top, cond)
        for s in (SMAX, 3.0, 0.0):  # the time input starts at zero: every level reads the boundary value
            assert torch.allclose(m.signal(eps, torch.full((4,), s), cond), f_top, atol=1e-6)
    bs, bc = m.loss_on(eps, cond, torch.tensor([0, 5, 10, 17]))
    assert float(bc.detach().max()) < 1e-10 and float(bs.detach().mean()) > 0
    bs.mean().backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(FewstepError, match="one step"):
        m.sample(eps, 2)


# --- TraFlow -----------------------------------------------------------------------------------------
class PointFlowMap(nn.Module):
    """The exact flow map of a point mass at MU: ``G(x, t, s) = MU + (s/t)(x - MU)``."""

    sigma_max, sigma_min, sigma_data, num_classes, sample_shape = SMAX, 0.002, 0.5, 0, (3,)

    def forward(self, x, t, s, cond=None):
        return MU + (s / t).reshape(-1, 1) * (x - MU)


def test_traflows_velocity_loss_is_zero_on_a_straight_map_and_not_on_a_curved_one():
    torch.manual_seed(0)
    m = TraFlow(gaussian(std=1e-9), student=PointFlowMap())
    z = torch.randn(16, 3, dtype=torch.float64)
    y = torch.full_like(z, MU)  # the point mass's pairs
    t = torch.rand(16, dtype=torch.float64) * 40 + 1
    s = t * torch.rand(16, dtype=torch.float64)
    assert float(m.velocity_loss(z, y, None, t, s).max()) < 1e-12
    m.student = lambda x, t_, s_, cond=None: gaussian().exact_flow(x, float(t_[0]), float(s_[0]))
    t, s = torch.full((16,), 10.0, dtype=torch.float64), torch.full((16,), 1.0, dtype=torch.float64)
    y = exact_pair(z)
    assert float(m.velocity_loss(z, y, None, t, s).mean()) > 1e-3  # the Gaussian's exact flow is curved


def test_traflow_trains_on_data_and_pairs_without_touching_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    teacher = tiny_teacher("unet", num_classes=2)
    m = TraFlow(teacher, TraFlow.Config(num_pairs=8, solver_steps=2))
    x, labels = tiny_images(4).x, torch.tensor([0, 1, 0, 1])
    out = m.losses(Batch(4, x, labels), 0, {"student"})
    out["student"].backward()
    assert torch.isfinite(out["student"]) and all(p.grad is None for p in teacher.parameters())


# --- DSNO --------------------------------------------------------------------------------------------
def test_time_conv_mixes_time_points_and_is_the_identity_with_zero_weights():
    torch.manual_seed(0)
    conv = TimeConv(3, modes=2)
    h = torch.randn(2 * 4, 3, 2, 2)
    with torch.no_grad():
        conv.weight.zero_()
    assert torch.equal(conv(h, 4), h)
    with torch.no_grad():
        conv.weight.normal_()
    h2 = h.clone()
    h2[3] += 1.0  # change time point 3 of sample 0
    out, out2 = conv(h, 4), conv(h2, 4)
    assert not torch.allclose(out[0], out2[0])  # time point 0 of sample 0 sees it
    assert torch.equal(out[4:], out2[4:])  # sample 1 does not


def test_unet_after_block_hook_sees_every_block_and_changes_nothing_when_identity():
    teacher = tiny_teacher("unet", num_classes=2)
    net = teacher.net
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    seen = []
    out = net(x, c, after_block=lambda k, h: (seen.append((k, h.shape[1])), h)[1])
    assert torch.equal(out, net(x, c))
    assert [ch for _, ch in seen] == net.block_channels() and [k for k, _ in seen] == list(range(len(seen)))


def test_dsno_starts_as_the_teachers_one_step_jumps_and_fits_exact_trajectories(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    teacher = tiny_teacher("unet", num_classes=2)
    m = DSNO(teacher, DSNO.Config(num_trajectories=8, solver_steps=2))
    levels = m.student.levels
    assert torch.allclose(levels, torch.tensor([1 + math.sqrt(2), 1.0, math.sqrt(2) - 1, 0.0]), atol=1e-6)
    assert torch.allclose(m.weights(), torch.tensor([1.0, 1.0, 1 + math.sqrt(2), 1e4]), atol=1e-5)
    torch.manual_seed(0)
    z, cond = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1])
    for conv in m.student.time_convs.values():
        torch.nn.init.zeros_(conv.weight)
    with torch.no_grad():
        traj = m.student(z, cond)
        jumps = torch.stack([m.student.flow_map(SMAX * z, torch.full((3,), SMAX), torch.full((3,), float(v)), cond)
                             for v in levels], 1)  # fmt: skip
    assert torch.allclose(traj, jumps, atol=1e-5)  # without time mixing: G(x_T, T, sigma_i) per level
    x_T = SMAX * z  # the teacher's trajectory: Heun on the Karras grid with the levels inserted
    states = m.teacher_trajectory(z, cond)
    grid = sorted({*m.grid_with_levels()}, reverse=True)
    assert torch.allclose(states[:, -1], heun(teacher, x_T, torch.tensor(grid, dtype=torch.float64), cond))
    assert float(m.loss_on(states, states)) == 0.0 and float(m.loss_on(traj, states)) > 0
    m.losses(Batch(2, None, torch.tensor([0, 1])), 0, {"student"})["student"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(c.weight.grad is not None for c in m.student.time_convs.values())
    with CallCounter(m.student) as calls:
        assert m.sample(z, 1, cond).shape == z.shape
    assert calls.calls == 1


def test_dsno_refuses_a_teacher_without_a_unet():
    with pytest.raises(FewstepError, match="UNet"):
        DSNO(tiny_teacher("mlp"))
    assert isinstance(tiny_teacher("unet"), EDMDenoiser)
