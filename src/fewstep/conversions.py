"""Conversions between diffusion formulations and fewstep's sigma-space.

Every formulation writes a noisy sample as ``x_t = a(t) * x0 + s(t) * eps``. Dividing by ``a``
gives the variance-exploding form ``x = x0 + sigma * eps`` with ``sigma = s / a`` — the space all
fewstep solvers and methods work in (Karras et al. 2022, arXiv 2206.00364, Sec. 2 and Table 1).

| formulation            | a(t)            | s(t)              | sigma             |
|------------------------|-----------------|-------------------|-------------------|
| VP / DDPM              | sqrt(abar_t)    | sqrt(1 - abar_t)  | sqrt((1-abar)/abar)|
| flow matching (RF)     | 1 - t           | t                 | t / (1 - t)       |
| EDM / VE               | 1               | sigma             | sigma             |
| TrigFlow (sCM)         | cos(t)          | sin(t)            | tan(t)            |

Model outputs (eps-, v-, x0-prediction, flow velocity) become ``x0_hat`` with
:func:`x0_from_output`. Only maths lives here: no training losses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from fewstep.denoiser import append_dims
from fewstep.errors import FewstepError

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


# --- VP / DDPM -----------------------------------------------------------------------------------


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """Sigma of every discrete DDPM timestep: ``sigma_t = sqrt((1 - abar_t) / abar_t)``."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def vp_scale(sigma: Tensor) -> Tensor:
    """``a = sqrt(abar) = 1 / sqrt(1 + sigma^2)``: maps sigma-space ``x`` to ``x_t = a * x``."""
    return (1 + sigma**2).rsqrt()


def vp_to_sigma_x(x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, sigma)`` in sigma-space from a VP sample ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps``."""
    a = alpha_bar.sqrt()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return x_t / append_dims(a, x_t.ndim), sigma


def sigma_to_vp_x(x: Tensor, sigma: Tensor) -> Tensor:
    """VP sample ``x_t = a * x`` from a sigma-space sample."""
    return x * append_dims(vp_scale(sigma), x.ndim)


def sigma_to_timestep(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Continuous DDPM timestep of ``sigma`` by linear interpolation in log-sigma.

    The inverse of :func:`timestep_to_sigma`; as in k-diffusion's ``DiscreteSchedule``, it lets a
    discrete-time network be evaluated between its training timesteps.
    """
    log_sigmas = vp_sigmas(alphas_cumprod.to(torch.float64)).log()  # increasing in t
    log_sigma = sigma.to(torch.float64).clamp_min(1e-20).log()
    log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
    idx = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = (log_sigma - lo) / (hi - lo)
    return ((idx - 1) + w).to(sigma.dtype)


def timestep_to_sigma(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sigma at a (possibly fractional) DDPM timestep, interpolating log-sigma linearly."""
    log_sigmas = vp_sigmas(alphas_cumprod.to(torch.float64)).log()
    t = t.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()


# --- flow matching / rectified flow --------------------------------------------------------------


def flow_t_to_sigma(t: Tensor) -> Tensor:
    """``sigma = t / (1 - t)`` for ``x_t = (1 - t) x0 + t eps``."""
    return t / (1 - t)


def sigma_to_flow_t(sigma: Tensor) -> Tensor:
    """``t = sigma / (1 + sigma)``, the inverse of :func:`flow_t_to_sigma`."""
    return sigma / (1 + sigma)


def flow_to_sigma_x(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, sigma)`` in sigma-space from a flow-matching sample."""
    return x_t / append_dims(1 - t, x_t.ndim), flow_t_to_sigma(t)


def sigma_to_flow_x(x: Tensor, sigma: Tensor) -> Tensor:
    """Flow-matching sample ``x_t = x / (1 + sigma)`` from a sigma-space sample."""
    return x / append_dims(1 + sigma, x.ndim)


def flow_time_velocity(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """The flow-matching velocity ``dx_t/dt = (x_t - x0) / t`` of a sigma-space point ``x`` (``x_t = x / (1 + sigma)``)
    and its x-prediction (:func:`fewstep.methods.meanflow.flow_velocity` takes a denoiser and flow-space ``z``)."""
    t = append_dims(sigma / (1 + sigma), x.ndim)
    return (x / (1 + append_dims(sigma, x.ndim)) - x0) / t


def pair_line(y: Tensor, z: Tensor, sigma: Tensor, sigma_max: float) -> Tensor:
    """The straight line of a (noise ``z``, ODE answer ``y``) pair in sigma-space,
    ``(1 - sigma/sigma_max) y + sigma z``: ``sigma_max z`` at the top, ``y`` at 0 (reflow, TraFlow)."""
    s = append_dims(sigma, y.ndim)
    return (1 - s / sigma_max) * y + s * z


def uniform_flow_sigmas(steps: int, sigma_max: float, t_min: float = 0.0) -> Tensor:
    """The sigma grid of ``steps`` Euler steps uniform in flow time from ``t_max`` to ``t_min`` (0)."""
    t_max = sigma_max / (1 + sigma_max)
    t = torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    return flow_t_to_sigma(t)


# --- TrigFlow (sCM) ------------------------------------------------------------------------------


def trig_t_to_sigma(t: Tensor, sigma_data: float = 1.0) -> Tensor:
    """TrigFlow ``x_t = cos(t) x0 + sin(t) eps`` (data scaled by ``1/sigma_data``): ``sigma = tan t``.

    With sCM's convention ``x_t = cos(t) x0 + sin(t) sigma_d z`` the sigma-space noise level is
    ``sigma_d * tan(t)``; pass ``sigma_data`` to get it.
    """
    return sigma_data * torch.tan(t)


def sigma_to_trig_t(sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """Inverse of :func:`trig_t_to_sigma`: ``t = arctan(sigma / sigma_data)``."""
    return torch.atan(sigma / sigma_data)


def trig_to_sigma_x(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, sigma)`` in sigma-space from a TrigFlow sample (unit noise scale)."""
    return x_t / append_dims(torch.cos(t), x_t.ndim), torch.tan(t)


def sigma_to_trig_x(x: Tensor, sigma: Tensor) -> Tensor:
    """TrigFlow sample ``x_t = cos(t) * x`` with ``t = arctan(sigma)``."""
    return x * append_dims(torch.cos(torch.atan(sigma)), x.ndim)


# --- model outputs -------------------------------------------------------------------------------


def x0_from_output(output: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction: Prediction) -> Tensor:
    """Convert a network output at ``x_t = a x0 + s eps`` into ``x0_hat``.

    Args:
        output: the network's prediction.
        x_t: the noisy input in the model's native scaling.
        a, s: per-sample signal and noise scales ``(B,)``.
        prediction: ``epsilon`` (eps), ``v_prediction`` (v = a eps - s x0, Salimans & Ho 2022,
            assumes a^2 + s^2 = 1), ``sample`` (x0) or ``flow`` (velocity v = eps - x0 for
            ``a = 1 - t, s = t``).
    """
    a, s = append_dims(a, x_t.ndim), append_dims(s, x_t.ndim)
    if prediction == "epsilon":
        return (x_t - s * output) / a
    if prediction == "v_prediction":
        return a * x_t - s * output
    if prediction == "sample":
        return output
    if prediction == "flow":
        return x_t - s * output
    raise FewstepError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTIONS)}")


def output_from_x0(x0: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction: Prediction) -> Tensor:
    """Inverse of :func:`x0_from_output`: the native output that corresponds to ``x0``."""
    a_, s_ = append_dims(a, x_t.ndim), append_dims(s, x_t.ndim)
    eps = (x_t - a_ * x0) / s_
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return a_ * eps - s_ * x0
    if prediction == "sample":
        return x0
    if prediction == "flow":
        return eps - x0
    raise FewstepError(f"unknown prediction type {prediction!r}; use one of {', '.join(PREDICTIONS)}")


def eps_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Sigma-space noise estimate ``eps = (x - x0) / sigma``."""
    return (x - x0) / append_dims(sigma, x.ndim)


def score_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Score of the noised density, ``grad log p_sigma(x) = (x0 - x) / sigma^2`` (Tweedie)."""
    return (x0 - x) / append_dims(sigma, x.ndim) ** 2


def velocity_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Probability-flow ODE velocity in sigma-space, ``dx/dsigma = (x - x0) / sigma``."""
    return eps_from_x0(x, x0, sigma)


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio ``1 / sigma^2`` (for VP: ``abar / (1 - abar)``)."""
    return sigma.pow(-2)


def logsnr_to_sigma(logsnr: Tensor) -> Tensor:
    """``sigma = exp(-logsnr / 2)``."""
    return torch.exp(-logsnr / 2)


def cosine_alphas_cumprod(n: int = 1000, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine ``alphas_cumprod`` (used by tests and tiny VP teachers)."""
    t = torch.arange(n + 1, dtype=torch.float64) / n
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = (f / f[0])[1:]
    return abar.clamp(1e-12, 1.0)


def linear_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear beta schedule as ``alphas_cumprod`` (float64)."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)
