"""Guided (classifier-free guidance) distillation (Meng et al. 2023, "On Distillation of Guided
Diffusion Models", arXiv 2210.03142).

Stage one (Sec. 4.1, Eq. 6): a single student ``x_hat(x, w)`` conditioned on the guidance scale
matches the guided teacher ``(1 + w') x_c - w' x_u`` for ``w`` drawn uniformly from a range,
with the truncated-SNR weight of progressive distillation. The student is a copy of the teacher
with one extra scalar input whose embedding starts at zero (so it starts as the conditional
teacher); noise levels are drawn uniformly in the Karras ramp of the stage-two grid (the paper's
``t ~ U[0, 1]``).

Stage two (Sec. 4.1, "progressive distillation"): progressive distillation of that student, with
the same ``w`` given to the round's teacher and student — :mod:`fewstep.methods.progressive`'s
rounds, x0 target and weighting, reused by subclassing.

Guidance scales use fewstep's convention (:func:`fewstep.guidance.cfg`): ``w = 1`` is the plain
conditional model, and the paper's ``w'`` is ``w - 1``. ``sample(..., guidance=w)`` picks the
scale at sampling time (default ``config.guidance``).

Deviations: the paper trains with ``w' in [0, 4]`` (``w`` in [1, 5], the default here; the method reference
marks the range unverified) and also distils a stochastic sampler; fewstep distils the
deterministic DDIM sampler only. The stage-one student is the teacher's network with the extra
input (the paper's w-embedding is likewise added to the time embedding); on a diffusers UNet teacher
(Stable Diffusion's setting, tier 2 of the benchmark) that is
:class:`~fewstep.teachers.diffusers.students.EmbeddedInputStudent`: ``w`` through LCM's sinusoidal
guidance embedding into ``time_cond_proj_dim``, its projection zero-initialised.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): stage one starts from the ``compress`` warm-up network with its zero-
initialised w input and still regresses the guided teacher.
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
from fewstep.methods._rounds import RoundConfig, RoundMethod, pd_loss
from fewstep.methods.base import Batch
from fewstep.solvers import ddim_sample


@dataclass
class GuidedConfig(RoundConfig):
    w_min: float = 1.0  # fewstep scale; the paper's w' = w - 1 in [0, 4]
    w_max: float = 5.0
    stage_one_steps: int = 500
    guidance: float = 1.0  # default scale at sampling time


@register
class GuidedDistillation(RoundMethod):
    name = "guided"
    family = "trajectory"
    paper = "2210.03142"
    title = "Guided distillation (Meng et al. 2023)"
    needs_data = True
    Config = GuidedConfig
    guidance_input = True  # sample(..., guidance=w): the w-conditioned student

    def __init__(self, teacher: Denoiser, config: GuidedConfig | None = None, student: nn.Module | None = None):
        if not getattr(teacher, "num_classes", 0):
            raise FewstepError("guided distillation needs a class-conditional teacher (num_classes > 0)")
        config = config if config is not None else GuidedConfig()
        if not config.w_min <= config.w_max:
            raise FewstepError(f"w_min ({config.w_min}) must not exceed w_max ({config.w_max})")
        # stage one is "round -1" (the first stage_one_steps iterations): it produces the
        # start_steps-step w-conditioned model, kept as student_<start_steps> and round 0's teacher
        super().__init__(teacher, config, extra_dims=1, offset=config.stage_one_steps, keep_first=True,
                         student=student)  # fmt: skip

    def draw_w(self, n: int, device=None) -> Tensor:
        c = self.config
        return c.w_min + (c.w_max - c.w_min) * torch.rand(n, device=device)

    def draw_sigma(self, n: int, device=None) -> Tensor:
        """``u ~ U[0, 1]`` through the Karras ramp between the grid's sigma_max and smallest level."""
        hi, lo, rho = float(self.fine[0]), float(self.fine[-2]), self.config.rho
        u = torch.rand(n, device=device, dtype=torch.float64)
        return (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    @torch.no_grad()
    def stage_one_target(self, x: Tensor, sigma: Tensor, labels: Tensor, w: Tensor) -> Tensor:
        """Eq. 6's target: the guided teacher ``(1 + w') x_c - w' x_u`` at per-sample ``w = w' + 1``."""
        return cfg(self.teacher, w.to(x))(x, sigma, labels)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        if batch.x is None or batch.labels is None:
            raise FewstepError("guided distillation needs labelled real data; pass a labelled dataset")
        x0, labels = batch.x, batch.labels
        w = self.draw_w(x0.shape[0], x0.device).to(x0)  # (B,)
        r = self.schedule.round_of(step)
        if r == -1:  # stage one
            sigma = self.draw_sigma(x0.shape[0], x0.device).to(x0)
            x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
            target = self.stage_one_target(x, sigma, labels, w)
            pred = self.student(x, sigma, labels, extra=w)
            weight = loss_weight(sigma, self.config.weighting, self.teacher.sigma_data)
            return {"student": weighted_mse(pred, target, weight)}
        teacher = self.round_teacher(r)  # stage two: progressive distillation at the same w
        return {
            "student": pd_loss(
                lambda x, s: self.student(x, s, labels, extra=w),
                lambda x, s: teacher(x, s, labels, extra=w),
                x0,
                self.schedule.student_steps(r),
                self.fine,
                self.config.weighting,
                self.teacher.sigma_data,
            )
        }

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None, guidance: float | None = None) -> Tensor:
        """DDIM with the student trained for ``steps`` steps at guidance scale ``guidance``
        (the guided teacher itself from ``start_steps`` steps up)."""
        if cond is None:
            raise FewstepError("guided distillation samples class-conditionally: pass class labels as cond")
        w = self.config.guidance if guidance is None else float(guidance)
        net, grid = self.model_for(steps)
        if net is self.teacher:
            guided = cfg(self.teacher, w)
            return ddim_sample(lambda x, s: guided(x, s, cond), noise, grid)
        w_in = torch.full((noise.shape[0],), w, device=noise.device, dtype=noise.dtype)
        return ddim_sample(lambda x, s: net(x, s, cond, extra=w_in), noise, grid)
