"""Noise-level grids, training densities and curricula — small pure functions over tensors.

Grids are decreasing sigma sequences that end in 0, so a grid of ``n`` steps has ``n + 1``
entries. References: Karras et al. 2022 (arXiv 2206.00364, Eq. 5 and Sec. 5), Song & Dhariwal
2023 (iCT, arXiv 2310.14189, Sec. 3.3), Geng et al. 2024 (ECT, arXiv 2406.14548, Sec. 3),
Esser et al. 2024 (SD3 logit-normal and shift, arXiv 2403.03206, Sec. 3.1 and 5.3.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.conversions import flow_t_to_sigma, vp_sigmas
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


def vp_discrete_sigmas(alphas_cumprod: Tensor, n: int, spacing: str = "trailing") -> Tensor:
    """Sigmas of ``n`` of a DDPM model's discrete timesteps, as diffusers' schedulers pick them.

    ``spacing`` is ``trailing`` (includes the last timestep; Lin et al. 2023, arXiv 2305.08891),
    ``leading`` or ``linspace``; the grid ends in 0.
    """
    _check_steps(n)
    T = len(alphas_cumprod)
    if spacing == "trailing":
        ts = torch.arange(T, 0, -T / n).round().long() - 1
    elif spacing == "leading":
        ts = (torch.arange(0, n) * (T // n)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n).round().long().flip(0)
    else:
        raise FewstepError(f"unknown spacing {spacing!r}; use trailing, leading or linspace")
    sig = vp_sigmas(alphas_cumprod.to(torch.float64))[ts]
    return torch.cat([sig, sig.new_zeros(1)])


def flow_sigmas(n: int, shift: float = 1.0, t_max: float = 1.0) -> Tensor:
    """Flow-matching grid: ``t`` uniform in ``[t_max, 0]``, shifted as SD3 (Esser et al. 2024).

    ``t' = shift * t / (1 + (shift - 1) * t)``; ``sigma = t' / (1 - t')``. ``t = 1`` maps to an
    infinite sigma, so pass ``t_max < 1`` or handle the first step in the flow parameterisation.
    """
    _check_steps(n)
    t = torch.linspace(t_max, 0, n + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return flow_t_to_sigma(t)


# --- training densities --------------------------------------------------------------------------


def sample_lognormal(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None
) -> Tensor:
    """EDM's training density: ``ln sigma ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1)."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def sample_logit_normal_t(
    n: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """SD3's logit-normal flow time ``t = sigmoid(N(mean, std^2))`` in (0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)


def sample_karras_index(n: int, num_scales: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform index ``i`` in ``[0, num_scales - 2]`` of an ascending Karras grid of
    ``num_scales`` points, as consistency distillation draws its adjacent pair (i, i+1)."""
    return torch.randint(0, num_scales - 1, (n,), generator=generator)


def karras_grid_ascending(
    num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Ascending Karras grid ``t_1 = sigma_min < ... < t_N = sigma_max`` (CM paper, Sec. 3)."""
    return karras_sigmas(num_scales, sigma_min, sigma_max, rho)[:-1].flip(0)


def ict_lognormal_index(
    n: int,
    sigmas_ascending: Tensor,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """iCT's discretised log-normal over adjacent grid pairs (Song & Dhariwal 2023, Sec. 3.5):
    ``p(i) ∝ erf((ln s_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln s_i - P_mean)/(sqrt2 P_std))``."""
    log_s = sigmas_ascending.log()
    cdf = torch.special.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return torch.multinomial(probs.float(), n, replacement=True, generator=generator)


# --- curricula -----------------------------------------------------------------------------------


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum N(k) (Song & Dhariwal 2023, Eq. 8)."""
    k_prime = math.floor(total_steps / (math.log2(s1 / s0) + 1))
    return min(s0 * 2 ** math.floor(step / max(k_prime, 1)), s1) + 1


def ect_r(t: Tensor, stage: int, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's shrinking ``r(t)`` (Geng et al. 2024, Sec. 3.3): ``r = t (1 - 2^-(stage+1) n(t))``
    with ``n(t) = 1 + k * sigmoid(-b t)``; ``r`` approaches ``t`` as the stage grows."""
    n_t = 1 + k * torch.sigmoid(-b * t)
    return (t * (1 - n_t / 2 ** (stage + 1))).clamp_min(0)


def halving_schedule(start: int, end: int = 1) -> list[int]:
    """Progressive distillation's step counts: ``start, start/2, ..., end`` (powers of two)."""
    if start < end or start & (start - 1) or end & (end - 1):
        raise FewstepError(f"start ({start}) and end ({end}) must be powers of two with start >= end")
    out = [start]
    while out[-1] > end:
        out.append(out[-1] // 2)
    return out
