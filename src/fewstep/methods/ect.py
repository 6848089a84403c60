"""Easy Consistency Tuning, ECT (Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency Models Made
Easy", arXiv 2406.14548).

Consistency *training* started from the pre-trained diffusion model: the student ``f_theta`` is the
teacher's EDM denoiser (``f(x, t) = D_theta(x, t)``), trained on real data with the consistency
condition between two noise levels ``t > r`` of the same noise ``n``:

    t ~ LogNormal(P_mean, P_std),   x_t = x0 + t n,   x_r = x0 + r n
    r = t (1 - q^-(s+1) n(t)),  n(t) = 1 + k sigmoid(-b t),  s = iteration // stage_iters   (Sec. 3.2)
    r <- max(r, 0),  r <= ratio_limit t
    L = w(t, r) d(f_theta(x_t, t), sg f_theta(x_r, r)),  w = 1 / (t - r),  d(a, b) = sqrt(||a - b||^2 + c^2) - c

At the first stage ``r`` is 0 for small ``t`` — the target is then ``x0`` itself, the diffusion
(denoising) loss the teacher was trained with — and ``Δt = t - r`` shrinks by ``q`` per stage
towards the continuous-time limit: a smooth path from diffusion pre-training to consistency. No
teacher ODE solve: the teacher enters only as the initialisation.

Defaults checked against locuslab/ect (``training/loss.py`` ``ECMLoss``, ``ct_train.py``, the CIFAR-10
settings): P_mean -1.1, P_std 2.0 (untruncated; here clamped to the teacher's [sigma_min,
sigma_max], the range its network was trained on); q = 2, k = 8, b = 1; a stage every 25,000
iterations (3.2 Mimg at batch 128; set ``stage_iters`` to about an eighth of a run's iterations, as
ECT's 8-stage runs); ``w = 1/(t - r)``; the distance with c = 0 on CIFAR-10 (an L2 norm, not
squared) — here c = 1e-8 (FastGen's ``huber_const``) so that a zero difference has a gradient;
``ratio_limit`` 0.999 (FastGen's ``CTScheduleCallback``); theta^- is the *current* network under
no-grad, not an EMA, with the **same dropout mask** (the reference restores the RNG state), and
the target is ``x0`` where ``r = 0``; the teacher's dropout is kept (0.2 on CIFAR-10); RAdam, lr
1e-4, betas (0.9, 0.999); the evaluated network is an EMA (0.9999 on CIFAR-10; here the engine's
ramped evaluation EMA). Sampling: ``x = D(sigma_max z, sigma_max)``, two steps re-noise to 0.821
(CIFAR-10's ``mid_t``) with ``x + sigma eps``.

Deviations: the c of the distance as above; the reference's evaluation-time c_skip/c_out shift by
sigma_min = 0.003 is not applied (the student keeps EDM's scalings at every step).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network as ``f_theta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.methods import Batch, Method, OptimizerSpec, register
from fewstep.methods._trajectory import sampling_sigmas
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class ECTConfig:
    p_mean: float = -1.1  # ln t ~ N(p_mean, p_std^2) (CIFAR-10)
    p_std: float = 2.0
    q: float = 2.0  # Δt shrinks by q per stage
    k: float = 8.0  # n(t) = 1 + k sigmoid(-b t)
    b: float = 1.0
    stage_iters: int = 25000  # iterations per stage (CIFAR-10: 3.2 Mimg at batch 128)
    ratio_limit: float = 0.999  # r <= ratio_limit * t
    huber_c: float = 1e-8  # c of sqrt(||d||^2 + c^2) - c (CIFAR-10: 0; ImageNet: 0.06)
    sample_sigmas: tuple[float, ...] = (0.821,)  # 2-step level (CIFAR-10); others: Karras
    dropout: float | None = None  # None: the teacher's (the reference tunes with it, shared mask)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "radam"
    grad_clip: float | None = None


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float, ratio_limit: float) -> Tensor:
    """ECT's second level ``r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))``, in ``[0, ratio_limit t]``."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return t * ratio.clamp(0.0, ratio_limit)


def consistency_distance(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample ``sqrt(||a - b||^2 + c^2) - c`` over all pixels (ECT's ``ECMLoss``)."""
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


@register
class ECT(Method):
    name = "ect"
    family = "trajectory"
    paper = "2406.14548"
    title = "Easy consistency tuning: consistency training from a diffusion model with a shrinking Δt"
    needs_data = True
    Config = ECTConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: ECTConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.q <= 1 or c.stage_iters < 1 or not 0 < c.ratio_limit < 1:
            raise FewstepError(
                f"need q > 1, stage_iters >= 1 and 0 < ratio_limit < 1, got {c.q}, {c.stage_iters}, {c.ratio_limit}"
            )
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student"], c.lr, c.betas, kind=c.optimizer, grad_clip=c.grad_clip)}

    # --- maths ---------------------------------------------------------------------------------
    def draw_t(self, n: int, device: torch.device) -> Tensor:
        c, t = self.config, self.teacher
        return (torch.randn(n, device=device) * c.p_std + c.p_mean).exp().clamp(t.sigma_min, t.sigma_max)

    def stage(self, step: int) -> int:
        return step // self.config.stage_iters

    def target(self, x_r: Tensor, r: Tensor, cond: Any) -> Tensor:
        """``sg f_theta(x_r, r)`` (the current network, no gradient)."""
        return self.student(x_r, r, cond)

    def pair_loss(self, x0: Tensor, cond: Any, t: Tensor, r: Tensor, noise: Tensor) -> Tensor:
        """Per-sample ``w(t, r) d(f_theta(x_t, t), sg f(x_r, r))``; the target is ``x0`` where ``r = 0``;
        the online and target passes share one dropout mask."""
        x_t = x0 + append_dims(t, x0.ndim) * noise
        x_r = x0 + append_dims(r, x0.ndim) * noise
        devices = [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the RNG is restored for the online pass
            with torch.no_grad():
                safe_r = torch.where(r > 0, r, t)  # r = 0: the network is not evaluated at sigma 0
                target = torch.where(append_dims(r > 0, x0.ndim), self.target(x_r, safe_r, cond), x0)
                target = torch.nan_to_num(target)
        online = self.student(x_t, t, cond)
        return consistency_distance(online, target, self.config.huber_c) / (t - r)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError(f"{self.name} trains on real data; pass a dataset (e.g. --data digits)")
        c, x0 = self.config, batch.x
        t = self.draw_t(x0.shape[0], x0.device).to(x0.dtype)
        r = ect_r(t, self.stage(step), c.q, c.k, c.b, c.ratio_limit)
        return {"student": self.pair_loss(x0, batch.labels, t, r, torch.randn_like(x0)).mean()}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        t = self.teacher
        sigmas = sampling_sigmas(steps, t.sigma_min, t.sigma_max, self.config.sample_sigmas)
        return renoise_sample(self.student, noise, sigmas, cond)
