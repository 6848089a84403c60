"""Progressive adversarial distillation, the SDXL-Lightning recipe (Lin, Wang & Yang 2024, arXiv 2402.13929).

Progressive distillation (Salimans & Ho 2022; :mod:`fewstep.methods._rounds`) halves the
number of DDIM steps round by round: a ``n``-step student learns to land where its ``2n``-step
teacher (the previous round's student) lands after two steps, ``x_t -> x_{t-ns}``. SDXL-Lightning
keeps the rounds but replaces the squared error, which blurs when the student cannot match the
teacher exactly, by an adversarial loss (Sec. 3.1-3.3):

- a discriminator made of the teacher's encoder ``d`` plus heads, reading samples at their noise
  level (Sec. 3.2). Its *conditional* form
  ``D(x_{t-ns} | x_t) = sigma(head(d(x_{t-ns}, t-ns), d(x_t, t)))`` judges the pair, so the student
  must land on the teacher's flow (flow preservation);
- non-saturating losses (Eq. 4-5): ``L_D = -log D(x^teacher_{t-ns} | x_t) - log(1 - D(x^student_{t-ns} | x_t))``,
  ``L_G = -log D(x^student_{t-ns} | x_t)``;
- after a round's first part (``cond_fraction``) the objective is relaxed to the *unconditional*
  ``D(x_{t-ns})`` (Sec. 3.3), which lets the student leave the exact flow for sharper samples and
  better mode coverage;
- training starts at pure noise for the first step (Sec. 3.4: here the grid's first level is
  ``sigma_max``); the paper's first stage (128 -> 32 steps) uses the squared error, the later
  ones the adversarial loss (``mse_rounds``).

Rounds, grids, the kept per-round students and sampling are those of progressive distillation
(each round's student stays evaluable: ``sample(noise, steps=k)`` uses the ``k``-step student).
``guidance`` guides round 0's teacher (the first stage's teacher is the guided SDXL; later stages'
teachers are the previous students, which learned the guided flow); 1 = the plain model.

Deviations: the encoder backbone is the frozen teacher (the paper's backbone is the pre-trained
UNet encoder; whether it is fine-tuned is not stated), the heads are class-conditioned by
projection (the paper: text), the schedule starts at ``start_steps`` = 32 with 2x halving (the
paper: 128 -> 32 -> 8 -> 4 -> 2 -> 1), optimisers are Adam with betas (0, 0.99) run through all
rounds (the paper does not give them).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): round 0 starts from the ``compress`` warm-up network; round 0's
teacher and the discriminator's features are still the teacher's (an analytic teacher's: the warm-up
network's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.losses import loss_weight, weighted_mse
from fewstep.methods import register
from fewstep.methods._adversarial import feature_network
from fewstep.methods._rounds import RoundConfig, RoundMethod, subgrid, two_step_target, x0_target
from fewstep.methods.base import Batch, OptimizerSpec
from fewstep.networks.discriminator import Discriminator, d_loss, g_loss, no_param_grad
from fewstep.solvers import ddim_sample, ddim_step
from fewstep.students import set_dropout


@dataclass
class LightningConfig(RoundConfig):
    start_steps: int = 32  # paper: 128 (its first stage goes 128 -> 32 with MSE)
    end_steps: int = 1
    steps_per_round: int = 500
    mse_rounds: int = 1  # the first rounds train with PD's squared error (paper: the 128 -> 32 stage)
    cond_fraction: float = 0.5  # part of each adversarial round with the conditional D (Sec. 3.3)
    mse_weight: float = 0.0  # optional squared error added in adversarial rounds (paper: 0)
    features: str = "teacher"  # the teacher's encoder levels; "teacher-bottleneck" = middle only
    gan_loss: str = "nonsaturating"  # Eq. 4-5
    head_hidden: int = 64
    lr: float = 1e-5
    d_lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    gen_every: int = 1
    dropout: float | None = 0.0  # student dropout (None: the teacher's)
    guidance: float = 1.0  # CFG scale of round 0's teacher (SDXL-Lightning distils the guided SDXL)


class PairDiscriminator(nn.Module):
    """The conditional ``D(x_{t-ns} | x_t)`` and unconditional ``D(x_{t-ns})`` heads on one frozen
    feature network (which stays outside this module's parameters)."""

    def __init__(self, features: nn.Module, sample_shape: tuple[int, ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        self.cond = Discriminator(features, sample_shape, num_classes, hidden, paired=True)
        self.uncond = Discriminator(features, sample_shape, num_classes, hidden)

    def forward(self, x_next, s_next, labels, x=None, s=None, conditional: bool = True) -> Tensor:
        if conditional:
            return self.cond(x_next, s_next, labels, context=x, context_sigma=s)
        return self.uncond(x_next, s_next, labels)


@register
class Lightning(RoundMethod):
    name = "lightning"
    family = "adversarial"
    paper = "2402.13929"
    title = "SDXL-Lightning: progressive adversarial diffusion distillation"
    needs_data = True
    Config = LightningConfig

    def __init__(self, teacher: Denoiser, config: LightningConfig | None = None, features: nn.Module | None = None,
                 student: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__(teacher, config if config is not None else LightningConfig(), student=student)
        c = self.config
        self.start_teacher = cfg(teacher, c.guidance)  # the teacher itself at 1
        if not 0 <= c.cond_fraction <= 1:
            raise FewstepError(f"cond_fraction must lie in [0, 1], got {c.cond_fraction}")
        if c.gen_every < 1:
            raise FewstepError(f"gen_every must be >= 1, got {c.gen_every}")
        set_dropout(self.student, c.dropout)
        self.features = feature_network(features if features is not None else c.features, teacher)
        if getattr(self.features, "trainable", False):
            raise FewstepError("lightning keeps its discriminator backbone frozen; pass a frozen feature network")
        self.discriminator = PairDiscriminator(self.features, teacher.sample_shape, teacher.num_classes, c.head_hidden)

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
    def conditional(self, step: int) -> bool:
        """Conditional objective in the first ``cond_fraction`` of each round (Sec. 3.3)."""
        r = self.schedule.round_of(step)
        into = (step - self.schedule.start(r)) / self.config.steps_per_round
        return into < self.config.cond_fraction

    def transition(self, x0: Tensor, n: int, teacher, labels) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A training transition of an ``n``-step student: ``(x_t, s, s_next, x^teacher_{t-ns})`` with
        ``x_t = x0 + s eps`` at a grid level and the target from two DDIM steps of the ``2n``-step teacher."""
        g_s, g_t = subgrid(self.fine, n).to(x0), subgrid(self.fine, 2 * n).to(x0)
        i = torch.randint(0, n, (x0.shape[0],), device=x0.device)
        s, s_mid, s_next = g_s[i], g_t[2 * i + 1], g_s[i + 1]
        x = x0 + append_dims(s, x0.ndim) * torch.randn_like(x0)
        x0_tilde = two_step_target(lambda v, sig: teacher(v, sig, labels), x, s, s_mid, s_next)
        return x, s, s_next, ddim_step(x, x0_tilde, s, s_next)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("lightning trains on real images; give --data (or use a data set)")
        c, x0, labels = self.config, batch.x, batch.labels
        r = self.schedule.round_of(step)
        n, teacher = self.schedule.student_steps(r), self.round_teacher(r)
        x, s, s_next, x_next = self.transition(x0, n, teacher, labels)
        mse_round, cond, D = r < c.mse_rounds, self.conditional(step), self.discriminator
        out: dict[str, Tensor] = {}
        with torch.set_grad_enabled("student" in due):
            x0_hat = self.student(x, s, labels)  # one student pass serves both losses
        x_hat = ddim_step(x, x0_hat, s, s_next)  # the student's jump s -> s_next
        if "discriminator" in due:  # trained in MSE rounds too, so it is ready when they end
            real_logits = D(x_next, s_next, labels, x, s, cond)
            out["discriminator"] = d_loss(real_logits, D(x_hat.detach(), s_next, labels, x, s, cond), c.gan_loss)
        if "student" in due:
            w = loss_weight(s, c.weighting, self.teacher.sigma_data)
            mse = weighted_mse(x0_hat, x0_target(x, x_next, s, s_next), w)  # PD's squared error
            if mse_round:
                out["student"] = mse
            else:
                with no_param_grad(D):
                    adv = g_loss(D(x_hat, s_next, labels, x, s, cond), c.gan_loss)
                out["student"] = adv + c.mse_weight * mse if c.mse_weight > 0 else adv
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """DDIM with the student trained for ``steps`` steps on its own grid (the ``k``-step student
        of each round stays evaluable; Sec. 3: the student samples like its PD teacher)."""
        net, grid = self.model_for(steps)
        return ddim_sample(lambda x, s: net(x, s, cond), noise, grid)
