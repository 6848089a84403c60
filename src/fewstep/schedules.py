"""Noise-level grids, training densities and curricula — small pure functions over tensors.

Grids are decreasing sigma sequences that end in 0, so a grid of ``n`` steps has ``n + 1``
entries. References: Karras et al. 2022 (arXiv 2206.00364, Eq. 5 and Sec. 5), Song & Dhariwal
2023 (iCT, arXiv 2310.14189, Sec. 3.3), Geng et al. 2024 (ECT, arXiv 2406.14548, Sec. 3),
Esser et al. 2024 (SD3 logit-normal and shift, arXiv 2403.03206, Sec. 3.1 and 5.3.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep.errors import FewstepError


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise FewstepError(f"steps must be an integer >= 1, got {n!r}")


# --- sampling grids ------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) Eq. 5: ``n`` steps from ``sigma_max`` to ``sigma_min``, then 0."""
    _check_steps(n)
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ascending_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The ``n`` levels of :func:`karras_sigmas` without the final 0, ascending: ``t_1 = sigma_min <
    ... < t_n = sigma_max`` (the discretisation consistency losses and DMD2 draw levels from)."""
    if n < 2:
        raise FewstepError(f"num_scales must be >= 2, got {n}")
    return karras_sigmas(n, sigma_min, sigma_max, rho)[:-1].flip(0)


# --- training densities --------------------------------------------------------------------------


def sample_lognormal(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None
) -> Tensor:
    """EDM's training density: ``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1)."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def sample_logit_normal(
    n: int, m: float = 0.0, s: float = 1.0, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """SD3's logit-normal density of rectified-flow time: ``t = sigmoid(m + s u)``, ``u ~ N(0, 1)``
    (Esser et al. 2024, Sec. 3.1; LADD's discriminator levels, Sauer et al. 2024, Sec. 3.2)."""
    return torch.sigmoid(torch.randn(n, device=device, dtype=dtype) * s + m)


# --- curricula -----------------------------------------------------------------------------------


def halving_schedule(start: int, end: int = 1) -> list[int]:
    """Progressive distillation's step counts: ``start, start/2, ..., end`` (powers of two)."""
    if start < end or start & (start - 1) or end & (end - 1):
        raise FewstepError(f"start ({start}) and end ({end}) must be powers of two with start >= end")
    out = [start]
    while out[-1] > end:
        out.append(out[-1] // 2)
    return out


def linear_warmup(k: int, steps: int) -> float:
    """Linear lr warm-up: ``(k + 1) / steps`` for the optimizer's step ``k`` until it reaches 1
    (``OptimizerSpec.lr_schedule`` with ``functools.partial(linear_warmup, steps=n)``)."""
    return min(1.0, (k + 1) / steps)
