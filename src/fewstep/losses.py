"""The losses several methods share, in one place — small pure functions over tensors.

- :func:`edm_weight` / :func:`edm_loss`: EDM's denoising loss, ``lambda(sigma) = (sigma^2 +
  sigma_d^2) / (sigma sigma_d)^2`` times the per-pixel squared error of ``D(x0 + sigma eps, sigma)``
  against ``x0`` (Karras et al. 2022, arXiv 2206.00364, Eq. 2 and Table 1). Teachers train with it
  (``denoise``), fake scores track the generator with it (DMD, DMD2, SiD, Diff-Instruct) and CTM
  adds it as its DSM term.
- :func:`loss_weight` and :func:`weighted_mse`: per-sample weights of an x0-space squared error —
  progressive distillation's truncated SNR ``max(SNR, 1)`` (Salimans & Ho 2022, Sec. 4), EDM's, or
  none — and the weighted mean the trajectory methods minimise.
- :func:`regression_loss`: per-pixel L2 / L1 between a prediction and a stored target (KD, DMD's
  regression term).
- :func:`dm_gradient`: the distribution-matching direction of DMD and DMD2, ``(mu_fake -
  mu_real) / mean|x - mu_real|`` (Yin et al. 2024, arXiv 2311.18828, Eq. 7-8) and
  :func:`dm_loss`, whose gradient in ``x`` it is (up to the pixel count).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.denoiser import append_dims, as_sigma
from fewstep.errors import FewstepError

REGRESSION = ("l2", "l1")
WEIGHTINGS = ("snr_trunc", "edm", "constant")


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` (Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(model: Any, x0: Tensor, cond: Any, sigma: Tensor, noise: Tensor | None = None) -> Tensor:
    """Batch mean of ``lambda(sigma) * mean_pixels (D(x0 + sigma eps, sigma) - x0)^2`` for a denoiser
    ``model(x, sigma, cond)``; ``noise`` defaults to fresh Gaussian noise."""
    sigma = as_sigma(sigma, x0)
    eps = torch.randn_like(x0) if noise is None else noise
    D = model(x0 + append_dims(sigma, x0.ndim) * eps, sigma, cond)
    return (edm_weight(sigma, model.sigma_data) * (D - x0).pow(2).flatten(1).mean(1)).mean()


def loss_weight(sigma: Tensor, kind: str = "snr_trunc", sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight of an x0-space squared error. ``snr_trunc``: ``max(SNR, 1)`` with
    ``SNR = 1/sigma^2`` (Salimans & Ho 2022, Sec. 4); ``edm``: :func:`edm_weight` (TRACT's EDM
    variant); ``constant``: 1."""
    if kind == "snr_trunc":
        return sigma.pow(-2).clamp_min(1.0)
    if kind == "edm":
        return edm_weight(sigma, sigma_data)
    if kind == "constant":
        return torch.ones_like(sigma)
    raise FewstepError(f"unknown weighting {kind!r}; use {', '.join(WEIGHTINGS)}")


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``mean_b w_b * mean_dims (pred - target)^2``."""
    return (weight * (pred - target).square().flatten(1).mean(1)).mean()


def regression_loss(pred: Tensor, target: Tensor, kind: str = "l2") -> Tensor:
    """Mean over the batch of the per-sample pixel-mean L2 (squared) or L1 error."""
    diff = (pred - target).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1).mean()
    if kind == "l1":
        return diff.abs().mean(1).mean()
    raise FewstepError(f"unknown regression loss {kind!r}; use l2 or l1 (LPIPS needs downloaded VGG weights)")


@torch.no_grad()
def dm_gradient(x: Tensor, pred_real: Tensor, pred_fake: Tensor) -> Tensor:
    """DMD's distribution-matching direction at generator samples ``x``: ``(mu_fake - mu_real) / w``
    with the per-sample normaliser ``w = mean_pixels |x - mu_real|`` (Eq. 8's ``||mu_base - x||_1 /
    (C S)``); non-finite entries become 0."""
    weight = (x - pred_real).abs().flatten(1).mean(1)
    return torch.nan_to_num((pred_fake - pred_real) / append_dims(weight, x.ndim))


def dm_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 || x - sg(x - grad) ||^2`` (pixel mean): its gradient in ``x`` is ``grad / numel``."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())
