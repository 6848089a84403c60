"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", arXiv 2202.00512).

Rounds halve the number of sampling steps, e.g. 64 -> 32 -> ... -> 1 (Sec. 4). In each round a
student initialised from the previous round's student learns to make one DDIM step do the work
of two DDIM steps of its teacher; the student then becomes the next round's teacher.

In sigma-space DDIM is Euler, ``x' = x0_hat + (s'/s)(x - x0_hat)``. Two teacher steps
``s -> s_mid -> s''`` give ``x''``; the student's x0-target ``x~`` is the one whose single step
``s -> s''`` lands on ``x''`` (Algorithm 2, the line defining ``x~``; with ``alpha = 1`` and
``sigma = s`` in the VE form):

    x~ = (x'' - (s''/s) x) / (1 - s''/s) = (s x'' - s'' x) / (s - s'')

and the loss is ``max(SNR, 1) ||x_hat(x, s) - x~||^2`` ("truncated SNR" weighting, Sec. 4 /
Eq. 10 with ``SNR = 1/s^2`` in sigma-space). Training points ``x = x0 + s eps`` use real data at
the student's grid points ``s`` (the discrete-time loss of Algorithm 2).

Grids: the round-0 teacher runs ``start_steps`` DDIM steps on a Karras grid (rho = 7, the EDM
teacher's grid); a ``k``-step model uses every ``start_steps/k``-th point of it, so each
student step spans exactly two teacher steps.

Rounds are scheduled by iteration (``steps_per_round``), so every piece of state follows from the
iteration number plus the networks the engine checkpoints: each round's student but the last is
kept as an EMA copy ``student_<k>`` (decay 0 — an exact copy of the live student — during the
round that trains the ``k``-step student, decay 1 otherwise). Round ``r``'s teacher is the previous
round's copy, so "teacher := student" happens at the boundary without an engine hook. Every
round's student stays evaluable: ``sample(noise, steps=k)`` uses the student trained for ``k``
steps — the kept copy, or for the last round the run's ``student`` (which holds the engine's
evaluation EMA when sampling; the paper uses no EMA, so run with ``ema_decay=0`` or make the last
round long enough that the EMA forgets the earlier rounds).

Deviations: the paper trains each round with a fresh optimizer whose learning rate decays linearly
(lr 5e-5 on CIFAR-10, 1e-4 on ImageNet-64, 50k updates per round); here one Adam runs through all
rounds (the engine owns optimizers), at a constant rate unless ``lr_anneal`` (the paper's decay,
off by default because the last round has no fixed end). The paper's networks predict x (or
"both"/v); here the student is the teacher's EDM-preconditioned x0-predictor.

Stable Diffusion setting: the paper distils pixel-space DDPMs only; on a guided text-to-image teacher
progressive distillation is the second stage of guided distillation (``guided``, Meng et al. 2023,
who ran it on SD's latent space). This method distils the unguided (conditional) teacher, so on a
latent teacher it belongs to the unguided setting (tier 2 of the benchmark at w = 1); a diffusers
student is the teacher's UNet in its own parameterisation (not EDM's), the grids are still Karras.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): round 0 starts from the ``compress`` warm-up network and still learns
the teacher's two DDIM steps; later rounds are as usual.
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
from fewstep.methods._rounds import RoundConfig, RoundMethod, pd_loss
from fewstep.methods.base import Batch
from fewstep.solvers import ddim_sample


@dataclass
class ProgressiveConfig(RoundConfig):
    """PD's options: the round schedule (``start_steps`` -> ... -> ``end_steps``, ``steps_per_round``
    iterations each), Adam's ``lr`` (``lr_anneal``: the paper's linear decay within each round), the
    loss ``weighting`` (``snr_trunc`` = ``max(SNR, 1)``), the student's ``dropout`` and ``guidance``: the
    CFG scale of round 0's teacher (1 = the plain model, the paper's setting; another scale distils the
    guided teacher at that one scale, Meng et al.'s stage two without a w input)."""

    guidance: float = 1.0


@register
class ProgressiveDistillation(RoundMethod):
    name = "progressive"
    family = "trajectory"
    paper = "2202.00512"
    title = "Progressive distillation (Salimans & Ho 2022)"
    needs_data = True
    Config = ProgressiveConfig

    def __init__(
        self, teacher: Denoiser, config: ProgressiveConfig | None = None, student: nn.Module | None = None
    ) -> None:
        super().__init__(teacher, config if config is not None else ProgressiveConfig(), student=student)
        self.start_teacher = cfg(teacher, self.config.guidance)  # the teacher itself at 1

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        """Algorithm 2 (:func:`~fewstep.methods._rounds.pd_loss`) for this iteration's round: the
        ``n``-step student against two DDIM steps of the previous round's ``2n``-step student."""
        if "student" not in due:
            return {}
        if batch.x is None:
            raise FewstepError("progressive distillation needs real data; pass a dataset")
        r = self.schedule.round_of(step)
        teacher, labels, c = self.round_teacher(r), batch.labels, self.config
        return {
            "student": pd_loss(
                lambda x, s: self.student(x, s, labels),
                lambda x, s: teacher(x, s, labels),
                batch.x,
                self.schedule.student_steps(r),
                self.fine,
                c.weighting,
                self.teacher.sigma_data,
            )
        }

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """DDIM with the student trained for ``steps`` steps on its own grid."""
        net, grid = self.model_for(steps)
        return ddim_sample(lambda x, s: net(x, s, cond), noise, grid)
