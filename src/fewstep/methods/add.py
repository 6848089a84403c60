"""Adversarial Diffusion Distillation, ADD / SDXL-Turbo (Sauer et al. 2023, arXiv 2311.17042).

The student ``G`` (a copy of the teacher, an x0-predictor) is fed *real* images noised at a few
fixed student levels ``s`` (Sec. 3.1; SDXL-Turbo's timesteps 999/749/499/249) and trained with
(Sec. 3.2, Eq. 1-5)

    L = L_adv^G(x_hat) + lambda * L_distill(x_hat),        x_hat = G(x0 + s eps, s),
    L_adv^G = -E[ sum_k D_k(F_k(x_hat)) ]                                  (hinge generator loss)
    L_distill = E_{t, eps'} [ c(t) || x_hat - sg(D_teacher(x_hat + t eps', t)) ||^2 ]  (Eq. 5)

with ``c(t) = alpha_t``, the "exponential" weighting the paper prefers, and ``lambda = 2.5``. The
discriminator is trainable heads on a frozen feature network ``F`` of *clean* images (DINOv2 ViT-S
in the paper), class-conditioned by projection, trained with the hinge loss plus an R1 penalty
(``gamma`` x ``||grad D(x0)||^2 / 2``, Eq. 3). Sampling: one step from ``sigma_max z``, or re-noise the
prediction with fresh noise to the next student level (Sec. 3.1).

Levels: SDXL's timesteps map to sigma-space at equal SNR for this data (see
:mod:`fewstep.methods._adversarial`), the distillation level ``t`` is uniform over the 1000
timesteps and ``c(t) = alpha_t = 1/sqrt(1 + (sigma/sigma_data)^2)``.

Deviations: DINOv2 is replaced by a frozen feature network the user picks (``features``):
fewstep's shipped digits classifier on digits (its conv map and penultimate vector: note this is
the feature space FID is measured in), on a latent teacher whose VAE decodes to 1x32x32 (tier 2's
``builtin:mnist-sd``) the shipped MNIST classifier on the *decoded pixels* as the paper reads
DINOv2 on decoded images (gradients pass through the frozen decoder), the teacher's own network
otherwise, or any ``nn.Module``.
Heads are conditioned on the class label only (ADD adds text and image embeddings) and carry no
spectral normalisation. Optimiser settings (the paper gives none beyond the loss) are the usual GAN
ones, Adam with betas (0, 0.99).

The distance (checked against the paper; no training code was released): Sec. 3.2 defines
``d(x, y) = ||x - y||_2^2``, a squared norm summed over dimensions, so ``lambda = 2.5`` weighs the
distillation term by 2.5 x the number of dimensions per dimension against the adversarial term
(x64 on 8x8 digits, x16384 on SDXL's 4x64x64 latents). That is the default here
(``distill_reduce="sum"``); ``"mean"`` averages over dimensions instead (what fewstep did before, and
what the digits rows ``add``, ``add_tuned`` and ``add_d3_ema`` were measured with at
``distill_weight=10``, i.e. ``lambda = 10/64`` in the paper's units). Measured on digits (12 CPU
minutes, docs/benchmarks.md): the summed reading with ``lambda = 2.5`` collapses the student onto
few modes (FID ratio 43.6 at 1 NFE, recall 0.07) where the per-pixel mean with ``distill_weight=10``
gives 10.9 — with no released code the reduction stays the paper's text, and ``"mean"`` is one
option away.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network; the distillation target is still the
teacher's and the discriminator keeps its feature network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import register
from fewstep.methods._adversarial import (
    check_levels,
    decoded_shape,
    feature_network,
    few_step_levels,
    noised,
    pick,
    sd_levels,
    sd_sigmas,
)
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.discriminator import Discriminator, d_loss, g_loss, no_param_grad, r1_on
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class ADDConfig:
    timesteps: tuple[int, ...] = (999, 749, 499, 249)  # SDXL-Turbo's student timesteps (Sec. 3.1)
    student_sigmas: tuple[float, ...] = ()  # explicit levels (override timesteps)
    distill_weight: float = 2.5  # lambda (Eq. 5 / Sec. 4)
    distill_reduce: str = "sum"  # d(x, y) = ||x - y||_2^2 (Sec. 3.2), summed over dimensions; "mean": per pixel
    c_t: str = "exp"  # c(t) = alpha_t ("exponential", Sec. 3.2) or "constant"
    guidance: float = 1.0  # CFG scale of the teacher in L_distill
    features: str = (
        "auto"  # "classifier" on digits and 32x32 MNIST latents (decoded), else "teacher"; DINOv2's stand-in
    )
    feature_sigma: float = 0.0  # level at which "teacher" features read clean images (0 = sigma_min)
    gan_loss: str = "hinge"  # Sec. 3.2
    r1_gamma: float = 1e-5  # R1 weight gamma (unv. in the paper's text)
    head_hidden: int = 64
    lr: float = 1e-5  # student
    d_lr: float = 1e-4  # discriminator heads
    betas: tuple[float, float] = (0.0, 0.99)
    gen_every: int = 1  # the student steps on every gen_every-th iteration; D on every one
    dropout: float | None = 0.0  # student dropout (None: the teacher's)
    grad_clip: float | None = None


@register
class ADD(Method):
    name = "add"
    family = "adversarial"
    paper = "2311.17042"
    title = "Adversarial Diffusion Distillation (SDXL-Turbo)"
    needs_data = True
    Config = ADDConfig

    def __init__(
        self,
        teacher: Denoiser,
        config: ADDConfig | None = None,
        student: nn.Module | None = None,
        features: nn.Module | None = None,
    ) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.c_t not in ("exp", "constant"):
            raise FewstepError(f"unknown c(t) {c.c_t!r}; use exp or constant")
        if c.distill_reduce not in ("sum", "mean"):
            raise FewstepError(f"distill_reduce must be sum or mean, got {c.distill_reduce!r}")
        if c.gen_every < 1:
            raise FewstepError(f"gen_every must be >= 1, got {c.gen_every}")
        sd = teacher.sigma_data
        levels = c.student_sigmas or sd_levels(c.timesteps, sd, teacher.sigma_max)
        self.levels = check_levels(levels, teacher)
        self.default_steps = tuple(k for k in (1, 2, 4) if k <= len(self.levels))
        # L_distill's level: uniform over the 1000 SD timesteps, at equal SNR, within the teacher's range
        self.distill_sigmas = (sd_sigmas() * sd).clamp(teacher.sigma_min, teacher.sigma_max).float()
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        spec = c.features
        if features is not None:
            spec = features
        elif spec == "auto":
            shipped = tuple(teacher.sample_shape) == (1, 8, 8) or decoded_shape(teacher) == (1, 32, 32)
            spec = "classifier" if shipped else "teacher"
        self.features = feature_network(spec, teacher)
        self.discriminator = Discriminator(self.features, teacher.sample_shape, teacher.num_classes, c.head_hidden)
        self.real_score = cfg(teacher, c.guidance) if teacher.num_classes else teacher
        self.feature_level = c.feature_sigma or teacher.sigma_min

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "discriminator": self.discriminator}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "features": self.features}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        k = c.gen_every
        return {
            "student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k, offset=k - 1, grad_clip=c.grad_clip),
            "discriminator": OptimizerSpec(["discriminator"], lr=c.d_lr, betas=c.betas, grad_clip=c.grad_clip),
        }

    # --- maths ---------------------------------------------------------------------------------
    def generate(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Sec. 3.1: ``x_hat = G(x0 + s eps, s)`` at a student level ``s`` drawn per sample."""
        s = pick(self.levels, x0.shape[0], x0.device, x0.dtype)
        return self.student(noised(x0, s), s, labels)

    def disc(self, x: Tensor, labels: Tensor | None) -> Tensor:
        level = torch.full((x.shape[0],), self.feature_level, device=x.device, dtype=x.dtype)
        return self.discriminator(x, level, labels)

    def distill_loss(self, x_hat: Tensor, labels: Tensor | None) -> Tensor:
        """Eq. 5: ``c(t) || x_hat - sg(D_teacher(x_hat + t eps', t)) ||^2`` (summed over dimensions, or
        their mean with ``distill_reduce="mean"``), batch-mean."""
        table = self.distill_sigmas.to(x_hat)
        t = table[torch.randint(len(table), (x_hat.shape[0],), device=x_hat.device)]
        with torch.no_grad():
            target = self.real_score(noised(x_hat.detach(), t), t, labels)
        c_t = (1 + (t / self.teacher.sigma_data) ** 2).rsqrt() if self.config.c_t == "exp" else torch.ones_like(t)
        sq = (x_hat - target).square().flatten(1)
        return (c_t * (sq.sum(1) if self.config.distill_reduce == "sum" else sq.mean(1))).mean()

    def generator_loss(self, x_hat: Tensor, labels: Tensor | None) -> Tensor:
        """Eq. 4 for a student output ``x_hat``: hinge adversarial loss plus ``lambda`` x Eq. 5."""
        with no_param_grad(self.discriminator):
            adv = g_loss(self.disc(x_hat, labels), self.config.gan_loss)
        return adv + self.config.distill_weight * self.distill_loss(x_hat, labels)

    def discriminator_loss(self, x0: Tensor, fake: Tensor, labels: Tensor | None) -> Tensor:
        """Hinge loss on real ``x0`` vs ``sg(x_hat)``, plus ``gamma/2`` R1 at the real images (Eq. 3)."""
        c = self.config
        loss = d_loss(self.disc(x0, labels), self.disc(fake.detach(), labels), c.gan_loss)
        if c.r1_gamma > 0:
            loss = loss + c.r1_gamma / 2 * r1_on(lambda x: self.disc(x, labels), x0)
        return loss

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("add trains on real images; give --data (or use a data set)")
        x0, labels, out = batch.x, batch.labels, {}
        with torch.set_grad_enabled("student" in due):
            x_hat = self.generate(x0, labels)  # one student pass serves both losses
        if "student" in due:
            out["student"] = self.generator_loss(x_hat, labels)
        if "discriminator" in due:
            out["discriminator"] = self.discriminator_loss(x0, x_hat, labels)
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        return renoise_sample(self.student, noise, few_step_levels(self.levels, steps), cond)
