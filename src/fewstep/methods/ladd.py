"""Latent Adversarial Diffusion Distillation, LADD / SD3-Turbo (Sauer et al. 2024, arXiv 2403.12015).

LADD keeps ADD's student (an x0-predictor fed noised data at a few student levels, Sec. 3) and
changes the discriminator and the data (Sec. 3.1-3.2):

- the discriminator's backbone is the frozen *teacher* itself: generated and real samples are
  re-noised to a level ``t_hat`` and the teacher's features at that level feed trainable heads
  (Fig. 2). ``t_hat`` follows a logit-normal density ``pi(t; m, s)`` in rectified-flow time with
  ``m = 1, s = 1`` -- biased to high noise, which favours global structure (Sec. 3.2, Fig. 4);
- the "real" images are *synthetic*: samples of the teacher (Sec. 3.3), generated once here with
  the teacher's ODE solver (:mod:`fewstep.pairs`; shared with KD's cache);
- there is no distillation loss: the generator loss is adversarial only,
  ``L_G = -E[D(F_teacher(x_hat + t_hat eps, t_hat))]``, the discriminator's the hinge loss.

Student levels are ADD's (SD's timesteps 999/749/499/249 at equal SNR for this data,
:mod:`fewstep.methods._adversarial`); sampling re-noises between them (ADD's sampler). SD3-Turbo's
rectified-flow times 1, 0.75, 0.5, 0.25 are available (``times``), but their first level, pure
noise, leaves a one-step student with no signal to start from: on 8x8 digits its output begins as
the class mean and the GAN must unfold all diversity from the noise alone.

Deviations: heads are class-conditioned by projection (the paper conditions on pooled text and the
noise level; here the level reaches the heads through the teacher's features only); an optional
approximate-R1 penalty (APT, arXiv 2501.08316; FastGen's LADD) is off by default; teacher data
comes from the teacher's Heun sampler at guidance 1 (``guidance`` sets CFG), 10k samples by default.
Optimiser settings are the usual GAN ones, Adam with betas (0, 0.99).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network; the discriminator still reads the
teacher's features (an analytic teacher's: the frozen warm-up network's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conversions import flow_t_to_sigma
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods import register
from fewstep.methods._adversarial import (
    check_levels,
    feature_network,
    few_step_levels,
    noised,
    pick,
    rf_levels,
    sd_levels,
)
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.discriminator import Discriminator, approx_r1_penalty, d_loss, g_loss, no_param_grad
from fewstep.pairs import Pairs, PairSource
from fewstep.schedules import sample_logit_normal
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class LADDConfig:
    timesteps: tuple[int, ...] = (999, 749, 499, 249)  # ADD's student levels (SD timesteps, equal SNR)
    times: tuple[float, ...] = ()  # SD3-Turbo's RF times instead, e.g. 1,0.75,0.5,0.25 (t = 1 -> sigma_max)
    student_sigmas: tuple[float, ...] = ()  # explicit levels (override both)
    disc_m: float = 1.0  # logit-normal location of t_hat (Sec. 3.2: m = 1, s = 1)
    disc_s: float = 1.0
    features: str = "teacher"  # teacher features at every encoder level; "teacher-bottleneck" = middle only
    gan_loss: str = "hinge"
    ar1_weight: float = 0.0  # approximate R1 (APT); 0 = off
    ar1_sigma: float = 0.01  # its input perturbation
    head_hidden: int = 64
    lr: float = 1e-5
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    gen_every: int = 1
    dropout: float | None = 0.0  # student dropout (None: the teacher's)
    grad_clip: float | None = None
    pairs: str | None = None  # folder of teacher samples (`fewstep pairs`); None = generate into the cache
    num_pairs: int = 10000
    solver: str = "heun"
    solver_steps: int = 18
    guidance: float = 1.0


@register
class LADD(Method):
    name = "ladd"
    family = "adversarial"
    paper = "2403.12015"
    title = "Latent Adversarial Diffusion Distillation (SD3-Turbo)"
    needs_data = False  # trains on teacher samples it generates (or a pairs folder)
    Config = LADDConfig

    def __init__(
        self,
        teacher: Denoiser,
        config: LADDConfig | None = None,
        student: nn.Module | None = None,
        features: nn.Module | None = None,
        pairs: Pairs | None = None,
    ) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.gen_every < 1:
            raise FewstepError(f"gen_every must be >= 1, got {c.gen_every}")
        sd = teacher.sigma_data
        levels = c.student_sigmas or (rf_levels(c.times, sd, teacher.sigma_max) if c.times else None)
        self.levels = check_levels(levels or sd_levels(c.timesteps, sd, teacher.sigma_max), teacher)
        self.default_steps = tuple(k for k in (1, 2, 4) if k <= len(self.levels))
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        self.features = feature_network(features if features is not None else c.features, teacher)
        self.discriminator = Discriminator(self.features, teacher.sample_shape, teacher.num_classes, c.head_hidden)
        self._pairs = PairSource(teacher, c, pairs)  # read at the first loss (load_run needs none)

    @property
    def pairs(self) -> Pairs:
        """The teacher samples LADD trains on (generated into the cache when first needed)."""
        return self._pairs.get()

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "discriminator": self.discriminator}

    def frozen(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "features": self.features}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c, k = self.config, self.config.gen_every
        return {
            "student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k, offset=k - 1, grad_clip=c.grad_clip),
            "discriminator": OptimizerSpec(["discriminator"], lr=c.d_lr, betas=c.betas, grad_clip=c.grad_clip),
        }

    # --- maths ---------------------------------------------------------------------------------
    def disc_sigma(self, n: int, device, dtype) -> Tensor:
        """``t_hat ~ pi(t; m, s)`` (logit-normal RF time), as a level ``sigma_data t/(1-t)`` (Sec. 3.2)."""
        t = sample_logit_normal(n, self.config.disc_m, self.config.disc_s, device, dtype)
        sigma = self.teacher.sigma_data * flow_t_to_sigma(t)
        return sigma.clamp(self.teacher.sigma_min, self.teacher.sigma_max)

    def generate(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """``x_hat = G(x0 + s eps, s)`` from a teacher sample ``x0`` at a student level ``s``."""
        s = pick(self.levels, x0.shape[0], x0.device, x0.dtype)
        return self.student(noised(x0, s), s, labels)

    def disc(self, x: Tensor, labels: Tensor | None, t_hat: Tensor, noise: Tensor | None = None) -> Tensor:
        """Logits of the heads on the teacher's features of ``x`` re-noised to ``t_hat``."""
        return self.discriminator(noised(x, t_hat, noise), t_hat, labels)

    def generator_loss(self, x_hat: Tensor, labels: Tensor | None) -> Tensor:
        """``-E[D(F_teacher(x_hat + t_hat eps, t_hat))]``: adversarial only, no distillation loss."""
        t_hat = self.disc_sigma(x_hat.shape[0], x_hat.device, x_hat.dtype)
        with no_param_grad(self.discriminator):
            return g_loss(self.disc(x_hat, labels, t_hat), self.config.gan_loss)

    def discriminator_loss(self, x0: Tensor, fake: Tensor, labels: Tensor | None) -> Tensor:
        """Teacher samples ``x0`` against ``sg(x_hat)``, each re-noised at its own ``t_hat``."""
        c = self.config
        n, dev, dt = x0.shape[0], x0.device, x0.dtype
        t_real, t_fake = self.disc_sigma(n, dev, dt), self.disc_sigma(n, dev, dt)
        eps = torch.randn_like(x0)
        real_logits = self.disc(x0, labels, t_real, eps)
        loss = d_loss(real_logits, self.disc(fake.detach(), labels, t_fake), c.gan_loss)
        if c.ar1_weight > 0:  # APT: ||D(x) - D(x + s n)||^2 at the same level and noise
            perturbed = self.disc(x0 + c.ar1_sigma * torch.randn_like(x0), labels, t_real, eps)
            loss = loss + c.ar1_weight * approx_r1_penalty(real_logits, perturbed)
        return loss

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        device = next(self.student.parameters()).device
        _, x0, labels = self.pairs.batch(batch.size, device)
        out = {}
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
