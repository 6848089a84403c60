"""f-distill: one-step diffusion distillation by f-divergence minimisation (Xu, Nie & Vahdat 2025,
"One-step Diffusion Models with f-Divergence Distribution Matching", arXiv 2502.15681).

DMD/DMD2 descend the reverse KL, whose gradient is the score difference at a noised generator
sample. For any f-divergence ``D_f(p || q) = E_q f(p/q)`` the gradient is the same score difference
reweighted per sample by ``h(r) = f''(r) r^2`` of the density ratio ``r = p_teacher / q_student``
at the noised sample (Theorem 1):

    grad_theta D_f = E[ h(r(x_t)) (s_fake(x_t) - s_real(x_t)) dx_t/dtheta ]

so the method is DMD2 (:mod:`fewstep.methods.dmd2`: fake score, two time-scale updates, GAN) with
one change in the generator's loss: the DM gradient of each sample is multiplied by ``h``. The
ratio comes from the GAN's discriminator, whose optimal logit is ``log p / q``:
``r = exp(clamp(logit, -10, 10))`` (no gradient), clipped to ``[0.1, 20]``, divided by the batch
mean of ``r`` in its noise-level bin (10 bins; FastGen's ``ratio_normalization`` with EMA rate 0),
and ``h`` is normalised to batch mean 1. Weights ``h(r)`` (FastGen ``all_f_div_weighting_function``):

    rkl (reverse KL, = DMD2) 1;  kl (forward KL) r;  js (Jensen-Shannon) r / (1 + r);
    sf (softened RKL) 1 / (1 + r);  sh (squared Hellinger) sqrt(r);  jf (Jeffreys) 1 + r;  neyman 1 / r

Defaults checked against FastGen's ``f_distill.py`` (a subclass of its DMD2) and
``config_f_distill*.py``: ``f = js`` (the config default; its CIFAR-10 config uses ``kl``); the
discriminator is a head on the **frozen teacher's** features (``gan_features = "teacher"``; IN64:
the bottleneck); generator GAN weight 1e-3; 5 fake-score updates per generator update; the ratio
from the same logits as the generator's GAN loss; everything else as DMD2 (lr, AdamW, warm-up,
noise-level ranges, no EMA — the raw generator is evaluated).

Deviations: the generator's logits (for its GAN loss and for ``r``) are read at the DM loss's own
noise level and noise, so the ratio weights the score difference at the point where it is
evaluated (DMD2 draws a separate GAN level); the head is DMD2's classifier head on the teacher's
bottleneck (FastGen's CIFAR-10 config reads three encoder levels); the bin means and the ``h`` mean
are per process (FastGen all-reduces them over the global batch).

A student that is not a teacher copy: as :mod:`fewstep.methods.dmd2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import append_dims
from fewstep.errors import FewstepError
from fewstep.losses import dm_gradient, dm_loss
from fewstep.methods import register
from fewstep.methods.base import Batch
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.networks.discriminator import g_loss, no_param_grad

WEIGHTS = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "sh": lambda r: r.sqrt(),
    "jf": lambda r: 1 + r,
    "neyman": lambda r: 1 / r,
}


@dataclass
class FDistillConfig(DMD2Config):
    f: str = "js"  # rkl | kl | js | sf | sh | jf | neyman
    gan_features: str = "teacher"  # FastGen: heads on the frozen teacher's encoder features
    gen_gan_weight: float = 1e-3
    logit_clamp: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    ratio_bins: int = 10  # per-bin normalisation of r (0 or 1: none)


def density_ratio(logits: Tensor, sigma: Tensor, sigma_min: float, sigma_max: float, c: FDistillConfig) -> Tensor:
    """``r = exp(logit)`` clamped and clipped, divided by the batch mean of ``r`` in its noise-level
    bin (equal bins of ``ln sigma`` over the teacher's range)."""
    r = logits.detach().clamp(-c.logit_clamp, c.logit_clamp).exp().clamp(c.ratio_min, c.ratio_max)
    if c.ratio_bins > 1:
        pos = (sigma.log() - math.log(sigma_min)) / (math.log(sigma_max) - math.log(sigma_min))
        idx = (pos * c.ratio_bins).long().clamp(0, c.ratio_bins - 1)
        sums = torch.zeros(c.ratio_bins, device=r.device, dtype=r.dtype).index_add_(0, idx, r)
        counts = torch.zeros_like(sums).index_add_(0, idx, torch.ones_like(r))
        r = r / (sums / counts.clamp_min(1))[idx]
    return r


def f_weight(r: Tensor, f: str) -> Tensor:
    """``h(r)`` normalised to batch mean 1."""
    h = WEIGHTS[f](r)
    return h / (h.mean() + 1e-6)


@register
class FDistill(DMD2):
    name = "fdistill"
    paper = "2502.15681"
    title = "f-distill: DMD2's gradient reweighted by an f-divergence's density-ratio weight"
    Config = FDistillConfig

    def __init__(self, teacher, config: FDistillConfig | None = None, student=None):
        super().__init__(teacher, config, student)
        if self.config.f not in WEIGHTS:
            raise FewstepError(f"unknown f {self.config.f!r}; use one of {', '.join(WEIGHTS)}")
        if not self.config.gan:
            raise FewstepError("f-distill estimates the density ratio with the GAN's discriminator; keep gan=True")

    def weighted_dm_loss(self, x: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """``(h-weighted DM loss, generator GAN loss)`` at one noised copy of ``x``."""
        c = self.config
        sigma = self.dm_sigma(x.shape[0], x.device).to(x)
        noise = torch.randn_like(x)
        with torch.no_grad():
            x_t = x + append_dims(sigma, x.ndim) * noise
            grad = dm_gradient(x, self.real_score(x_t, sigma, cond), self.fake_score(x_t, sigma, cond))
        with no_param_grad(self.fake_score, self.classifier):
            logits = self.logits(x, cond, sigma, noise)
        h = f_weight(density_ratio(logits, sigma, self.teacher.sigma_min, self.teacher.sigma_max, c), c.f)
        return dm_loss(x, grad * append_dims(h, x.ndim)), g_loss(logits, "nonsaturating")

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        out = super().losses(batch, step, due - {"student"})
        if "student" in due:
            z, cond = self._noise_and_labels(batch.size)
            dm, gan = self.weighted_dm_loss(self.generate(z, cond), cond)
            out["student"] = dm + self.config.gen_gan_weight * gan
        return out
