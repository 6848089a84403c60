"""Denoising fine-tuning: the engine's reference method (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", arXiv 2206.00364, Sec. 5).

Not a distillation method: a student copied from the teacher keeps training with the teacher's
own objective on real data, so it is the smallest method that exercises everything the engine
owns (data, an optimizer, the evaluation EMA, checkpoints) and a baseline that a distilled
student must beat at equal NFE. Per sample (EDM Eq. 2 with the weights of Table 1):

    ln sigma ~ N(P_mean, P_std^2),  n ~ N(0, I),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    L = lambda(sigma) || D_theta(x0 + sigma n, sigma, y) - x0 ||^2

Class labels are replaced by the null label with probability ``label_dropout`` (Ho & Salimans
2022) so the student keeps an unconditional mode for guidance. Sampling runs the student as an
ordinary denoiser with Euler (= DDIM) on the Karras grid, ``steps`` network evaluations.

Defaults: P_mean = -1.2, P_std = 1.2 (EDM Table 1); Adam, betas (0.9, 0.999), lr 1e-4 (a
fine-tuning rate, a tenth of EDM's from-scratch 1e-3); no gradient clipping, as EDM.

``fewstep teacher train`` runs this method from a freshly initialised network (the run's
"teacher" is then only the initial weights): lr 2e-3 with a linear warm-up (``warmup_steps``),
betas (0.9, 0.99), label dropout 0.1, and the engine's EDM evaluation EMA (half-life with ramp-up).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): trained from its own start on data (a smaller network, or an analytic
teacher's default network, learns from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.guidance import drop_labels
from fewstep.losses import edm_loss
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.schedules import linear_warmup
from fewstep.students import copy_teacher


@dataclass
class DenoiseConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    p_mean: float = -1.2  # EDM Table 1
    p_std: float = 1.2
    label_dropout: float = 0.0
    solver: str = "euler"  # sampler of the student: euler (1 NFE per step) or heun
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps (training from scratch)
    grid_steps: tuple[int, ...] = (1, 2, 4)  # NFE of the run's sample grids and default evaluation


@register
class Denoise(Method):
    name = "denoise"
    family = "trajectory"
    paper = "2206.00364"
    title = "Denoising fine-tuning (EDM loss; the engine's reference method, not a distillation)"
    needs_data = True
    starts_at_teacher = False
    chains = False
    Config = DenoiseConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: DenoiseConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        if self.config.solver not in ("euler", "heun"):
            raise FewstepError(f"denoise samples with euler or heun, got solver {self.config.solver!r}")
        # a given student (another architecture, an analytic teacher's default network) trains from its own start
        self.student = student if student is not None else copy_teacher(teacher)
        self.default_steps = tuple(self.config.grid_steps)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        warmup = partial(linear_warmup, steps=c.warmup_steps) if c.warmup_steps > 0 else None
        return {
            "student": OptimizerSpec(
                ["student"], c.lr, c.betas, weight_decay=c.weight_decay, grad_clip=c.grad_clip, lr_schedule=warmup
            )  # fmt: skip
        }

    def edm_loss(self, x0: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
        """EDM Eq. 2 with Table 1's lambda, averaged over pixels and the batch."""
        return edm_loss(self.student, x0, labels, sigma, noise)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("denoise needs real data in the batch; pass --data")
        x0, labels = batch.x, batch.labels
        sigma = (torch.randn(x0.shape[0], device=x0.device) * self.config.p_std + self.config.p_mean).exp()
        labels = drop_labels(labels, self.config.label_dropout, self.teacher.num_classes)
        return {"student": self.edm_loss(x0, labels, sigma, torch.randn_like(x0))}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        from fewstep.solvers import sample, steps_for_nfe

        solver = self.config.solver  # at most ``steps`` network evaluations
        return sample(self.student, noise, solver, steps_for_nfe(solver, steps), cond)[0]
