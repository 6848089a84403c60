"""Piecewise rectified flow, PeRFlow (Yan, Liu, Liu, Zhang, Zhang, Feng & Liu 2024, arXiv 2405.07510).

The flow's time range is cut into ``K`` windows ``(t_e, t_s]`` (flow time ``t = sigma / (1 + sigma)``,
:mod:`fewstep.conversions`; 1 is noise). Each window is straightened on its own: its start point
``z_s`` is real data noised to ``t_s`` (the teacher's marginal there, so no long ODE solve), its end
``z_e`` is the frozen teacher's ODE from ``z_s`` to ``t_e`` in ``solving_steps`` DDIM steps, and the
student learns the straight line between them:

    z_t = z_s + (t - t_s) / (t_e - t_s) (z_e - z_s),    L = E || v_theta(z_t, t) - (z_e - z_s) / (t_e - t_s) ||^2

with ``t`` uniform over the whole range (one window per sample, the one ``t`` falls in; boundaries
belong to the window they start). A K-window PeRFlow samples in K Euler steps, one per window
(``steps`` a multiple of K spreads them evenly, as ``PeRFlowScheduler.set_timesteps``); Euler in
flow time is Euler/DDIM in sigma, so the sampler is :func:`fewstep.solvers.euler` on the windows'
uniform flow-time grid. The student is a teacher copy read as a velocity through its x-prediction,
``v = (z_t - D(z_t / (1 - t), sigma_t)) / t`` (:func:`fewstep.conversions.flow_time_velocity`), so the loss
is ``|| D_theta - D* ||^2 / t^2`` with ``D* = z_t - t v*``. LoRA students (``--lora-rank``) are the
paper's plug-and-play accelerator.

Defaults checked against the reference code (magic-research/piecewise-rectified-flow,
``scripts/perflow_accelerate_sd.py``, ``src/pfode_solver.py``, ``src/scheduler_perflow.py``, the SD 1.5
``train.sh``): K = 4 windows with boundaries uniform in time (1, 0.75, 0.5, 0.25, 0); window starts
from real data with the forward noise (``add_noise`` at the window's start); window ends by 8 DDIM
steps of the frozen teacher uniform in time inside the window (``--solving_steps 8``); the teacher
without guidance on the student's own (dropped-out) condition (``--cfg_sync``: ``guidance = 1``);
the loss an unweighted mean squared error; AdamW lr 8e-5, betas (0.9, 0.999), weight decay 1e-2,
gradient clipping 1, 500 warm-up iterations; the student without dropout (SD 1.5's UNet config has
dropout 0, whatever the teacher copy here has); inference one Euler step per window.

Deviations: the reference's released SD 1.5 model regresses ``diff_eps`` (an epsilon-like
reparameterisation of the same window velocity, a per-window rescaling of the loss); its
``velocity`` target option is the one used here. Times are continuous rather than the
reference's 1000-point grid, and the top window starts at ``t_max = sigma_max / (1 + sigma_max)``
(data noised to ``sigma_max``; sampling starts from ``sigma_max z``, as every fewstep sampler).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network, trained by the same regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conversions import flow_t_to_sigma, uniform_flow_sigmas
from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.schedules import linear_warmup
from fewstep.solvers import ddim_step, euler
from fewstep.students import copy_teacher, set_dropout


@dataclass
class PeRFlowConfig:
    windows: int = 4  # K (train.sh / the released models)
    solving_steps: int = 8  # teacher DDIM steps per window (SD 1.5: 8)
    guidance: float = 1.0  # teacher CFG in the window solve (--cfg_sync: 1, on the student's condition)
    t_eps: float = 1e-3  # t ~ U(t_eps, t_max]
    lr: float = 8e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    warmup: int = 500  # linear lr warm-up (lr_warmup_steps)
    grad_clip: float | None = 1.0
    dropout: float | None = 0.0  # the trained copy's dropout (SD 1.5's UNet has none); None keeps the teacher's


@register
class PeRFlow(Method):
    name = "perflow"
    family = "trajectory"
    paper = "2405.07510"
    title = "PeRFlow: piecewise rectified flow, K time windows straightened separately"
    needs_data = True
    Config = PeRFlowConfig
    default_steps = (4,)

    def __init__(self, teacher: Denoiser, config: Any = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.windows < 1 or c.solving_steps < 1:
            raise FewstepError(f"windows and solving_steps must be >= 1, got {c.windows}, {c.solving_steps}")
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        self.t_max = teacher.sigma_max / (1 + teacher.sigma_max)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {
            "student": OptimizerSpec(
                ["student"], lr=c.lr, betas=c.betas, weight_decay=c.weight_decay, kind="adamw",
                grad_clip=c.grad_clip, lr_schedule=partial(linear_warmup, steps=max(c.warmup, 1)),
            )
        }  # fmt: skip

    def window(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_s, t_e)`` of the window each ``t`` falls in (``t_e < t <= t_s``; boundaries start a window)."""
        k = self.config.windows
        width = self.t_max / k
        idx = (t / width - 1e-6).floor().clamp(0, k - 1)  # t in (idx w, (idx + 1) w]
        return (idx + 1) * width, idx * width

    @torch.no_grad()
    def window_end(self, z_s: Tensor, t_s: Tensor, t_e: Tensor, cond: Any = None) -> Tensor:
        """The teacher's DDIM solve from flow point ``z_s`` at ``t_s`` to ``t_e`` (per sample), in
        ``solving_steps`` steps uniform in flow time; returns the flow point at ``t_e``."""
        c = self.config
        den = cfg(self.teacher, c.guidance)  # the teacher itself at scale 1
        sig = flow_t_to_sigma(t_s)
        x = z_s * append_dims(1 + sig, z_s.ndim)
        for j in range(c.solving_steps):
            a, b = t_s + (t_e - t_s) * j / c.solving_steps, t_s + (t_e - t_s) * (j + 1) / c.solving_steps
            sa, sb = flow_t_to_sigma(a), flow_t_to_sigma(b)
            x = ddim_step(x, den(x, sa, cond), sa, sb)
        return x / append_dims(1 + flow_t_to_sigma(t_e), x.ndim)

    def loss_on(self, x0: Tensor, cond: Any, t: Tensor, noise: Tensor) -> Tensor:
        """The window-velocity regression at flow times ``t`` for data ``x0`` (velocity units)."""
        t_s, t_e = self.window(t)
        sig_s = flow_t_to_sigma(t_s)
        z_s = (x0 + append_dims(sig_s, x0.ndim) * noise) / append_dims(1 + sig_s, x0.ndim)
        z_e = self.window_end(z_s, t_s, t_e, cond)
        v = (z_e - z_s) / append_dims(t_e - t_s, x0.ndim)
        z_t = z_s + append_dims(t - t_s, x0.ndim) * v
        sigma = flow_t_to_sigma(t)
        target = z_t - append_dims(t, x0.ndim) * v  # the x-prediction whose velocity is v
        pred = self.student(z_t * append_dims(1 + sigma, x0.ndim), sigma, cond)
        return ((pred - target).flatten(1).pow(2).mean(1) / t**2).mean()

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        if batch.x is None:
            raise FewstepError("perflow starts its windows from real data; pass a dataset (e.g. --data digits)")
        x0 = batch.x
        t = self.config.t_eps + (self.t_max - self.config.t_eps) * torch.rand(x0.shape[0], device=x0.device)
        return {"student": self.loss_on(x0, batch.labels, t.to(x0.dtype), torch.randn_like(x0))}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 4, cond: Any = None) -> Tensor:
        """Euler from ``sigma_max noise``: ``steps / K`` uniform flow-time steps in each window."""
        k = self.config.windows
        if steps % k:
            raise FewstepError(f"a {k}-window PeRFlow samples in a multiple of {k} steps (got {steps})")
        sigmas = uniform_flow_sigmas(steps, self.teacher.sigma_max).to(noise.device)
        return euler(self.student, noise * float(sigmas[0]), sigmas, cond)
