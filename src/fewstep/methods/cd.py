"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, arXiv 2303.01469), with the
options of Latent Consistency Models (Luo et al. 2023, arXiv 2310.04378).

A student ``f_theta(x, t)`` with the boundary condition ``f(x, sigma_min) = x`` (Eq. 5, the
``c_skip``/``c_out`` of Appendix C; :class:`fewstep.students.ConsistencyStudent`) learns to map
every point of the teacher's probability-flow ODE trajectory to the same point. Per sample
(Algorithm 2):

    n ~ U{1, ..., N - k},  x_{t_{n+k}} = x + t_{n+k} z                      (data, Eq. 7)
    x_hat_{t_n} = Solver_phi(x_{t_{n+k}}, t_{n+k} -> t_n)                      (one teacher step)
    L = lambda(t_n) d( f_theta(x_{t_{n+k}}, t_{n+k}), f_{theta^-}(x_hat_{t_n}, t_n) )   (Eq. 7)
    theta^- <- mu theta^- + (1 - mu) theta                                     (Eq. 8, by the engine)

on the Karras grid ``t_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``,
rho = 7. CD uses ``k = 1`` and a Heun step; ``lambda = 1`` (the reference code's ``uniform``).

LCM options (``preset lcm`` registers them as defaults):
- *skipping step* ``k`` (Sec. 4.3): the teacher jumps from ``t_{n+k}`` to ``t_n`` in one solver step;
- *guidance-augmented* teacher step (Eq. 9): ``(1 + w') D(x, c) - w' D(x, empty)`` with ``w'``
  drawn uniformly per sample; in fewstep's convention (:mod:`fewstep.guidance`) ``w = w' + 1``,
  so ``guidance = (w_min, w_max)`` is a range of ``w``. The student sees ``w'`` as an extra scalar
  input (``ConsistencyStudent(..., extra=w')``, embedded like the noise level; LCM embeds it with
  a sinusoidal "guidance embedding" too) and samples at ``sample_guidance``. With
  ``guidance_input=False`` (the default for a LoRA student, which cannot add an input) the student
  gets no ``w'``: the guided teacher steps at the drawn ``w`` train a student without that input,
  as LCM-LoRA (Luo et al. 2023, arXiv 2311.05556) and diffusers' ``train_lcm_distill_lora_sd_wds.py`` do;
- the pseudo-Huber distance ``sqrt(d^2 + c^2) - c`` with ``c = 0.001`` (diffusers' LCM script);
- on a DDPM-type diffusers teacher (Stable Diffusion's setting), LCM as diffusers' scripts run it:
  the student is :class:`fewstep.teachers.diffusers.students.LCMStudent` (LCM's ``c_skip``/``c_out``
  of the timestep with ``timestep_scaling = 10``), the pairs are neighbours on the scripts' DDIM
  grid (``grid = "ddim"``: timesteps 0, 19, 39, ..., 999 for k = 20 of 1000), and sampling visits
  ``LCMScheduler``'s levels (4 steps: timesteps 999, 759, 499, 259) with ``x = x0 + tau z'``, so
  ``fewstep eval`` scores what the exported ``StableDiffusionPipeline`` + ``LCMScheduler`` makes.

Sampling is multistep consistency sampling (Algorithm 1): ``x0 = f(sigma_max z, sigma_max)``, then
for each further level ``tau``: ``x = x0 + sqrt(tau^2 - sigma_min^2) z'``, ``x0 = f(x, tau)``.

Defaults: N = 18, Heun, mu = 0.95 (the project's method reference; the ImageNet-64 CD launch script), L2, Adam
lr 4e-4 (CIFAR-10 CD, paper Table 3); 2-step sampling at (sigma_max, 0.821), the paper's CIFAR-10
choice (other step counts use the inner points of a Karras grid). Deviations: LPIPS (the paper's best distance) is not
offered — it needs ImageNet-trained weights fewstep cannot download, and it leaks ImageNet
features into FID; on fewstep's own networks the LCM boundary scalings are the sigma-space CM
scalings (not the DDPM-timestep ``timestep_scaling = 10`` form) and pairs come from the Karras
grid; with Heun, the guided step is Heun on the guided
denoiser (for Euler/DDIM, LCM's default, this equals Eq. 9 exactly); the student's dropout
defaults to 0 whatever the teacher's (with dropout > 0 the target runs without it rather than
sharing the student's dropout mask).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network in the consistency scalings (LCM:
with its zero-initialised w input); the ODE step still runs the teacher, and the target network
copies the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import Batch, EMASpec, Method, OptimizerSpec, register
from fewstep.methods._trajectory import (
    DISTANCES,
    check_option,
    distance,
    expand_like,
    sampling_sigmas,
)
from fewstep.schedules import ascending_karras, linear_warmup
from fewstep.solvers import STEPPERS, ode_step, renoise_sample
from fewstep.students import consistency_student, set_dropout


def lcm_student(student: nn.Module) -> nn.Module:
    """The network under a LoRA wrapper (``LoRAStudent.student``): an LCM student of a diffusers
    teacher has ``ddim_grid`` and ``lcm_sigmas``; fewstep's own consistency students have neither."""
    return getattr(student, "student", student)


@dataclass
class CDConfig:
    """Options of consistency distillation; the LCM options are off by default."""

    num_scales: int = 18  # N: Karras grid points (CIFAR-10; ImageNet-64 uses 40)
    rho: float = 7.0
    grid: str | None = "karras"  # karras | ddim (LCM on a DDPM teacher: N / skip DDIM timesteps); None: ddim if it can
    solver: str = "heun"  # teacher step: heun | euler (= ddim)
    skip: int = 1  # LCM's skipping step k: one solver step spans k grid intervals
    target_decay: float | None = 0.95  # mu of the target network (Eq. 8); None (LCM): 0 for a LoRA student
    distance: str = "l2"  # l2 | l1 | huber
    huber_c: float = 0.001  # c of the pseudo-Huber distance (LCM)
    guidance: tuple[float, float] | None = None  # LCM: range of w (fewstep convention, w = w' + 1)
    sample_guidance: float = 1.0  # w the student is asked for when sampling (with guidance on)
    guidance_input: bool | None = None  # the student sees w' (None: yes, unless the student is a LoRA)
    sample_sigmas: tuple[float, ...] = (0.821,)  # 2-step level (CM paper, CIFAR-10); others: Karras
    dropout: float | None = 0.0  # student dropout (None: the teacher's); the target runs without
    lr: float | None = 4e-4  # None (LCM): 1e-4 for a LoRA student, 1e-6 for the full network
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay) | radam
    warmup: int = 0  # linear lr warm-up over this many steps
    grad_clip: float | None = None


@register
class ConsistencyDistillation(Method):
    name = "cd"
    family = "trajectory"
    paper = "2303.01469"
    title = "Consistency distillation (with LCM's skipping step, guidance and Huber options)"
    needs_data = True
    Config = CDConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: CDConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        check_option("teacher solver", c.solver, STEPPERS)
        check_option("distance", c.distance, DISTANCES)
        if not 1 <= c.skip < c.num_scales:
            raise FewstepError(f"skip must lie in [1, num_scales - 1] = [1, {c.num_scales - 1}], got {c.skip}")
        if c.guidance is not None:
            if not getattr(teacher, "num_classes", 0):
                raise FewstepError("guidance (LCM) needs a class-conditional teacher; drop --guidance for this one")
            if not 0 <= c.guidance[0] <= c.guidance[1]:
                raise FewstepError(f"guidance range must be (w_min, w_max) with 0 <= w_min <= w_max, got {c.guidance}")
        lora = not getattr(teacher, "accepts_extra_inputs", True)  # a LoRA student (adapters on the teacher)
        if c.guidance_input is None:  # a LoRA cannot add LCM's w input: LCM-LoRA's recipe (no w input)
            c.guidance_input = not lora
        if c.lr is None:  # the LCM-LoRA / LCM SD-1.5 commands of diffusers' consistency_distillation README
            c.lr = 1e-4 if lora else 1e-6
        if c.target_decay is None:  # LCM-LoRA's script has no target copy: the online network gives the target
            c.target_decay = 0.0 if lora else 0.95
        self.w_input = c.guidance is not None and c.guidance_input
        self.guidance_input = self.w_input
        extra_dims = 1 if self.w_input else 0
        self.student = student if student is not None else consistency_student(teacher, extra_dims)
        set_dropout(self.student, c.dropout)
        self.target = copy.deepcopy(self.student).requires_grad_(False)  # theta^-
        ddim = getattr(lcm_student(self.student), "ddim_grid", None)
        if c.grid is None:
            c.grid = "karras" if ddim is None else "ddim"
        check_option("grid", c.grid, ("karras", "ddim"))
        if c.grid == "ddim":
            if ddim is None:
                raise FewstepError("grid 'ddim' needs a DDPM-type diffusers teacher (an LCM student); use grid=karras")
            # the LCM scripts' solver grid: timesteps 0 and every (T / (N / k))-th, one DDIM step between neighbours
            self.grid, self.pair_skip = ddim(c.num_scales // c.skip).to(torch.float32), 1
        else:  # t_1 < ... < t_N, one solver step spans k intervals
            self.grid = ascending_karras(c.num_scales, teacher.sigma_min, teacher.sigma_max, c.rho)
            self.pair_skip = c.skip

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        warmup = partial(linear_warmup, steps=c.warmup) if c.warmup > 0 else None
        opt = dict(weight_decay=c.weight_decay, kind=c.optimizer, grad_clip=c.grad_clip, lr_schedule=warmup)
        return {"student": OptimizerSpec(["student"], c.lr, c.betas, **opt)}

    def emas(self) -> dict[str, EMASpec]:
        return {"target": EMASpec("student", self.config.target_decay)}

    # --- maths ---------------------------------------------------------------------------------
    def teacher_step(self, x: Tensor, t: Tensor, t_next: Tensor, cond: Any = None, w: Tensor | None = None) -> Tensor:
        """One teacher ODE step ``t -> t_next`` (per sample), guided with scale ``w`` when given."""
        den = self.teacher if w is None else cfg(self.teacher, w)
        return ode_step(den, x, t, t_next, cond, self.config.solver)

    def draw_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_{n+k}, t_n)`` per sample, ``n`` uniform over the ``N - k`` possible pairs."""
        k = self.pair_skip
        n = torch.randint(0, len(self.grid) - k, (x.shape[0],))
        grid = self.grid.to(device=x.device, dtype=x.dtype)
        return grid[n.to(x.device) + k], grid[n.to(x.device)]

    def draw_guidance(self, x: Tensor) -> Tensor | None:
        if self.config.guidance is None:
            return None
        lo, hi = self.config.guidance
        return lo + (hi - lo) * torch.rand(x.shape[0], device=x.device, dtype=x.dtype)

    def consistency_loss(
        self, x0: Tensor, cond: Any, t_hi: Tensor, t_lo: Tensor, noise: Tensor, w: Tensor | None = None
    ) -> Tensor:
        """Per-sample ``d(f_theta(x_{t_hi}, t_hi), f_{theta^-}(Solver(x_{t_hi}, t_hi -> t_lo), t_lo))``."""
        x_hi = x0 + t_hi.reshape(-1, *[1] * (x0.ndim - 1)) * noise
        extra = (w - 1)[:, None] if self.w_input else None  # the student is told w' = w - 1
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, cond, w)
            target = self.target(x_lo, t_lo, cond, extra)
        online = self.student(x_hi, t_hi, cond, extra)
        return distance(online, target, self.config.distance, self.config.huber_c)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("consistency distillation needs real data; pass a dataset (e.g. --data digits)")
        x0 = batch.x
        t_hi, t_lo = self.draw_pair(x0)
        loss = self.consistency_loss(x0, batch.labels, t_hi, t_lo, torch.randn_like(x0), self.draw_guidance(x0))
        return {"student": loss.mean()}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None, guidance: float | None = None) -> Tensor:
        """Multistep consistency sampling (Algorithm 1) with ``steps`` student evaluations."""
        c, smin = self.config, self.teacher.sigma_min
        w = c.sample_guidance if guidance is None else guidance
        extra = (expand_like(w, noise) - 1)[:, None] if self.w_input else None
        lcm = getattr(lcm_student(self.student), "lcm_sigmas", None)
        if lcm is not None:  # an LCM student of a diffusers teacher: LCMScheduler's levels and re-noising
            levels = [float(s) for s in lcm(steps)[:steps]]  # (what the exported pipeline runs)
            return renoise_sample(self.student, noise, levels, cond, extra)
        sigmas = sampling_sigmas(steps, smin, self.teacher.sigma_max, c.sample_sigmas)
        return renoise_sample(self.student, noise, sigmas, cond, extra, sigma_min=smin)


@dataclass
class LCMConfig(CDConfig):
    """LCM defaults, checked against diffusers' ``train_lcm_distill_sd_wds.py`` and
    ``train_lcm_distill_lora_sd_wds.py`` (commit 58eb52c) and the SD-1.5 commands of their README: a
    DDIM teacher step skipping k = 20 of 1000 grid points (adjacent points of the scripts' 50-step
    DDIM grid), ``w'`` in [5, 15] (``w`` in [6, 16]), pseudo-Huber c = 0.001 (the README's
    ``--loss_type huber``; the scripts' own default is l2), AdamW (decoupled weight decay; the
    README's 0.0, the scripts' default 1e-2), 500 warm-up steps of a constant lr, gradient norm
    clipped at 1; full network: lr 1e-6 and a target copy with mu = 0.95; LoRA student: lr 1e-4 and
    no target copy (the online network under ``no_grad`` gives the target, mu = 0). The pipeline
    samples at guidance 8.5, with ``LCMScheduler``'s levels on a diffusers teacher."""

    num_scales: int = 1000
    solver: str = "ddim"
    skip: int = 20
    distance: str = "huber"
    guidance: tuple[float, float] | None = (6.0, 16.0)
    sample_guidance: float = 8.5
    grid: str | None = None
    target_decay: float | None = None
    lr: float | None = None
    optimizer: str = "adamw"
    warmup: int = 500
    grad_clip: float | None = 1.0


@register
class LatentConsistencyDistillation(ConsistencyDistillation):
    name = "lcm"
    paper = "2310.04378"
    title = "LCM: consistency distillation with skipping steps and guidance as an input"
    Config = LCMConfig
