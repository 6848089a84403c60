"""sCD, ECT, TCM and MeanFlow against the analytic teacher's exact answers.

A one-component mixture N(mu, s^2 I) has a closed-form probability-flow ODE: along it
``x_sigma - mu`` scales as ``sqrt(s^2 + sigma^2)``. So the true consistency function, the time
derivative of any denoiser along the ODE and the exact average velocity are all known.
"""

import json
import math

import pytest
import torch
from torch import nn

from dm_helpers import tiny_images, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.methods._trajectory import directional_derivative
from fewstep.methods.ect import consistency_distance, ect_r
from fewstep.methods.meanflow import flow_velocity
from fewstep.methods.scm import scm_tangent, trig_F
from fewstep.methods.tcm import truncated_student_t
from fewstep.teachers.analytic import GaussianMixture

SD, S, MU = 0.5, 0.3, 0.4  # sigma_data, the Gaussian's std and mean


def gaussian(dim: int = 3) -> GaussianMixture:
    return GaussianMixture(torch.full((1, dim), MU, dtype=torch.float64), S)


def gauss_den(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """N(MU, S^2)'s exact denoiser in closed form (the mixture's own uses cdist, which has no
    forward-mode derivative)."""
    return MU + (S**2 / (S**2 + sigma**2)).reshape(-1, *[1] * (x.ndim - 1)) * (x - MU)


def exact_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact ODE flow of N(MU, S^2) from ``sigma`` to 0: the true consistency function."""
    return MU + (S / (S**2 + sigma**2).sqrt())[:, None] * (x - MU)


def trig_point(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.2, 1.4, n, dtype=torch.float64)
    x0 = MU + S * torch.randn(n, 3, generator=g, dtype=torch.float64)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x_t, t


# --- sCD ---------------------------------------------------------------------------------------------
def test_scm_tangent_by_jvp_equals_finite_differences_and_the_closed_form():
    x_t, t = trig_point()
    dxdt = SD * trig_F(gaussian(), x_t, t, SD)  # the teacher's TrigFlow velocity

    def F(x, tt):  # the teacher's own denoiser as "f": not consistent, so its tangent is not zero
        return trig_F(gauss_den, x, tt, SD)

    _, g_jvp = scm_tangent(F, x_t, t, dxdt, SD, r=1.0, mode="jvp")
    _, g_fd = scm_tangent(F, x_t, t, dxdt, SD, r=1.0, mode="fd", eps=1e-5)
    # closed form: g = cos t df/dt, f = D(x_t / cos t, sd tan t); along the ODE
    # dD/dsigma = -sigma s^2 / (s^2 + sigma^2)^2 (x_sigma - mu), dsigma/dt = sd / cos^2 t
    sigma = SD * torch.tan(t)
    x_sigma = x_t / torch.cos(t)[:, None]
    dD = (-sigma * S**2 / (S**2 + sigma**2) ** 2)[:, None] * (x_sigma - MU)
    closed = torch.cos(t)[:, None] * dD * (SD / torch.cos(t) ** 2)[:, None]
    assert closed.abs().max() > 0.01
    assert torch.allclose(g_jvp, closed, atol=1e-10)
    assert torch.allclose(g_fd, closed, atol=1e-7)


@pytest.mark.parametrize("mode", ["jvp", "fd"])
def test_scm_tangent_vanishes_for_the_true_consistency_function(mode):
    x_t, t = trig_point()
    dxdt = SD * trig_F(gaussian(), x_t, t, SD)

    def F(x, tt):  # F of the exact flow to sigma = 0
        return trig_F(lambda xs, s, c: exact_x0(xs, s), x, tt, SD)

    _, g = scm_tangent(F, x_t, t, dxdt, SD, r=1.0, mode=mode, eps=1e-5)
    assert g.abs().max() < (1e-10 if mode == "jvp" else 1e-7)
    _, g_half = scm_tangent(F, x_t, t, dxdt, SD, r=0.5, mode=mode, eps=1e-5)  # warm-up: not yet consistent
    assert g_half.abs().max() > 1e-3


def test_trig_F_is_edm_preconditioning_in_disguise():
    teacher = tiny_teacher("unet")
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 1.0, 1.5])
    sigma = SD * torch.tan(t)
    raw = teacher.raw(x_t / torch.cos(t).reshape(-1, 1, 1, 1), sigma)
    assert torch.allclose(trig_F(teacher, x_t, t, SD), -raw, atol=1e-4)  # F_trig = -F_edm


def test_scd_trains_the_student_and_its_weight_and_never_the_teacher():
    teacher = tiny_teacher("unet", num_classes=2)
    m = get_method("scd")(teacher, get_method("scd").Config(warmup=0))
    x = torch.randn(4, 1, 8, 8) * 0.5
    loss = m.losses(Batch(4, x, torch.tensor([0, 1, 0, 1])), 0, {"student"})["student"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
    assert m.weight.linear.weight.grad.abs().sum() > 0
    for steps in (1, 2, 4):
        assert m.sample(torch.randn(2, 1, 8, 8), steps, torch.tensor([0, 1])).shape == (2, 1, 8, 8)
    with pytest.raises(FewstepError, match="t_mid"):
        get_method("scd")(teacher, get_method("scd").Config(t_mid=2.0))


def test_directional_derivative_refuses_unknown_modes():
    with pytest.raises(FewstepError, match="tangent"):
        directional_derivative(lambda x: x, (torch.ones(1),), (torch.ones(1),), "exact")


# --- ECT and TCM -------------------------------------------------------------------------------------
def test_ect_r_starts_at_the_diffusion_loss_and_shrinks_towards_t():
    t = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    r0 = ect_r(t, 0, q=2, k=8, b=1, ratio_limit=0.999)
    assert torch.equal(r0[:2], torch.zeros(2))  # small t: r = 0, the target is x0
    # r = t (1 - 2^-(s+1) (1 + 8 sigmoid(-t)))
    want = t * (1 - 0.5**4 * (1 + 8 * torch.sigmoid(-t))).clamp(0, 0.999)
    assert torch.allclose(ect_r(t, 3, 2, 8, 1, 0.999), want)
    late = ect_r(t, 30, 2, 8, 1, 0.999)
    assert torch.allclose(late, 0.999 * t)  # capped by ratio_limit


def test_ect_distance_and_weight_and_the_x0_target_at_r_zero():
    teacher = tiny_teacher("unet")
    ECT = get_method("ect")
    m = ECT(teacher, ECT.Config(huber_c=0.0))
    x0, n = torch.randn(3, 1, 8, 8) * 0.5, torch.randn(3, 1, 8, 8)
    t, r = torch.tensor([0.5, 2.0, 5.0]), torch.zeros(3)
    loss = m.pair_loss(x0, None, t, r, n)
    with torch.no_grad():
        online = m.student(x0 + t.reshape(-1, 1, 1, 1) * n, t)
    want = (online - x0).flatten(1).norm(dim=1) / t  # r = 0: the diffusion loss, weight 1/(t - 0)
    assert torch.allclose(loss, want, rtol=1e-5)
    assert torch.allclose(consistency_distance(torch.ones(1, 4), torch.zeros(1, 4), 1.0), torch.tensor([5**0.5 - 1]))


def test_ect_online_and_target_share_one_dropout_mask():
    teacher = tiny_teacher("unet")
    ECT = get_method("ect")
    m = ECT(teacher, ECT.Config(dropout=0.5))
    x0, n = torch.randn(4, 1, 8, 8) * 0.5, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.5, 1.0, 2.0, 4.0])
    # r = t (1 - 1e-6): with one mask the two passes agree to O(Δt); with two masks they would not
    d = m.pair_loss(x0, None, t, t * (1 - 1e-6), n) * (t * 1e-6)  # the distance itself
    assert d.max() < 1e-3
    with torch.no_grad():  # dropout is really on: two passes with their own masks differ
        a, b = (m.student(x0 + t.reshape(-1, 1, 1, 1) * n, t) for _ in range(2))
    assert consistency_distance(a, b, 0.0).min() > 1e-2


def test_tcm_targets_come_from_the_frozen_stage_one_below_the_transition():
    teacher = tiny_teacher("unet")
    TCM = get_method("tcm")
    m = TCM(teacher, student=get_method("ect")(teacher).student)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)  # the trained student moves away from stage 1
    x = torch.randn(2, 1, 8, 8)
    r = torch.tensor([0.5, 2.0])  # below and above t' = 1
    with torch.no_grad():
        got = m.target(x, r, None)
        assert torch.allclose(got[0], m.stage_one(x, r)[0]) and torch.allclose(got[1], m.student(x, r)[1])
        assert not torch.allclose(m.stage_one(x, r)[1], m.student(x, r)[1])
    assert m.emas()["stage_one"].decay == 1.0  # saved with checkpoints, never updated
    assert not any(p.requires_grad for p in m.stage_one.parameters())
    torch.manual_seed(0)
    log_t = truncated_student_t(5000, 0.01, 0.2, 0.0, math.log(80))
    assert log_t.min() >= 0 and log_t.max() <= math.log(80) and float((log_t < 0.2).float().mean()) > 0.3


def test_tcm_stage_one_targets_share_the_online_dropout_mask():
    teacher = tiny_teacher("unet")
    TCM = get_method("tcm")
    m = TCM(
        teacher,
        TCM.Config(dropout=0.5),
        student=get_method("ect")(teacher, get_method("ect").Config(dropout=0.5)).student,
    )
    m.stage_one.eval()  # as the engine keeps EMA copies
    x0, n = torch.randn(4, 1, 8, 8) * 0.5, torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 1.0)  # boundary samples: r < t', the target is stage 1's (equal to the student here)
    d = m.pair_loss(x0, None, t, t * (1 - 1e-6), n) * (t * 1e-6)
    assert d.max() < 1e-3 and not m.stage_one.training


def test_tcm_boundary_share_and_weight():
    teacher = tiny_teacher("unet")
    TCM = get_method("tcm")
    m = TCM(teacher, TCM.Config(boundary_weight=0.0, boundary_share=0.5), student=get_method("ect")(teacher).student)
    seen = {}
    m.pair_loss = lambda x0, cond, t, r, n: seen.update(t=t, r=r) or torch.arange(len(t), dtype=x0.dtype)
    loss = m.losses(Batch(8, torch.randn(8, 1, 8, 8)), 0, {"student"})["student"]
    assert torch.equal(seen["t"][:4], torch.ones(4)) and (seen["t"][4:] >= 1).all()
    assert (seen["r"][:4] < 1).all()  # boundary targets at r < t': from stage 1
    assert float(loss) == pytest.approx((4 + 5 + 6 + 7) / 4)  # lambda_b = 0: the boundary half drops out


def test_tcm_refuses_to_start_without_init_and_writes_nothing(tmp_path):
    from fewstep.train import distill

    with pytest.raises(FewstepError, match="--init"):
        distill(tiny_teacher("unet"), "tcm", max_steps=1, out=tmp_path / "tcm", data=tiny_images(), cpu=True)
    assert not (tmp_path / "tcm").exists()


def test_tcm_chains_from_an_ect_run_and_reloads_its_stage_one(tmp_path):
    from fewstep.train import distill, load_run

    teacher = tiny_teacher("unet", num_classes=2)
    common = dict(batch=4, sample_n=0, cpu=True, log_every=1, data=tiny_images())
    ect = distill(teacher, "ect", max_steps=2, out=tmp_path / "ect", **common)
    m = distill(teacher, "tcm", max_steps=2, out=tmp_path / "tcm", init=str(tmp_path / "ect"), **common)
    before = load_run(tmp_path / "ect", teacher=teacher)
    after = load_run(tmp_path / "tcm", teacher=teacher)
    x, s = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    with torch.no_grad():  # the stage-1 copy is the ect run's evaluation-EMA student, kept exactly
        assert torch.allclose(after.stage_one(x, s), before.student(x, s))
        assert torch.allclose(after.stage_one(x, s), m.stage_one(x, s))
    noise, cond = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    torch.manual_seed(1)
    a = after.sample(noise, 4, cond)
    torch.manual_seed(1)
    assert torch.allclose(a, m.sample(noise, 4, cond), atol=1e-5)  # 4 steps: levels below t' use stage 1
    assert json.loads((tmp_path / "tcm" / "config.json").read_text())["init"]["method"] == ect.name
    from fewstep.eval.sampling import student_sampler

    assert [student_sampler(after, k).nfe for k in (1, 2, 4)] == [1, 2, 4]  # stage-1 calls count too


# --- MeanFlow ----------------------------------------------------------------------------------------
class ExactAverageVelocity(nn.Module):
    """``u(z, r, t) = (z_t - z_r) / (t - r)`` of N(MU, S^2)'s exact flow in flow-matching time
    (``u = v`` at ``r = t``)."""

    def forward(self, z, r, t, cond=None):
        st, sr = t / (1 - t), r / (1 - r)
        x = z / (1 - t)[:, None]
        scale = ((S**2 + sr**2) / (S**2 + st**2)).sqrt()[:, None]
        z_r = (MU + scale * (x - MU)) * (1 - r)[:, None]
        v = flow_velocity(gauss_den, z, t)
        return torch.where((t - r)[:, None] > 1e-9, (z - z_r) / (t - r).clamp_min(1e-12)[:, None], v)


@pytest.mark.parametrize("objective", ["meanflow", "imf"])
@pytest.mark.parametrize("tangent", ["jvp", "fd"])
def test_meanflow_identity_holds_for_the_exact_flow(objective, tangent):
    MF = get_method("meanflow")
    m = MF(tiny_teacher(), MF.Config(objective=objective, tangent=tangent, fd_eps=1e-6, norm_c=1.0))
    m.teacher, m.velocity_teacher = gaussian(), gaussian()  # float64 throughout
    m.student = ExactAverageVelocity()
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.2, 0.9, 8, dtype=torch.float64)
    r = t * torch.linspace(0.0, 0.9, 8, dtype=torch.float64)
    loss = m.per_sample_loss(x0, None, r, t, torch.randn(8, 3, generator=g, dtype=torch.float64))
    assert loss.max() < (1e-16 if tangent == "jvp" else 1e-8)
    # a student that ignores r (the instantaneous velocity everywhere) violates it
    m.student = lambda z, rr, tt, cond=None: flow_velocity(gauss_den, z, tt)
    assert m.per_sample_loss(x0, None, r, t, torch.randn(8, 3, generator=g, dtype=torch.float64))[1:].min() > 1e-4


def test_meanflow_one_step_with_the_exact_average_velocity_is_the_exact_flow():
    MF = get_method("meanflow")
    m = MF(tiny_teacher())
    m.teacher, m.student = gaussian(), ExactAverageVelocity()
    noise = torch.randn(5, 3, dtype=torch.float64)
    x = m.sample(noise, steps=1)
    assert torch.allclose(x, exact_x0(noise * 80.0, torch.full((5,), 80.0, dtype=torch.float64)), atol=1e-9)
    assert torch.allclose(m.sample(noise, steps=2), x, atol=1e-9)


def test_meanflow_student_starts_at_the_teachers_velocity_and_trains():
    teacher = tiny_teacher("unet", num_classes=2)
    MF = get_method("meanflow")
    m = MF(teacher, MF.Config(equal_share=0.0))  # r = t everywhere would give a zero loss at the start
    z, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        assert torch.allclose(m.student(z, t * 0.3, t, None), flow_velocity(teacher, z, t), atol=1e-5)
    x = torch.randn(4, 1, 8, 8) * 0.5
    m.losses(Batch(4, x, torch.tensor([0, 1, 0, 1])), 0, {"student"})["student"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    emb = m.student.net.net.embed.extra_mlps[0][-1].weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0  # the h = t - r input learns
