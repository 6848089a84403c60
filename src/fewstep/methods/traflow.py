"""TraFlow: trajectory distillation that learns the output, the velocity and self-consistency
together (Wu, Fan, Zhou, Shao, Liu & Fan 2025, arXiv 2502.16972; later versions retitled "SCoT").

The student is CTM's flow map ``G_theta(x_t, t, s)`` (:class:`fewstep.students.FlowMapStudent`) and
the method is CTM (:mod:`fewstep.methods.ctm`: soft consistency onto the teacher's ODE, which
carries the output reconstruction, plus CTM's DSM term) with one more loss that makes the
trajectory straight: along the teacher's (noise, sample) pair ``(z, y)``, the student's map from a
point of the pair's straight line must move at the pair's constant velocity,

    L_vel = E || dZ_theta(tau_s) / dtau_s - v_pair ||^2,   Z_theta(tau_s) = G_theta(x_t, t, s) / (1 + s),
    x_t = (1 - t / sigma_max) y + t z,   v_pair = z - y / tau_max,

in flow time ``tau = sigma / (1 + sigma)`` (:mod:`fewstep.conversions`; ``x_t`` is the pair's line
from ``sigma_max z`` to ``y``, :func:`fewstep.conversions.pair_line`), the derivative a central
difference in ``tau_s`` that back-propagates through both passes. ``t`` and ``s <= t`` are drawn as
CTM draws them (N-point Karras grid). The weight is the paper's best "normalisation" strategy: the
ratio of gradient norms ``||grad L_CTM|| / ||grad L_vel||`` at the student's last layer, clipped to
``[0.01, 10]``. No GAN term (the paper's results are without one).

No reference code is public and the equations of the paper's HTML versions did not render, so the
loss is built from its text (v1: "reconstruct the output from pre-trained models; learn the amount
of changes by pre-trained models; satisfy the self-consistency over its trajectory"; v4: CTM's soft
consistency and DSM losses, the velocity loss ``|| dG/ds - (x_0 - x_1) ||^2`` by autograd, its
weight normalised and clipped to [0.01, 10], EMA target 0.9999 at ImageNet scale, the CTM code base's
CIFAR-10 hyperparameters: N = 18, RAdam lr 4e-4). Chosen here and named: pairs from ``fewstep pairs``
(10,000 by default) instead of a teacher ODE solve per step; the derivative by a central difference
(``fd_eps`` in flow time) instead of autograd; the velocity's sign from the straight line's
direction (the paper's sign disagrees with its own rectified-flow loss); CTM's target EMA 0.999
(its CIFAR-10 setting).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): as CTM.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from fewstep.conversions import flow_t_to_sigma, pair_line
from fewstep.denoiser import Denoiser, append_dims
from fewstep.methods import register
from fewstep.methods.ctm import ConsistencyTrajectoryModel, CTMConfig
from fewstep.pairs import PairSource


@dataclass
class TraFlowConfig(CTMConfig):
    vel_weight: float = 1.0  # times the normalised weight ||grad L_CTM|| / ||grad L_vel|| in [0.01, 10]
    vel_clip: tuple[float, float] = (0.01, 10.0)
    fd_eps: float = 1e-3  # central-difference step in flow time
    pairs: str | None = None  # a folder written by `fewstep pairs`; None = generate num_pairs into the cache
    num_pairs: int = 10000
    solver_steps: int = 18  # the pairs' Heun steps (35 NFE); `solver` stays the CTM teacher's stepper
    guidance: float = 1.0


@register
class TraFlow(ConsistencyTrajectoryModel):
    name = "traflow"
    paper = "2502.16972"
    title = "TraFlow: CTM's flow map made straight (output, velocity and self-consistency together)"
    Config = TraFlowConfig

    def __init__(self, teacher: Denoiser, config: Any = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config, student)
        c = self.config  # the pairs' own settings (CTM's `solver` is the teacher's stepper)
        settings = SimpleNamespace(pairs=c.pairs, num_pairs=c.num_pairs, solver="heun", solver_steps=c.solver_steps,
                                   guidance=c.guidance)  # fmt: skip
        self._pairs = PairSource(teacher, settings)

    def velocity_loss(self, z: Tensor, y: Tensor, cond: Any, t: Tensor, s: Tensor) -> Tensor:
        """Per-sample ``|| dZ/dtau_s - v_pair ||^2`` at levels ``t >= s > 0`` of the pair ``(z, y)``."""
        smax, h = self.teacher.sigma_max, self.config.fd_eps
        tau_max = smax / (1 + smax)
        x_t = pair_line(y, z, t, smax)
        tau = s / (1 + s)
        lo, hi = (tau - h).clamp_min(h / 2), tau + h

        def flow_point(tau_s: Tensor) -> Tensor:
            sig = flow_t_to_sigma(tau_s)
            return self.student(x_t, t, sig, cond) / append_dims(1 + sig, z.ndim)

        dz = (flow_point(hi) - flow_point(lo)) / append_dims(hi - lo, z.ndim)
        return (dz - (z - y / tau_max)).flatten(1).pow(2).mean(1)

    def student_loss(self, x0: Tensor, cond: Any, gan_on: bool) -> tuple[Tensor, Tensor]:
        loss, loss_ctm = super().student_loss(x0, cond, gan_on)
        c = self.config
        if c.vel_weight <= 0:
            return loss, loss_ctm
        z, y, labels = self._pairs.get().batch(x0.shape[0], x0.device)
        grid = self.grid.to(device=x0.device, dtype=z.dtype)
        n = self.draw_heun_steps()
        i_t, _, i_s = self.draw_indices(z.shape[0], n)
        loss_vel = self.velocity_loss(z, y, labels, grid[i_t.to(x0.device)], grid[i_s.to(x0.device)]).mean()
        w = self._adaptive_weight(loss_ctm, loss_vel, *c.vel_clip)
        return loss + c.vel_weight * w * loss_vel, loss_ctm
