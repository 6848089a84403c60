"""Continuous-time consistency distillation, sCD (Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", arXiv 2410.11081).

TrigFlow (Sec. 2): ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``; the
consistency function ``f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)``.
This is exactly EDM's preconditioning in disguise: with ``sigma = sigma_d tan t`` and
``x_sigma = x_t / cos t`` (:mod:`fewstep.conversions`), EDM's ``c_skip = cos^2 t``, ``c_out = sigma_d
sin t`` and ``c_in x_sigma = x_t / sigma_d`` give ``D_theta(x_sigma, sigma) = f_theta(x_t, t)`` with
``F_theta = -F_edm``; so the student is a plain teacher copy ``D_theta`` and
``F_theta(x_t, t) = (cos(t) x_t - D_theta(x_t / cos t, sigma_d tan t)) / (sigma_d sin t)``.

The continuous-time loss (Eq. 8 and Algorithm 1, distillation), per sample:

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d),  x_t = cos(t) x0 + sin(t) z
    dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t) = (cos(t) x_t - D_teacher(x_sigma, sigma)) / sin(t)
    dF^-/dt = JVP of F_theta^- along (dx_t/dt, 1)                    (theta^- = stop-grad theta)
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)   (= cos t df^-/dt at r = 1)
    g <- g / (||g|| + c)                                                (tangent normalisation)
    L = e^{w_phi(t)} / D ||F_theta - F^- - g||^2 - w_phi(t)              (adaptive weighting)

``r`` rises linearly from 0 to 1 over the first ``warmup`` iterations (tangent warm-up). The
value of ``F_theta - F^- - g`` is ``-g``; its gradient moves ``f_theta`` against its own time
derivative along the teacher's ODE, i.e. towards consistency. ``dF^-/dt`` comes from a forward-mode
JVP (``torch.func.jvp``) or, with ``tangent="fd"``, from a central finite difference in ``t`` (for
networks or attention kernels without forward-mode support). Sampling (Sec. 3): one step
``f(sigma_d z, pi/2)`` — here ``D(sigma_max z, sigma_max)``, the same point as ``t_max =
arctan(sigma_max / sigma_d)`` — and the paper's two-step sampler with ``t_mid = 1.1``
(``sigma = sigma_d tan 1.1``, fresh noise in between).

Defaults: see :class:`SCMConfig` (each with where it was checked). Deviations: the student keeps
the teacher's EDM network and its time embedding ``c_noise = ln(sigma)/4`` (the paper changes the
architecture: identity time transformation, positional embeddings, adaptive double normalisation;
a distilled teacher copy cannot); the adaptive weight ``w_phi(t)`` is a linear layer on a
positional embedding of ``c_noise`` (the paper: an MLP on the network's time embedding).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network as ``D_theta``; the teacher's ODE
velocity is still the teacher's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import Batch, Method, OptimizerSpec, register
from fewstep.methods._trajectory import TANGENTS, check_option, directional_derivative, sampling_sigmas
from fewstep.networks.embed import PositionalEmbedding
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class SCMConfig:
    p_mean: float = -1.0  # tau = ln(sigma) ~ N(p_mean, p_std^2), truncated to the teacher's range (CIFAR-10;
    p_std: float = 1.4  # ImageNet: -0.8, 1.6)
    tangent: str = "jvp"  # jvp (forward mode) | fd (central finite difference in t)
    fd_eps: float = 1e-3  # step of the finite difference, in TrigFlow time t (radians)
    warmup: int = 10000  # tangent warm-up: r = min(1, iteration / warmup)
    norm_c: float = 0.1  # tangent normalisation g / (||g|| + c)
    adaptive: bool = True  # learned weighting w_phi(t); False: plain mean squared error
    t_mid: float = 1.1  # 2-step sampler's intermediate TrigFlow time
    guidance: float = 1.0  # CFG scale of the teacher's velocity (1 = the plain conditional teacher)
    dropout: float | None = 0.0  # student dropout (None: the teacher's)
    tangent_norm: str = "l2"  # ||g||: l2 (the paper's formula) | rms (FastGen's g_norm_spatial_invariance)
    prior_weighting: bool = True  # the loss times 1 / (sigma_d tan t) (FastGen's prior_weighting_enabled)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    optimizer: str = "radam"
    grad_clip: float | None = None


class AdaptiveWeight(nn.Module):
    """``w_phi(t)``: a linear layer on a positional embedding of ``c_noise = ln(sigma)/4``, zero at
    the start (so the loss starts as the plain mean squared error)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.pos = PositionalEmbedding(dim)
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.linear(self.pos(sigma.log() / 4))[:, 0]


def trig_F(den: Any, x_t: Tensor, t: Tensor, sigma_data: float, cond: Any = None) -> Tensor:
    """The TrigFlow network output ``F(x_t / sigma_d, t)`` of a sigma-space denoiser ``den``:
    ``(cos(t) x_t - den(x_t / cos t, sigma_d tan t)) / (sigma_d sin t)``."""
    cos, sin = append_dims(torch.cos(t), x_t.ndim), append_dims(torch.sin(t), x_t.ndim)
    x0 = den(x_t / cos, sigma_data * torch.tan(t), cond)
    return (cos * x_t - x0) / (sigma_data * sin)


def scm_tangent(
    F: Any, x_t: Tensor, t: Tensor, dxdt: Tensor, sigma_data: float, r: float, mode: str = "jvp", eps: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """``(F^-, g)``: the stop-gradient output ``F(x_t, t)`` and the unnormalised sCM tangent
    ``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt)`` (Algorithm 1), with
    ``dF^-/dt`` the derivative of ``F(x_t, t)`` along ``(dx_t/dt, 1)``."""
    F_minus, dF = directional_derivative(F, (x_t, t), (dxdt, torch.ones_like(t)), mode, eps)
    cos, sin = append_dims(torch.cos(t), x_t.ndim), append_dims(torch.sin(t), x_t.ndim)
    g = -(cos**2) * (sigma_data * F_minus - dxdt) - r * cos * sin * (x_t + sigma_data * dF)
    return F_minus, g


@register
class SCD(Method):
    name = "scd"
    family = "trajectory"
    paper = "2410.11081"
    title = "sCD: continuous-time consistency distillation in TrigFlow (JVP or finite-difference tangent)"
    needs_data = True
    Config = SCMConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: SCMConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        check_option("tangent", c.tangent, TANGENTS)
        check_option("tangent_norm", c.tangent_norm, ("l2", "rms"))
        if c.warmup < 0 or c.norm_c < 0 or c.fd_eps <= 0:
            raise FewstepError(f"need warmup >= 0, norm_c >= 0 and fd_eps > 0, got {c.warmup}, {c.norm_c}, {c.fd_eps}")
        if not 0 < c.t_mid < math.pi / 2:
            raise FewstepError(f"t_mid must lie in (0, pi/2), got {c.t_mid}")
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        self.weight = AdaptiveWeight()
        self.velocity_teacher = cfg(self.teacher, c.guidance)  # the teacher itself when guidance == 1
        sd = teacher.sigma_data
        self.t_min, self.t_max = math.atan(teacher.sigma_min / sd), math.atan(teacher.sigma_max / sd)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "weight": self.weight}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student", "weight"], c.lr, c.betas, kind=c.optimizer, grad_clip=c.grad_clip)}

    # --- maths ---------------------------------------------------------------------------------
    def draw_t(self, n: int, device: torch.device) -> Tensor:
        """``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``, inside the teacher's range."""
        c = self.config
        sigma = (torch.randn(n, device=device) * c.p_std + c.p_mean).exp()
        return torch.atan(sigma / self.teacher.sigma_data).clamp(self.t_min, self.t_max)

    def teacher_velocity(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """``dx_t/dt`` of the teacher's PF-ODE in TrigFlow: ``sigma_d F_teacher(x_t / sigma_d, t)``."""
        return self.teacher.sigma_data * trig_F(self.velocity_teacher, x_t, t, self.teacher.sigma_data, cond)

    def per_sample_loss(self, x0: Tensor, cond: Any, t: Tensor, noise: Tensor, r: float) -> Tensor:
        c, sd = self.config, self.teacher.sigma_data
        x_t = append_dims(torch.cos(t), x0.ndim) * x0 + append_dims(torch.sin(t), x0.ndim) * sd * noise
        with torch.no_grad():
            dxdt = self.teacher_velocity(x_t, t, cond)

        def F_minus(x: Tensor, tt: Tensor) -> Tensor:
            return trig_F(self.student, x, tt, sd, cond)

        F_sg, g = scm_tangent(F_minus, x_t, t, dxdt, sd, r, c.tangent, c.fd_eps)
        norm = g.flatten(1).norm(dim=1)
        if c.tangent_norm == "rms":
            norm = norm / g[0].numel() ** 0.5
        g = g / append_dims(norm + c.norm_c, g.ndim)
        F_theta = trig_F(self.student, x_t, t, sd, cond)
        sq = (F_theta - F_sg - g).flatten(1).pow(2).mean(1)  # ||.||^2 / D
        if c.prior_weighting:
            sq = sq / (sd * torch.tan(t))
        if not c.adaptive:
            return sq
        w = self.weight(sd * torch.tan(t))
        return torch.exp(w) * sq - w

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("scd needs real data to noise (Algorithm 1); pass a dataset (e.g. --data digits)")
        x0 = batch.x
        r = min(1.0, step / self.config.warmup) if self.config.warmup else 1.0
        t = self.draw_t(x0.shape[0], x0.device).to(x0.dtype)
        return {"student": self.per_sample_loss(x0, batch.labels, t, torch.randn_like(x0), r).mean()}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """One step at ``sigma_max``; two steps with the paper's ``t_mid``; more on a Karras grid."""
        t = self.teacher
        mid = (t.sigma_data * math.tan(self.config.t_mid),)
        return renoise_sample(self.student, noise, sampling_sigmas(steps, t.sigma_min, t.sigma_max, mid), cond)
