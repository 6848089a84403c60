"""Building blocks shared by the consistency-style trajectory methods (CD/LCM and CTM); a helper,
not a method.

- :func:`ode_step`: one step of the teacher's probability-flow ODE ``dx/dsigma = (x - D(x))/sigma``
  with a *per-sample* pair of noise levels (the loss draws a different pair for every sample;
  :mod:`fewstep.solvers` steps a whole batch along one grid). ``heun`` is Karras et al. 2022
  (arXiv 2206.00364) Algorithm 1 without churn, as the CM and CTM reference code's
  ``heun_solver``; ``euler`` is deterministic DDIM.
- :func:`distance`: the per-sample distances the papers use (L2 / L1 as ``mean_flat`` in
  openai/consistency_models; LCM's elementwise pseudo-Huber ``sqrt(d^2 + c^2) - c``).
- :func:`ascending_grid` and :func:`sampling_sigmas`: the Karras discretisation the losses draw
  from, and the default noise levels of few-step consistency / flow-map sampling.
- :func:`set_dropout`: the student's dropout rate (a teacher trained with dropout hands it to its
  copy; the consistency target runs without it, so a mismatch biases the loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.schedules import karras_sigmas

STEPPERS = ("heun", "euler", "ddim")
DISTANCES = ("l2", "l1", "huber")


def ode_step(den: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond: Any = None, solver: str = "heun") -> Tensor:
    """Move ``x`` from noise level ``t`` to ``t_next`` (both ``(B,)``, ``t_next > 0`` for Heun)."""
    ti, tn = append_dims(t, x.ndim), append_dims(t_next, x.ndim)
    d = (x - den(x, t, cond)) / ti
    x_euler = x + (tn - ti) * d
    if solver in ("euler", "ddim"):
        return x_euler
    if solver != "heun":
        raise FewstepError(f"unknown teacher solver {solver!r}; use one of {', '.join(STEPPERS)}")
    d_next = (x_euler - den(x_euler, t_next, cond)) / tn
    return x + (tn - ti) * (d + d_next) / 2


def distance(a: Tensor, b: Tensor, kind: str = "l2", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance ``(B,)``, averaged over pixels."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "huber":  # LCM / diffusers: mean(sqrt(d^2 + c^2) - c), elementwise
        return ((diff.pow(2) + huber_c**2).sqrt() - huber_c).mean(1)
    raise FewstepError(
        f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)} (LPIPS needs ImageNet weights, "
        "which fewstep does not download)"
    )


def ascending_grid(num_scales: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``t_1 = sigma_min < ... < t_N = sigma_max`` (CM paper Sec. 3; Karras et al. Eq. 5)."""
    if num_scales < 2:
        raise FewstepError(f"num_scales must be >= 2, got {num_scales}")
    return karras_sigmas(num_scales, sigma_min, sigma_max, rho)[:-1].flip(0)


def sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, given: tuple[float, ...] = ()) -> list[float]:
    """The ``steps`` noise levels a few-step sampler evaluates at, from ``sigma_max`` down.

    ``given`` lists the intermediate levels of the ``len(given) + 1``-step sampler explicitly (the
    CM paper tunes them, e.g. 0.821 for 2-step CIFAR-10); every other step count, and the default,
    uses the inner points of a ``steps + 1``-point Karras grid (rho = 7): 2 steps evaluate at
    ``sigma_max`` and ~2.5 (for sigma in [0.002, 80]).
    """
    if steps < 1:
        raise FewstepError(f"steps must be >= 1, got {steps}")
    if given and len(given) == steps - 1:
        mids = [float(s) for s in given]
        if any(not sigma_min <= s < sigma_max for s in mids) or mids != sorted(mids, reverse=True):
            raise FewstepError(f"intermediate sigmas must decrease within [{sigma_min}, {sigma_max}), got {mids}")
        return [float(sigma_max), *mids]
    grid = karras_sigmas(steps + 1, sigma_min, sigma_max)
    return [float(s) for s in grid[:steps]]


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FewstepError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


def expand_like(v: float | Tensor, x: Tensor) -> Tensor:
    """A ``(B,)`` tensor on ``x``'s device and dtype."""
    return torch.as_tensor(v, device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()


def set_dropout(module: nn.Module, p: float | None) -> None:
    """Set the dropout rate of every fewstep UNet block inside ``module``; ``None`` keeps it."""
    if p is None:
        return
    if not 0.0 <= p < 1.0:
        raise FewstepError(f"dropout must lie in [0, 1), got {p}")
    from fewstep.networks.unet import ResBlock, UNetConfig

    for m in module.modules():
        if isinstance(m, ResBlock):
            m.dropout = p
        if isinstance(getattr(m, "config", None), UNetConfig):
            m.config.dropout = p
