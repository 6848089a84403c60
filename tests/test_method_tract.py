import pytest
import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.methods import get_method
from fewstep.methods._rounds import x0_target
from fewstep.methods.tract import TRACT, TRACTConfig
from fewstep.solvers import euler, heun, ode_step
from fewstep.teachers.analytic import GaussianMixture
from pd_support import batch, engine_resume_matches, same, tiny_teacher, train


def _method(**kw):
    return TRACT(tiny_teacher(), TRACTConfig(**{"phases": (8, 2), "steps_per_phase": 3, **kw}))


@pytest.mark.parametrize("s0,s1", [(2.0, 0.7), (0.3, 0.0)])
def test_teacher_step_is_heun(mixture64, s0, s1):
    x = torch.randn(16, 2, dtype=torch.float64)
    full = lambda v: torch.full((16,), v, dtype=torch.float64)
    grid = torch.tensor([s0, s1], dtype=torch.float64)
    out = ode_step(mixture64, x, full(s0), full(s1), None, "heun")  # Euler where s1 = 0, as EDM's last step
    assert torch.allclose(out, heun(mixture64, x, grid), atol=1e-12, rtol=0)
    out = ode_step(mixture64, x, full(s0), full(s1), None, "ddim")
    assert torch.allclose(out, euler(mixture64, x, grid), atol=1e-12, rtol=0)


class FlowOracle(nn.Module):
    """A denoiser whose DDIM step from fine-grid point j lands exactly on the exact flow at
    fine-grid point hop(j) — an exact teacher / self-teacher / student for a 1-Gaussian mixture."""

    def __init__(self, gauss: GaussianMixture, fine: torch.Tensor, hop) -> None:
        super().__init__()
        self.gauss, self.fine, self.hop = gauss, fine, hop
        self.sigma_data = 0.5

    def forward(self, x, sigma, cond=None):
        out = []
        for xi, si in zip(x, sigma, strict=True):
            j = int((self.fine - si).abs().argmin())
            assert torch.isclose(self.fine[j], si)
            s_to = self.fine[self.hop(j)]
            flow = self.gauss.exact_flow(xi[None], float(si), float(s_to))
            out.append(x0_target(xi[None], flow, si[None], s_to[None]))
        return torch.cat(out)


def test_exact_flow_has_zero_loss():
    """With teacher and self-teacher equal to the exact flow, the exact flow map is the optimum."""
    m = _method(teacher_solver="ddim", phases=(8, 4, 2))
    gauss = GaussianMixture(torch.tensor([[0.4, -0.2]], dtype=torch.float64), 0.3)
    data = lambda: batch(n=32, seed=3)
    m.schedule = m.schedule.__class__(m.phases, 10_000)  # phase p from iteration p * 10_000
    for p, seg in ((0, 2), (1, 4)):
        semi = 8 // m.phases[p]
        end = lambda j, seg=seg: (j // seg + 1) * seg
        m.teacher = FlowOracle(gauss, m.fine, lambda j, semi=semi: j + semi)
        setattr(m, f"student_{m.phases[p]}", m.teacher)
        m.self_teacher = FlowOracle(gauss, m.fine, end)
        m.student = FlowOracle(gauss, m.fine, end)
        step = p * 10_000
        assert m.schedule.round_of(step) == p
        assert float(m.losses(data(), step, {"student"})["student"]) < 1e-20
        m.student = FlowOracle(gauss, m.fine, lambda j: j + 1)  # a one-fine-step map is not optimal
        assert float(m.losses(data(), step, {"student"})["student"]) > 1e-6


def test_positions_cover_segments():
    m = _method(phases=(8, 4, 2))
    torch.manual_seed(0)
    j0, j1, j2 = m.positions(0, 4000)  # 8 -> 4: teacher steps of 1 fine step, segments of 2
    assert set(j0.tolist()) == set(range(8)) and torch.equal(j1, j0 + 1)
    assert torch.equal(j2, (j0 // 2 + 1) * 2)
    j0, j1, j2 = m.positions(1, 4000)  # 4 -> 2: teacher steps of 2, segments of 4
    assert set(j0.tolist()) == {0, 2, 4, 6} and torch.equal(j1, j0 + 2)
    assert torch.equal(j2, (j0 // 4 + 1) * 4)


def test_frozen_networks_get_no_gradient():
    m = _method()
    m.losses(batch(), 0, {"student"})["student"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
    for net in (m.teacher, m.self_teacher):
        assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_phases_switch_with_ema_teacher():
    m = _method(phases=(8, 4, 1))
    specs = m.emas()
    assert specs["self_teacher"].value(5) == 0.5
    assert [m.schedule.round_of(i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert m.phase_teacher(0) == (m.teacher, "heun") and m.phase_teacher(1) == (m.student_4, "ddim")
    mom = 1e-3 ** (1 / 3)
    assert specs["student_4"].value(0) == 0.0  # the phase's EMA starts as a copy
    assert specs["student_4"].value(2) == pytest.approx(1 - (1 - mom) / (1 - mom**3))
    assert specs["student_4"].value(3) == 1.0 and "student_1" not in specs
    train(m, lambda i: batch(seed=i), range(0, 3))
    assert not same(m.student_4, m.student) and not same(m.self_teacher, m.student)
    kept = [p.clone() for p in m.student_4.parameters()]
    train(m, lambda i: batch(seed=i), range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(kept, m.student_4.parameters(), strict=True))


def test_sampler_picks_the_distilled_student():
    m = _method(phases=(8, 4, 1))
    noise, labels = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 3, (4,))
    picked = {k: m.model_for(k)[0] for k in (1, 2, 4, 8)}
    assert picked == {1: m.student, 2: m.student, 4: m.student_4, 8: m.teacher}
    for k in (1, 2, 4):
        grid = m.model_for(k)[1]
        assert len(grid) == k + 1 and grid[0] == m.fine[0] and grid[-1] == 0
        assert torch.isfinite(m.sample(noise, k, labels)).all()


def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    m = _method(phases=(4, 1), steps_per_phase=10_000, lr=3e-3, sema=0.0)
    data = batch(n=64, seed=5)

    def held_out():
        torch.manual_seed(123)
        return float(m.losses(data, 0, {"student"})["student"].detach())

    before = held_out()
    train(m, lambda i: batch(n=64, seed=100 + i), range(0, 80))
    assert held_out() < 0.5 * before


def test_registered_and_bad_phases():
    assert get_method("tract") is TRACT
    for bad in ((8,), (8, 3), (8, 8, 1), (2, 4)):
        with pytest.raises(FewstepError):
            _method(phases=bad)


def test_engine_run_resumes_exactly(tmp_path):
    """Under the engine: the phase switch, the self-teacher and phase EMAs survive a resume."""
    m = engine_resume_matches(tmp_path, "tract", steps=8, split=5, phases=(4, 2, 1), steps_per_phase=3)
    assert m.schedule.round_of(7) == 1 and not same(m.student_2, m.student)
