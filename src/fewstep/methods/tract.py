"""TRACT: transitive-closure time distillation (Berthelot et al. 2023, "TRACT: Denoising Diffusion
Models with Transitive Closure Time-Distillation", arXiv 2303.04248; reference code
apple/ml-tract ``tc_distill.py`` and ``tc_distill_edm.py``).

A fine grid of ``T`` steps is cut into ``T_{p+1}`` segments per phase (phases such as
``1024 -> 32 -> 1``, or ``40 -> 1`` with an EDM teacher). From a point ``t0`` anywhere inside a
segment, the student learns to jump to the segment's end ``t2`` in one DDIM step (Sec. 3,
Eq. 5-7, the "transitive closure"):

- ``x1``: the teacher moves ``x`` one of its own steps, ``t0 -> t1`` (phase 0 with an EDM teacher:
  a Heun step between adjacent Karras sigmas, as ``tc_distill_edm.py``; later phases: a DDIM step
  of the previous phase's student);
- ``x2``: a *self-teacher* — an EMA of the student with decay ``sema`` = 0.5 — jumps ``t1 -> t2``
  in one DDIM step (skipped when ``t1 = t2``);
- target: the ``x~`` whose DDIM step ``t0 -> t2`` from ``x`` lands on ``x2`` (the same solve as
  progressive distillation's Algorithm 2), and the loss ``max(SNR, 1) ||x_hat(x, t0) - sg(x~)||^2``.

Phases are scheduled by iteration (``steps_per_phase``). At a phase change the teacher becomes the
evaluation EMA of the student (``ema_residual`` = 1e-3 left of the phase's start weights at its end,
bias-corrected, as the reference's ``ModuleEMA``), kept per phase as ``student_<k>``; the last
phase's student is the run's ``student`` (with the engine's evaluation EMA). ``sample(noise,
steps=k)`` uses the student trained for ``k`` steps, else the most distilled one trained for fewer
(a 1-step TRACT student maps every fine-grid point to its segment's end, so it also samples on
finer grids).

Deviations: the EDM reference weights the loss as EDM does (unit weight on the raw network
output), the DDPM reference by ``max(SNR, 1)``; the latter is the default (``weighting="edm"``
gives the former). The reference clips the self-teacher's x0 to [-1, 1]; fewstep does not assume
the data range. Gradient clipping at norm 1 follows ``tc_distill.py``.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): phase 0 starts from the ``compress`` warm-up network; phase 0's
teacher is still the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.losses import loss_weight, weighted_mse
from fewstep.methods import register
from fewstep.methods._rounds import RoundEMA, RoundSchedule, frozen_copy, kept_student, x0_target
from fewstep.methods.base import Batch, EMASpec, Method, OptimizerSpec
from fewstep.schedules import karras_sigmas
from fewstep.solvers import ddim_sample, ddim_step, ode_step
from fewstep.students import copy_teacher, set_dropout


@dataclass
class TRACTConfig:
    phases: tuple[int, ...] = (40, 1)  # tc_distill_edm.py; (1024, 32, 1) for its DDPM teacher
    steps_per_phase: int | tuple[int, ...] = 1000  # one length or one per phase
    lr: float = 2e-4  # tc_distill.py (tc_distill_edm.py's flag default: 1e-3)
    sema: float = 0.5  # self-teacher EMA
    ema_residual: float = 1e-3  # evaluation EMA: weight left on a phase's start after the phase
    teacher_solver: str = "heun"  # phase-0 teacher step: heun (EDM) or ddim
    weighting: str = "snr_trunc"  # max(SNR, 1); "edm" as tc_distill_edm.py
    grad_clip: float | None = 1.0
    dropout: float | None = 0.0  # the student's dropout (tc_distill_edm.py's flag default: 0)
    rho: float = 7.0


@register
class TRACT(Method):
    name = "tract"
    family = "trajectory"
    paper = "2303.04248"
    title = "TRACT: transitive-closure time distillation (Berthelot et al. 2023)"
    needs_data = True
    Config = TRACTConfig
    chains = False

    def __init__(self, teacher: Denoiser, config: TRACTConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        ph = tuple(int(p) for p in c.phases)
        if len(ph) < 2 or any(a <= b or a % b or ph[0] % a for a, b in zip(ph, ph[1:], strict=False)):
            raise FewstepError(f"phases {ph} must decrease, each dividing the one before (e.g. 40,1 or 1024,32,1)")
        self.phases = ph
        self.schedule = RoundSchedule(ph, c.steps_per_phase)
        self.fine = karras_sigmas(ph[0], teacher.sigma_min, teacher.sigma_max, c.rho)  # (T+1,) to 0
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        self.self_teacher = frozen_copy(self.student)
        for k in ph[1:-1]:  # the last phase's student is the run's student
            setattr(self, f"student_{k}", frozen_copy(self.student))

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"student": OptimizerSpec(["student"], lr=self.config.lr, grad_clip=self.config.grad_clip)}

    def emas(self) -> dict[str, EMASpec]:
        c = self.config
        out = {"self_teacher": EMASpec("student", c.sema)}
        for p, k in enumerate(self.phases[1:-1]):
            momentum = c.ema_residual ** (1 / self.schedule.length(p))
            out[f"student_{k}"] = EMASpec("student", RoundEMA(self.schedule, p, momentum))
        return out

    def phase_teacher(self, p: int) -> tuple[nn.Module, str]:
        """Phase ``p``'s teacher and its step: the original teacher (``teacher_solver``) in phase 0,
        else the previous phase's kept student with DDIM."""
        if p == 0:
            return self.teacher, self.config.teacher_solver
        return getattr(self, f"student_{self.phases[p]}"), "ddim"

    def positions(self, p: int, n: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
        """Fine-grid indices ``(j0, j1, j2)``: a start ``j0`` on the phase's teacher grid inside a
        random student segment, one teacher step ``j1``, and the segment's end ``j2``."""
        T, t_in, t_out = self.phases[0], self.phases[p], self.phases[p + 1]
        semi, seg = T // t_in, T // t_out
        k = torch.randint(0, t_out, (n,), device=device)  # segment
        m = torch.randint(0, t_in // t_out, (n,), device=device)  # teacher step inside it
        j0 = k * seg + m * semi
        return j0, j0 + semi, (k + 1) * seg

    def tract_target(self, x: Tensor, labels: Any, p: int, j: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Eq. 5-7: teacher step ``t0 -> t1``, self-teacher DDIM ``t1 -> t2``, solved x0-target."""
        fine = self.fine.to(x)
        s0, s1, s2 = fine[j[0]], fine[j[1]], fine[j[2]]
        teacher, solver = self.phase_teacher(p)
        with torch.no_grad():
            x1 = ode_step(teacher, x, s0, s1, labels, solver)
            s1_safe = torch.where(s1 > 0, s1, s0)
            x2 = ddim_step(x1, self.self_teacher(x1, s1_safe, labels), s1, s2)
            x2 = torch.where(append_dims(j[1] == j[2], x.ndim), x1, x2)
            return x0_target(x, x2, s0, s2)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        if batch.x is None:
            raise FewstepError("TRACT needs real data; pass a dataset")
        p = self.schedule.round_of(step)
        x0 = batch.x
        j = self.positions(p, x0.shape[0], x0.device)
        s0 = self.fine.to(x0)[j[0]]
        x = x0 + append_dims(s0, x0.ndim) * torch.randn_like(x0)
        target = self.tract_target(x, batch.labels, p, j)
        w = loss_weight(s0, self.config.weighting, self.teacher.sigma_data)
        return {"student": weighted_mse(self.student(x, s0, batch.labels), target, w)}

    def model_for(self, steps: int) -> tuple[nn.Module, Tensor]:
        ph = self.phases
        return kept_student(self, self.fine, list(ph[1:-1]), ph[-1], steps, self.config.rho)

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """DDIM with the phase's evaluation EMA trained for ``steps`` steps (the most distilled one
        for other counts), on the fine grid's ``steps``-step subgrid."""
        net, grid = self.model_for(steps)
        return ddim_sample(lambda x, s: net(x, s, cond), noise, grid)
