import math

import pytest
import torch

from fewstep import solvers
from fewstep.denoiser import CallCounter
from fewstep.errors import FewstepError
from fewstep.schedules import karras_sigmas
from fewstep.teachers.analytic import GaussianMixture


def _errors(model, solver, x, exact, ns):
    out = []
    for n in ns:
        sig = karras_sigmas(n + 1, 0.1, 10.0)[:-1]  # n steps from 10 to 0.1
        y = solvers.SOLVERS[solver](model, x * 10.0, sig)
        out.append(float((y - exact).pow(2).mean().sqrt()))
    return out


@pytest.fixture
def start(mixture64):
    return torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_single_gaussian_exact_flow_matches_reference():
    g = GaussianMixture(torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.4)
    x = torch.randn(8, 2, dtype=torch.float64) * 5
    y = solvers.reference(g, x, torch.tensor([5.0, 0.05], dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert torch.allclose(y, g.exact_flow(x, 5.0, 0.05), atol=1e-7)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_solver_order_of_accuracy(mixture64, start, solver, order):
    exact = solvers.reference(
        mixture64, start * 10.0, torch.tensor([10.0, 0.1], dtype=torch.float64), rtol=1e-11, atol=1e-11
    )
    errs = _errors(mixture64, solver, start, exact, [16, 32, 64])
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.35 for r in rates), (solver, errs, rates)


def test_dpmpp_beats_euler_at_equal_nfe(mixture64, start):
    exact = solvers.reference(
        mixture64, start * 10.0, torch.tensor([10.0, 0.1], dtype=torch.float64), rtol=1e-11, atol=1e-11
    )
    for n in (4, 8, 16):
        (e_euler,) = _errors(mixture64, "euler", start, exact, [n])
        (e_dpm,) = _errors(mixture64, "dpmpp_2m", start, exact, [n])
        assert e_dpm < 0.5 * e_euler, (n, e_dpm, e_euler)


@pytest.mark.parametrize("solver,steps", [("euler", 5), ("heun", 5), ("dpmpp_2m", 7), ("heun", 18), ("heun", 1)])
def test_nfe_is_reported_and_predicted(mixture64, solver, steps):
    noise = torch.randn(3, 2, dtype=torch.float64)
    x, nfe = solvers.sample(mixture64, noise, solver, steps)
    assert nfe == solvers.nfe(solver, steps)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    assert solvers.nfe("heun", 18) == 35


def test_reference_counts_its_evaluations(mixture64):
    x, nfe = solvers.sample(mixture64, torch.randn(3, 2, dtype=torch.float64), "reference")
    assert nfe > 10 and torch.isfinite(x).all()


def test_euler_equals_ddim_update(mixture64):
    """Euler in sigma-space is deterministic DDIM: x' = x0 + (s'/s)(x - x0)."""
    x = torch.randn(5, 2, dtype=torch.float64) * 3
    sig = torch.tensor([3.0, 1.2], dtype=torch.float64)
    x0 = mixture64(x, torch.full((5,), 3.0, dtype=torch.float64))
    assert torch.allclose(solvers.euler(mixture64, x, sig), x0 + 0.4 * (x - x0), atol=1e-12)


def test_callback_and_counter(mixture64):
    seen = []
    with CallCounter(mixture64) as counter:
        solvers.heun(
            mixture64,
            torch.randn(2, 2, dtype=torch.float64) * 80,
            karras_sigmas(4, 0.002, 80.0),
            callback=lambda i, x, x0, s: seen.append(i),
        )
    assert seen == [0, 1, 2, 3] and counter.calls == 7


def test_bad_solver_and_steps():
    with pytest.raises(FewstepError, match="unknown solver 'rk4'"):
        solvers.get_solver("rk4")
    with pytest.raises(FewstepError, match="steps must be an integer >= 1"):
        karras_sigmas(0)
