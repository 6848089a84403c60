"""MeanFlow in distillation mode (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step
Generative Modeling", arXiv 2505.13447), with the objective of improved MeanFlow (iMF, Geng et al.
2025, arXiv 2512.02012) as an option.

In flow-matching time (``z_t = (1 - t) x + t eps``, ``t = sigma / (1 + sigma)``;
:mod:`fewstep.conversions`) the student learns the *average* velocity over ``[r, t]``,
``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``, so one step ``z_r = z_t - (t - r) u`` jumps along
the teacher's ODE. Differentiating ``(t - r) u = int_r^t v`` in ``t`` gives the MeanFlow identity
(Eq. 6), used as a regression target (Eq. 9-10):

    u_tgt = v(z_t, t) - (t - r) du/dt,   du/dt = v d_z u + d_t u   (a JVP along (v, 0, 1))
    L = w ||u_theta(z_t, r, t) - sg(u_tgt)||^2,   w = sg(1 / (||.||^2 + c)^p)      (adaptive weight)

In distillation mode ``v`` is the frozen teacher's velocity ``(z_t - D(z_t / (1 - t), sigma_t)) / t``
at the noised data point, both in the target and as the JVP's tangent (FastGen's ``use_cd``); with
``r = t`` the loss is flow matching onto the teacher's velocity. The student is a teacher copy with
one extra input, ``h = t - r`` (zero-initialised embedding), read as an x-prediction:
``u_theta(z, r, t) = (z - D_theta(z / (1 - t), sigma_t, h)) / t``, so at the start ``u(z, t, t)`` is
the teacher's velocity and ``z_0 = z_t - t u(z_t, 0, t) = D_theta(..., h = t)``.

``objective = "imf"`` (iMF, Sec. 3): the JVP's tangent is the student's own instantaneous velocity
``u_theta(z_t, t, t)`` (stop-gradient) instead of the target's ``v``, the loss is written as a
velocity loss ``||u_theta + (t - r) sg(du/dt) - v||^2`` (the same value and gradient as above), and
an auxiliary loss ``||u_theta(z_t, t, t) - v||^2`` trains the instantaneous velocity, with the same
adaptive weight. (iMF's guidance-scale input and interval are not part of this option.)

Defaults checked against the official MeanFlow code (JAX ``MeanFlow.forward``) and FastGen's
``mean_flow.py`` / ``config_mean_flow.py``: ``t`` and ``r`` from a logit-normal (-0.4, 1.0), sorted so
``t >= r``; 75 % of each batch with ``r = t`` (``data_proportion`` 0.75; iMF: 0.5); ``(t - r)``
clipped to [0, 1] in the target; loss summed over pixels; ``p = 1``, ``c = 0.01``; the network sees
``t`` and ``h = t - r`` (FastGen's ``time_cond_type = "diff"``, a zero-initialised ``h`` embedder);
Adam lr 1e-4, betas (0.9, 0.95); dropout 0; the evaluated network is an EMA (the engine's ramped
evaluation EMA); the JVP of the stop-gradient network under no-grad, then a second pass with
gradient (FastGen). Sampling: one step from ``t_max``; two steps through ``t = 0.5`` (FastGen's
``t_list = [0.999, 0.5, 0]``), more on a uniform ``t`` grid, each ``z <- z - (t - t') u(z, t', t)``.

FastGen's CIFAR-10 MeanFlow config (from scratch, "py-meanflow v1") draws ``t`` from logit-normal
(-0.6, 1.6) and ``r`` separately from logit-normal (-4.0, 1.6) — mostly near 0, so the one-step
jump ``h ~ t`` is trained often — with 75 % ``r = t``: ``r_p_mean = -4`` (with ``p_mean = -0.6,
p_std = 1.6``) selects it. With the ImageNet sampler (the default) jumps longer than ~0.8 are
rare, and a short distillation learns the 4-step map long before the 1-step one (the digits rows).

Deviations: ``t`` is kept inside the teacher's noise range (``t_max = sigma_max / (1 + sigma_max)``
= 0.988 for sigma_max 80, not 1 — the sample starts at ``sigma_max z`` as every fewstep sampler);
the network outputs an x-prediction through EDM's preconditioning (the paper's network outputs
``u`` directly) so that the student starts at the teacher; no class-dropout or guidance mixing in
the target (``guidance`` sets a CFG scale for the teacher's velocity instead, FastGen's
``v + (w - 1)(v - v_neg)``).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network with the zero-initialised ``h``
input; the velocity is still the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, EDMDenoiser, append_dims, copy_contract
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import Batch, Method, OptimizerSpec, register
from fewstep.methods._trajectory import TANGENTS, check_option, directional_derivative
from fewstep.schedules import sample_logit_normal
from fewstep.students import copy_teacher, set_dropout


@dataclass
class MeanFlowConfig:
    objective: str = "meanflow"  # meanflow | imf
    p_mean: float = -0.4  # t, r ~ logit-normal(p_mean, p_std)
    p_std: float = 1.0
    r_p_mean: float | None = None  # r from its own logit-normal (FastGen's CIFAR-10 config: -4.0, 1.6),
    r_p_std: float = 1.6  # clipped to t, instead of sorting two draws of t's
    equal_share: float = 0.75  # share of the batch with r = t (iMF's reference: 0.5)
    norm_p: float = 1.0  # adaptive weight 1 / (loss + c)^p
    norm_c: float = 0.01
    tangent: str = "jvp"  # jvp | fd (central difference)
    fd_eps: float = 1e-3
    sample_times: tuple[float, ...] = (0.5,)  # 2-step intermediate flow time; others: uniform in t
    guidance: float = 1.0  # CFG scale of the teacher's velocity
    dropout: float | None = 0.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = None


class AverageVelocityStudent(nn.Module):
    """``u(z, r, t) = (z - D(z / (1 - t), t / (1 - t), h = t - r)) / t`` in flow time, around an EDM
    denoiser with one extra scalar input."""

    def __init__(self, net: EDMDenoiser) -> None:
        super().__init__()
        self.net = net
        copy_contract(self, net)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        tt = append_dims(t, z.ndim)
        x0 = self.net(z / (1 - tt), t / (1 - t), cond, extra=(t - r)[:, None])
        return (z - x0) / tt


def flow_velocity(den: Any, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """The instantaneous velocity ``dz/dt = (z - D(z / (1 - t), t / (1 - t))) / t`` of a sigma-space
    denoiser's probability-flow ODE, in flow-matching time."""
    tt = append_dims(t, z.ndim)
    return (z - den(z / (1 - tt), t / (1 - t), cond)) / tt


@register
class MeanFlow(Method):
    name = "meanflow"
    family = "trajectory"
    paper = "2505.13447"
    title = "MeanFlow distillation: the average velocity u(z, r, t) from the MeanFlow identity (iMF option)"
    needs_data = True
    Config = MeanFlowConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: MeanFlowConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        check_option("objective", c.objective, ("meanflow", "imf"))
        check_option("tangent", c.tangent, TANGENTS)
        if not 0 <= c.equal_share <= 1:
            raise FewstepError(f"equal_share must lie in [0, 1], got {c.equal_share}")
        if isinstance(student, AverageVelocityStudent):
            self.student = student
        else:  # the teacher, or a warm-up network, with the zero-initialised h input
            self.student = AverageVelocityStudent(copy_teacher(student if student is not None else teacher, 1))
        set_dropout(self.student, c.dropout)
        self.velocity_teacher = cfg(self.teacher, c.guidance)
        s_min, s_max = teacher.sigma_min, teacher.sigma_max
        self.t_min, self.t_max = s_min / (1 + s_min), s_max / (1 + s_max)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student"], c.lr, c.betas, grad_clip=c.grad_clip)}

    # --- maths ---------------------------------------------------------------------------------
    def draw_times(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(r, t)``: two logit-normal draws sorted (or ``r`` from its own logit-normal, at most ``t``),
        ``r = t`` for ``equal_share`` of the batch."""
        c = self.config
        a = sample_logit_normal(n, c.p_mean, c.p_std, device)
        if c.r_p_mean is None:
            b = sample_logit_normal(n, c.p_mean, c.p_std, device)
            t, r = torch.maximum(a, b).clamp(self.t_min, self.t_max), torch.minimum(a, b)
        else:
            t, r = a.clamp(self.t_min, self.t_max), sample_logit_normal(n, c.r_p_mean, c.r_p_std, device)
        equal = torch.rand(n, device=device) < c.equal_share
        return torch.where(equal, t, torch.minimum(r, t)), t

    def per_sample_loss(self, x0: Tensor, cond: Any, r: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        c = self.config
        tt = append_dims(t, x0.ndim)
        z = (1 - tt) * x0 + tt * noise
        with torch.no_grad():
            v = flow_velocity(self.velocity_teacher, z, t, cond)
            tangent_v = self.student(z, t, t, cond) if c.objective == "imf" else v

        def u_minus(zz: Tensor, rr: Tensor, ttt: Tensor) -> Tensor:
            return self.student(zz, rr, ttt, cond)

        _, dudt = directional_derivative(
            u_minus, (z, r, t), (tangent_v, torch.zeros_like(r), torch.ones_like(t)), c.tangent, c.fd_eps
        )
        u_tgt = v - append_dims((t - r).clamp(0, 1), x0.ndim) * dudt
        loss = self.weighted((self.student(z, r, t, cond) - u_tgt).flatten(1).pow(2).sum(1))
        if c.objective == "imf":  # the auxiliary instantaneous-velocity loss
            loss = loss + self.weighted((self.student(z, t, t, cond) - v).flatten(1).pow(2).sum(1))
        return loss

    def weighted(self, sq: Tensor) -> Tensor:
        c = self.config
        return sq / (sq.detach() + c.norm_c).pow(c.norm_p)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("meanflow noises real data (z_t = (1 - t) x + t eps); pass a dataset (--data digits)")
        x0 = batch.x
        r, t = self.draw_times(x0.shape[0], x0.device)
        r, t = r.to(x0.dtype), t.to(x0.dtype)
        return {"student": self.per_sample_loss(x0, batch.labels, r, t, torch.randn_like(x0)).mean()}

    def times(self, steps: int) -> list[float]:
        if steps < 1:
            raise FewstepError(f"steps must be >= 1, got {steps}")
        given = self.config.sample_times
        if given and len(given) == steps - 1:
            return [self.t_max, *map(float, given), 0.0]
        return torch.linspace(self.t_max, 0.0, steps + 1, dtype=torch.float64).tolist()

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """``z <- z - (t - t') u(z, t', t)`` from ``z = (1 - t_max) sigma_max noise`` (= ``t_max noise``)."""
        ts = self.times(steps)
        z = noise * self.teacher.sigma_max * (1 - ts[0])
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            t = torch.full((z.shape[0],), a, device=z.device, dtype=z.dtype)
            z = z - (a - b) * self.student(z, torch.full_like(t, b), t, cond)
        return z
