"""Probability-flow ODE solvers in sigma-space, one signature for all.

    solve(denoiser, x, sigmas, cond=None, callback=None) -> x

``x`` starts at ``sigmas[0]`` (usually ``sigma_max * z``), ``sigmas`` decreases to its last entry
(usually 0). The ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, Eq. 4 with
``s(t) = 1, sigma(t) = t``). ``callback(i, x, x0_hat, sigma)`` is called after each step.

Every solver's number of network evaluations (NFE) for a grid is given by ``nfe(name, steps)``;
:func:`sample` counts the evaluations it actually made and returns them.

Per-sample steps (the training losses draw a different pair of levels for every sample):
:func:`ode_step` (Heun = Karras et al. 2022 Algorithm 1 without churn, the CM/CTM reference code's
``heun_solver``, with an Euler last step to 0 as EDM; Euler = deterministic DDIM) and
:func:`ddim_step` from a given x0 prediction; :func:`ddim_sample` runs DDIM along a grid with an
x0-function (a student with its own conditioning bound in); :func:`renoise_sample` is the few-step
sampler of consistency models and ADD-style students (denoise, re-noise with fresh noise, repeat).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.denoiser import CallCounter, Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.schedules import karras_sigmas

Callback = Callable[[int, Tensor, Tensor, float], None] | None


def _d(denoiser: Denoiser, x: Tensor, sigma: float, cond: Any) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype), cond)


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, callback: Callback = None) -> Tensor:
    """Euler in sigma-space, identical to deterministic DDIM (Song et al. 2021, arXiv 2010.02502):
    ``x' = x0_hat + sigma' * (x - x0_hat) / sigma``."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _d(denoiser, x, s, cond)
        x = x0 + (s_next / s) * (x - x0)
        if callback is not None:
            callback(i, x, x0, s)
    return x


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, callback: Callback = None) -> Tensor:
    """Heun's 2nd-order method, Karras et al. (2022) Algorithm 1 with ``S_churn = 0``.

    The last step to ``sigma = 0`` is an Euler step, so ``n`` steps cost ``2n - 1`` NFE.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _d(denoiser, x, s, cond)
        d = (x - x0) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - _d(denoiser, x_next, s_next, cond)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x, x0, s)
    return x


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, cond: Any = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) in ``lambda = -ln sigma``.

    One NFE per step; the multistep correction uses the previous step's ``x0_hat``.
    """
    x0_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = _d(denoiser, x, s, cond)
        if s_next == 0:
            x = x0
        else:
            h = np.log(s) - np.log(s_next)
            D = x0
            if x0_prev is not None:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_next / s) * x - np.expm1(-h) * D
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, x, x0, s)
    return x


@torch.no_grad()
def reference(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Any = None,
    callback: Callback = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> Tensor:
    """High-accuracy answer of the ODE from ``sigmas[0]`` to ``sigmas[-1]`` (the teacher's "exact"
    sample): adaptive RK45 (scipy's Dormand–Prince) in ``u = ln sigma``, where
    ``dx/du = x - D(x, e^u)``. Only the grid's endpoints matter. A final 0 is reached, as on a
    Karras grid, by integrating to ``denoiser.sigma_min`` and taking ``D(x, sigma_min)``.
    """
    from scipy.integrate import solve_ivp

    s0, s1 = float(sigmas[0]), float(sigmas[-1])
    to_zero = s1 == 0
    s_end = max(s1, getattr(denoiser, "sigma_min", 0.002)) if to_zero else s1
    shape, dtype, device = x.shape, x.dtype, x.device

    def f(u: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        dx = xt - _d(denoiser, xt, float(np.exp(u)), cond)
        return dx.reshape(-1).to(torch.float64).cpu().numpy()

    y0 = x.reshape(-1).to(torch.float64).cpu().numpy()
    if s0 != s_end:
        sol = solve_ivp(f, (np.log(s0), np.log(s_end)), y0, method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        y0 = sol.y[:, -1]
    x = torch.from_numpy(y0).to(device=device, dtype=dtype).reshape(shape)
    if to_zero:
        x = _d(denoiser, x, s_end, cond)
    if callback is not None:
        callback(0, x, x, s0)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "ddim": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "reference": reference,
}


def get_solver(name: str) -> Callable[..., Tensor]:
    """Look a solver up by name, with a one-line error listing the valid names."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise FewstepError(f"unknown solver {name!r}; use one of {', '.join(SOLVERS)}") from None


def nfe(name: str, steps: int) -> int:
    """Network evaluations of ``steps`` steps of a solver on a grid ending in 0."""
    get_solver(name)
    if name == "heun":
        return 2 * steps - 1
    if name == "reference":
        raise FewstepError("the reference solver is adaptive; its NFE is counted, not predicted")
    return steps


def steps_for_nfe(name: str, target_nfe: int) -> int:
    """Largest number of steps whose NFE does not exceed ``target_nfe`` (at least 1)."""
    if name == "heun":
        return max(1, (target_nfe + 1) // 2)
    return max(1, target_nfe)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: Tensor,
    solver: str = "heun",
    steps: int = 18,
    cond: Any = None,
    sigmas: Tensor | None = None,
    rho: float = 7.0,
) -> tuple[Tensor, int]:
    """Sample from unit ``noise`` with a solver on a Karras grid; return ``(x0, nfe)``.

    ``noise`` is scaled by ``sigmas[0]`` (``denoiser.sigma_max`` on the default grid).
    """
    fn = get_solver(solver)
    if sigmas is None:
        sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, rho)
    with CallCounter(denoiser) as counter:
        x = fn(denoiser, noise * float(sigmas[0]), sigmas, cond)
    return x, counter.calls


# --- per-sample steps ------------------------------------------------------------------------------
STEPPERS = ("heun", "euler", "ddim")
X0Fn = Callable[[Tensor, Tensor], Tensor]  # (x, sigma (B,)) -> x0_hat


def ddim_step(x: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Deterministic DDIM (= Euler in sigma-space): ``x' = x0 + (s'/s)(x - x0)``; per-sample sigmas."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return x0 + ratio * (x - x0)


def ode_step(den: Callable[..., Tensor], x: Tensor, t: Tensor, t_next: Tensor, cond: Any = None,
             solver: str = "heun") -> Tensor:  # fmt: skip
    """Move ``x`` from noise level ``t`` to ``t_next`` (both ``(B,)``) with ``den(x, sigma, cond)``:
    ``heun`` where ``t_next > 0`` and an Euler step where ``t_next = 0``; ``euler``/``ddim``: Euler."""
    ti, tn = append_dims(t, x.ndim), append_dims(t_next, x.ndim)
    d = (x - den(x, t, cond)) / ti
    x_euler = x + (tn - ti) * d
    if solver in ("euler", "ddim"):
        return x_euler
    if solver != "heun":
        raise FewstepError(f"unknown teacher solver {solver!r}; use one of {', '.join(STEPPERS)}")
    safe = torch.where(t_next > 0, t_next, t)  # the Heun correction is discarded where t_next = 0
    d_next = (x_euler - den(x_euler, safe, cond)) / append_dims(safe, x.ndim)
    return torch.where(tn > 0, x + (tn - ti) * (d + d_next) / 2, x_euler)


@torch.no_grad()
def ddim_sample(model: X0Fn, noise: Tensor, grid: Tensor) -> Tensor:
    """DDIM along a decreasing ``grid`` (ending in 0) from ``grid[0] * noise``."""
    x = noise * float(grid[0])
    for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        sigma = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        x = ddim_step(x, model(x, sigma), sigma, torch.full_like(sigma, s_next))
    return x


@torch.no_grad()
def renoise_sample(denoiser: Callable[..., Tensor], noise: Tensor, levels: list[float], cond: Any = None,
                   extra: Tensor | None = None, sigma_min: float | None = None) -> Tensor:  # fmt: skip
    """``x0 = D(s_0 z, s_0)``; then ``x0 = D(x0 + std_i eps_i, s_i)`` for the other levels, with fresh
    noise each time: multistep consistency sampling (Song et al. 2023, arXiv 2303.01469, Algorithm 1:
    ``std_i = sqrt(s_i^2 - sigma_min^2)``) and the sampler of ADD, LADD, UFOGen and DMD2's multi-step
    student (``std_i = s_i``, ``sigma_min=None``). ``extra`` is passed on to the student (LCM's w')."""
    kw = {} if extra is None else {"extra": extra}
    sigma = torch.full((noise.shape[0],), float(levels[0]), device=noise.device, dtype=noise.dtype)
    x0 = denoiser(noise * levels[0], sigma, cond, **kw)
    for s in levels[1:]:
        std = s if sigma_min is None else (s**2 - sigma_min**2) ** 0.5
        x0 = denoiser(x0 + std * torch.randn_like(x0), torch.full_like(sigma, float(s)), cond, **kw)
    return x0
