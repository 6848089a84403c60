"""UFOGen: one-step generation by a diffusion-GAN at large steps (Xu et al., CVPR 2024, arXiv 2311.09257).

A chain of a few large denoising steps ``t -> t-1`` (levels ``s_0 = sigma_max > ... > s_{K-1} > 0``,
with ``s_K = 0``). The generator is the teacher's x0-predictor, ``x'_0 = G(x_t, t)`` with
``x_t = x0 + s_t eps`` from real data ``x0``. UFOGen's objective (Sec. 4.1, Eq. 6-7, refining
SIDDM's Eq. 4) compares the *forward* marginals at the lower level rather than posteriors:

    min_G max_D  E[ log D(x_{t-1}, t-1) ] + E[ log(1 - D(x'_{t-1}, t-1)) ]
                 + lambda_KL * gamma_t * || x0 - x'_0 ||^2,
    x_{t-1} ~ q(x_{t-1} | x0) = x0 + s_{t-1} eps',   x'_{t-1} ~ q(x_{t-1} | x'_0) = x'_0 + s_{t-1} eps''.

The reconstruction term is the KL between those two Gaussians, ``||x0 - x'_0||^2 / (2 s_{t-1}^2)``,
so ``gamma_t = 1 / (2 s_{t-1}^2)``. Because the fake sample comes from ``q(. | x'_0)``, the
generator is pushed to produce clean samples already at the first step; sampling is one step
``G(sigma_max z)``, or several by re-noising the prediction to the next chain level (Sec. 4.2).
The discriminator is initialised from the teacher (UFOGen initialises it from the pre-trained
UNet): a trainable copy of the teacher's encoder read at level ``s_{t-1}``, plus heads.

Chain levels are SD's timesteps 999/749/499/249 at equal SNR for this data
(:mod:`fewstep.methods._adversarial`).

Deviations: ``gamma_t`` uses ``max(s_{t-1}, gamma_floor)`` so the last step, where ``s_{t-1} = 0``,
stays finite (the paper's chain ends at a small but non-zero level); the squared error is averaged
over pixels (not summed). Heads are class-conditioned by projection (the paper: text). Optimiser
settings (not given in the paper) are Adam with betas (0, 0.99).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network; the discriminator backbone is still
built from the teacher (an analytic teacher's: the warm-up network's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods import register
from fewstep.methods._adversarial import (
    check_levels,
    feature_network,
    few_step_levels,
    noised,
    sd_levels,
)
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.discriminator import Discriminator, d_loss, g_loss, no_param_grad, r1_on
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class UFOGenConfig:
    timesteps: tuple[int, ...] = (999, 749, 499, 249)  # the large-step chain (SD timesteps)
    chain_sigmas: tuple[float, ...] = ()  # explicit levels (override timesteps)
    rec_weight: float = 1.0  # lambda_KL
    gamma_floor: float = 0.5  # floor of s_{t-1} in gamma_t = 1 / (2 s_{t-1}^2)
    features: str = "teacher"  # discriminator backbone: the teacher's encoder ...
    trainable_backbone: bool = True  # ... initialised from the teacher and trained (paper)
    gan_loss: str = "nonsaturating"  # log D / log(1 - D) (Eq. 7)
    r1_gamma: float = 0.0
    head_hidden: int = 64
    lr: float = 1e-5
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    gen_every: int = 1
    dropout: float | None = 0.0  # student dropout (None: the teacher's)
    grad_clip: float | None = None


@register
class UFOGen(Method):
    name = "ufogen"
    family = "adversarial"
    paper = "2311.09257"
    title = "UFOGen: You Forward Once, large-scale text-to-image generation via diffusion GANs"
    needs_data = True
    Config = UFOGenConfig

    def __init__(
        self,
        teacher: Denoiser,
        config: UFOGenConfig | None = None,
        student: nn.Module | None = None,
        features: nn.Module | None = None,
    ) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.gen_every < 1:
            raise FewstepError(f"gen_every must be >= 1, got {c.gen_every}")
        levels = c.chain_sigmas or sd_levels(c.timesteps, teacher.sigma_data, teacher.sigma_max)
        self.levels = check_levels(levels, teacher)
        self.default_steps = tuple(k for k in (1, 2, 4) if k <= len(self.levels))
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        self.features = feature_network(features if features is not None else c.features, teacher, c.trainable_backbone)
        self.discriminator = Discriminator(self.features, teacher.sample_shape, teacher.num_classes, c.head_hidden)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "discriminator": self.discriminator}

    def frozen(self) -> dict[str, nn.Module]:
        if self.discriminator.backbone is not None:  # trained as part of the discriminator
            return {"teacher": self.teacher}
        return {"teacher": self.teacher, "features": self.features}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c, k = self.config, self.config.gen_every
        return {
            "student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k, offset=k - 1, grad_clip=c.grad_clip),
            "discriminator": OptimizerSpec(["discriminator"], lr=c.d_lr, betas=c.betas, grad_clip=c.grad_clip),
        }

    # --- maths ---------------------------------------------------------------------------------
    def chain_step(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        """A step ``t -> t-1`` of the chain per sample: ``(s_t, s_{t-1})``, with ``s_K = 0``."""
        chain = torch.tensor([*self.levels, 0.0], device=device, dtype=dtype)
        i = torch.randint(len(self.levels), (n,), device=device)
        return chain[i], chain[i + 1]

    def generate(self, x0: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x'_0 = G(x0 + s_t eps, s_t)``; returns it and ``s_{t-1}``."""
        s_t, s_prev = self.chain_step(x0.shape[0], x0.device, x0.dtype)
        return self.student(noised(x0, s_t), s_t, labels), s_prev

    def disc(self, x0: Tensor, s_prev: Tensor, labels: Tensor | None) -> Tensor:
        """``D(x_{t-1}, t-1)`` on a sample of ``q(x_{t-1} | x0)``."""
        return self.discriminator(noised(x0, s_prev), s_prev, labels)

    def generator_loss(self, x0: Tensor, x0_hat: Tensor, s_prev: Tensor, labels: Tensor | None) -> Tensor:
        """Eq. 7 for the generator: ``-log D(x'_{t-1})`` plus ``lambda_KL gamma_t ||x0 - x'_0||^2``."""
        c = self.config
        with no_param_grad(self.discriminator):
            adv = g_loss(self.disc(x0_hat, s_prev, labels), c.gan_loss)
        gamma = 0.5 / s_prev.clamp_min(c.gamma_floor) ** 2  # KL(q(.|x'_0) || q(.|x0)) per unit squared error
        rec = (gamma * (x0 - x0_hat).square().flatten(1).mean(1)).mean()
        return adv + c.rec_weight * rec

    def discriminator_loss(self, x0: Tensor, fake: Tensor, s_prev: Tensor, labels: Tensor | None) -> Tensor:
        """Eq. 7 for D: real ``q(x_{t-1} | x0)`` against ``q(x_{t-1} | sg(x'_0))`` at the same level."""
        c = self.config
        x_real = noised(x0, s_prev)
        loss = d_loss(self.discriminator(x_real, s_prev, labels), self.disc(fake.detach(), s_prev, labels), c.gan_loss)
        if c.r1_gamma > 0:
            loss = loss + c.r1_gamma / 2 * r1_on(lambda x: self.discriminator(x, s_prev, labels), x_real)
        return loss

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("ufogen trains on real images; give --data (or use a data set)")
        x0, labels, out = batch.x, batch.labels, {}
        with torch.set_grad_enabled("student" in due):
            x0_hat, s_prev = self.generate(x0, labels)  # one student pass serves both losses
        if "student" in due:
            out["student"] = self.generator_loss(x0, x0_hat, s_prev, labels)
        if "discriminator" in due:
            out["discriminator"] = self.discriminator_loss(x0, x0_hat, s_prev, labels)
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        return renoise_sample(self.student, noise, few_step_levels(self.levels, steps), cond)
