"""BOOT: data-free distillation by bootstrapping (Gu, Zhai, Zhang, Liu & Susskind 2023, arXiv
2306.05544).

Along the teacher's ODE from ``x_T = sigma_max eps``, the *signal* ``y_sigma = x_sigma - sigma eps``
(the paper's ``(x_t - sigma_t eps) / alpha_t`` in VP form) moves from the teacher's first
prediction to the sample. A DDIM step of the teacher in ``x`` is, in ``y`` (the discretised signal-ODE):

    y_s = y_t + delta (f(y_t + t eps, t) - y_t),   delta = 1 - s / t

(:func:`signal_step`; tested against the teacher's own DDIM step). The student ``g_theta(eps, s)``
reads only the noise and a time and predicts ``y_s``; it is trained without data by bootstrapping
from its own prediction one step closer to the noise plus the boundary condition at the
noise end:

    L = E_{eps, t} 1/delta^2 || g_theta(eps, s) - sg[ y~_s ] ||^2 + lambda_BC || g_theta(eps, T) - f(x_T, T) ||^2,
    y~_s = g(eps, t) + delta (f(g(eps, t) + t eps, t) - g(eps, t)),   g(eps, t) under stop-gradient

``t`` and ``s`` are neighbours on the teacher's N-point Karras grid (``t`` uniform over its
intervals); the last step reaches ``s = 0``, where ``y_0`` is the sample, so one evaluation
``g_theta(eps, 0)`` generates. The student is a teacher copy with a zero-initialised input for the
target time (:class:`fewstep.students.FlowMapStudent`'s ``g(x_T, T, s)``), fed ``x_T = sigma_max eps``
at ``sigma_max``: at the start ``g(eps, s) = f(x_T, T)`` for every ``s``, the boundary value.

No reference code is public (Apple); the settings below come from the paper and a third-party
implementation of its loss (OFTSR, ``distill_fm.py``, ``distil_loss = 'boot'``): the target built
from the *current* student under stop-gradient (no EMA target), one DDIM step of the teacher, the
``1 / delta^2`` weight with the exact DDIM ``delta``, the boundary loss at ``T`` against the
teacher's prediction, the student initialised from the teacher, classifier-free guidance of the
teacher inside the target (``guidance``). Not found and chosen here (named): the grid (EDM's
18-point Karras grid, as CD and CTM), ``lambda_BC = 1``, Adam lr 1e-4 (the paper trains with Adam;
its rate is not given), the engine's ramped evaluation EMA.

``solver = "heun"`` (not the paper's) replaces the DDIM step by a Heun step of the teacher in ``x``
(two teacher evaluations, read back as ``y_s = x_s - s eps``): with DDIM steps the student copies
the teacher's N-step DDIM trajectory, whose samples on the 18-point grid are far from its ODE's
(the digits teacher's Euler at 16 NFE scores FID ratio 2.71), so the grid bounds BOOT's quality.

Deviations: the boundary value is the teacher's prediction at ``sigma_max`` (the paper's limit
``alpha_T -> 0``); with a finite ``sigma_max`` the exact signal at ``T`` is 0 and the difference is
``O(1 / sigma_max)``. One-step sampling only (the paper's student has no multi-step sampler).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network with the zero-initialised time input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.schedules import karras_sigmas
from fewstep.solvers import ode_step
from fewstep.students import FlowMapStudent, copy_teacher, set_dropout


def signal_step(y: Tensor, f: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DDIM step of the signal-ODE from level ``t`` to ``s`` (``(B,)`` each) given the teacher's
    prediction ``f`` at ``x_t = y + t eps``: ``y + (1 - s/t)(f - y)``."""
    return y + append_dims(1 - s / t, y.ndim) * (f - y)


@dataclass
class BOOTConfig:
    num_scales: int = 18  # N points of the Karras grid (t, s neighbours); the last interval reaches 0
    rho: float = 7.0
    bc_weight: float = 1.0  # lambda_BC
    solver: str = "ddim"  # the teacher's step inside the target: ddim (the paper's signal-ODE step) | heun
    guidance: float = 1.0  # teacher CFG scale inside the target
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    dropout: float | None = 0.0  # the student's dropout (None: the teacher's); the target reads the same network


@register
class BOOT(Method):
    name = "boot"
    family = "trajectory"
    paper = "2306.05544"
    title = "BOOT: data-free distillation by bootstrapping the signal-ODE from the noise end"
    needs_data = False
    Config = BOOTConfig
    default_steps = (1,)

    def __init__(self, teacher: Denoiser, config: Any = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.num_scales < 2 or c.solver not in ("ddim", "heun"):
            raise FewstepError(f"boot needs num_scales >= 2 and solver ddim|heun; got {c.num_scales}, {c.solver!r}")
        self.student = student if student is not None else FlowMapStudent(copy_teacher(teacher, extra_dims=1))
        set_dropout(self.student, c.dropout)
        self.grid = karras_sigmas(c.num_scales, teacher.sigma_min, teacher.sigma_max, c.rho)  # ends with 0

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, grad_clip=c.grad_clip)}

    def signal(self, eps: Tensor, s: Tensor, cond: Any = None) -> Tensor:
        """``g_theta(eps, s)``: the student's signal at level ``s`` (``(B,)``) of the ODE from ``sigma_max eps``."""
        smax = self.teacher.sigma_max
        top = torch.full_like(s, smax)
        return self.student.g(smax * eps, top, s, cond)

    def teacher_f(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return cfg(self.teacher, self.config.guidance)(x, sigma, cond)  # the teacher itself at scale 1

    def loss_on(self, eps: Tensor, cond: Any, i: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample bootstrapping and boundary losses for grid intervals ``i`` (``t = grid[i]``,
        ``s = grid[i + 1]``)."""
        grid = self.grid.to(device=eps.device, dtype=eps.dtype)
        t, s = grid[i], grid[i + 1]
        with torch.no_grad():
            y_t = self.signal(eps, t, cond)
            x_t = y_t + append_dims(t, eps.ndim) * eps
            if self.config.solver == "ddim":
                target = signal_step(y_t, self.teacher_f(x_t, t, cond), t, s)
            else:  # a Heun step of the teacher in x, read back as a signal
                target = ode_step(self.teacher_f, x_t, t, s, cond, "heun") - append_dims(s, eps.ndim) * eps
        delta = 1 - s / t
        bs = (self.signal(eps, s, cond) - target).flatten(1).pow(2).mean(1) / delta**2
        top = torch.full_like(t, self.teacher.sigma_max)
        with torch.no_grad():
            f_top = self.teacher_f(self.teacher.sigma_max * eps, top, cond)
        bc = (self.signal(eps, top, cond) - f_top).flatten(1).pow(2).mean(1)
        return bs, bc

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        device = next(self.student.parameters()).device
        t = self.teacher
        eps = torch.randn((batch.size, *t.sample_shape), device=device)
        cond = batch.labels
        if cond is None and t.num_classes:
            cond = torch.randint(0, t.num_classes, (batch.size,), device=device)
        i = torch.randint(0, len(self.grid) - 1, (batch.size,), device=device)
        bs, bc = self.loss_on(eps, cond, i)
        return {"student": bs.mean() + self.config.bc_weight * bc.mean()}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"boot's student generates in one step; sample with steps=1 (got {steps})")
        return self.signal(noise, torch.zeros(noise.shape[0], device=noise.device, dtype=noise.dtype), cond)
