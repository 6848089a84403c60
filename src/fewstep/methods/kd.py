"""Knowledge distillation / the Denoising Student (Luhman & Luhman 2021, arXiv 2101.02388).

A one-step student regresses the teacher's deterministic ODE samples from the same noise:

    L(theta) = E_{(z, y) ~ pairs} || G_theta(z) - y ||          (the paper's Eq. 11)

where ``y = ODE_teacher(sigma_max z)`` is computed once, offline, by ``fewstep pairs``
(:mod:`fewstep.pairs`), and ``G_theta(z) = D_theta(sigma_init z, sigma_init)`` is a copy of the
teacher fed at ``sigma_init = sigma_max`` (:class:`~fewstep.students.OneStepGenerator`). No real
data and no online teacher passes.

Defaults follow the reference code (tcl9876/Denoising_Student, ``training.py``/``utils.py``):
Adam with betas (0.9, 0.98) and lr 2e-4 (CIFAR-10 settings), L1 on CIFAR-10 and L2 elsewhere (L2
here); pairs from the teacher's 18-step Heun sampler (the paper used 1000-step DDIM of a DDPM
teacher; EDM's Heun is the equivalent deterministic sampler for an EDM teacher).

Deviations: the reference sums the error over pixels (here averaged — only the scale seen by Adam
changes); its 5000-step linear lr warm-up and its 0.995 EMA are not applied (the engine's
evaluation EMA plays the EMA's part); the reference used 1.024M pairs, the default here is 10k
(``num_pairs``; pass ``pairs=DIR`` to use a folder made by ``fewstep pairs``).

Stable Diffusion setting: the paper has none (CIFAR-10, LSUN, ImageNet-64 DDPMs); for a guided latent
teacher the pairs are the guided teacher's samples (``guidance=W``: the same CFG scale the user
samples the teacher with), which is how InstaFlow's and DMD's regression data were made for SD.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): trained from its own start by the same regression, without a warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.losses import REGRESSION, regression_loss
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.pairs import Pairs, PairSource
from fewstep.students import OneStepGenerator, copy_teacher, set_dropout


@dataclass
class KDConfig:
    pairs: str | None = None  # folder written by `fewstep pairs`; None = generate num_pairs into the cache
    num_pairs: int = 10000  # reference: 1,024,000 (CIFAR-10)
    solver: str = "heun"  # pair sampler when generating (EDM's deterministic Heun)
    solver_steps: int = 18  # 35 NFE per pair (EDM's CIFAR-10 setting)
    guidance: float = 1.0  # CFG scale of the teacher when generating pairs
    loss: str = "l2"  # reference: l1 on CIFAR-10, l2 on CelebA / LSUN
    sigma_init: float | None = None  # None = teacher.sigma_max (the pair's starting level)
    lr: float = 2e-4  # utils.py, CIFAR-10
    betas: tuple[float, float] = (0.9, 0.98)  # utils.py
    grad_clip: float | None = None
    dropout: float | None = None  # dropout of the trained copies; None keeps the teacher's


@register
class KD(Method):
    name = "kd"
    family = "output"
    paper = "2101.02388"
    title = "Knowledge distillation in iterative generative models for improved sampling speed"
    needs_data = False
    starts_at_teacher = False  # regression trains a student of any shape from its own start
    Config = KDConfig
    default_steps = (1,)

    def __init__(
        self,
        teacher: Denoiser,
        config: KDConfig | None = None,
        student: nn.Module | None = None,
        pairs: Pairs | None = None,
    ) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.loss not in REGRESSION:
            raise FewstepError(f"unknown KD loss {c.loss!r}; use one of {', '.join(REGRESSION)}")
        sigma_init = c.sigma_init if c.sigma_init is not None else teacher.sigma_max
        self.student = student if student is not None else OneStepGenerator(copy_teacher(teacher), sigma_init)
        set_dropout(self.student, c.dropout)
        self._pairs = PairSource(teacher, c, pairs)  # read at the first loss (load_run needs none)

    @property
    def pairs(self) -> Pairs:
        """The stored pairs: ``config.pairs``, or ``num_pairs`` generated into the cache once."""
        return self._pairs.get()

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, grad_clip=c.grad_clip)}

    def loss_on(self, noise: Tensor, target: Tensor, labels: Tensor | None) -> Tensor:
        """Eq. 11 on given pairs: ``|| G(z) - y ||`` (L2 squared or L1, pixel-mean)."""
        return regression_loss(self.student(noise, labels), target, self.config.loss)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        device = next(self.student.parameters()).device
        z, y, labels = self.pairs.batch(batch.size, device)
        return {"student": self.loss_on(z, y, labels)}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"kd trains a one-step student; sample with steps=1 (got {steps})")
        return self.student(noise, cond)
