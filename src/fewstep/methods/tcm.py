"""Truncated consistency models, TCM (Lee, Xu, Vahdat, Liu, Kreis, Nie & Vahdat 2024, "Truncated
Consistency Models", arXiv 2410.14895).

A second training stage for a consistency model: after stage 1 (any consistency run — ``ect``,
``cd``, ``scd``; ``--init`` names it) the student is trained only on the truncated range
``t >= t'``, where one- and two-step sampling happen, and gives up the small noise levels it never
samples from. The consistency function becomes (``TCMPrecond``)

    f(x, t) = f_theta(x, t)  for t >= t',      f(x, t) = f_stage1(x, t)  for t < t'  (frozen)

and the loss is ECT's consistency loss (:mod:`fewstep.methods.ect`: same ``r(t)`` schedule,
``w = 1/(t - r)``, distance and shared dropout mask) on ``t ~ t' ... sigma_max`` plus a
*boundary loss* on a fixed share of the batch placed at ``t = t'``, whose target ``f(x_r, r)`` with
``r < t'`` comes from the frozen stage-1 model; it keeps the truncated model anchored to a valid
consistency function (Sec. 4):

    L = mean_{t > t'} w d(f_theta(x_t), sg f(x_r, r)) + lambda_b mean_{t = t'} w d(f_theta(x_t'), f_stage1(x_r, r))

Defaults checked against NVlabs/TCM (``training/loss.py``, ``training/networks_tcm.py``, README)
and FastGen's ``TCM.py``: ``t' = 1`` (``--tcm_transition_t``); ``ln t`` from a Student-t with
df 0.01, location 0, scale 0.2 truncated to ``[ln t', ln sigma_max]`` (``--tdist=t --df=0.01``);
exactly ``floor(0.25 B)`` boundary samples per batch at ``t'``; ``lambda_b = 0.1`` (README and
FastGen; the code's click default is 1); the ECT distance with c = 1e-8 and ``w = 1/Δt``,
``ratio_limit`` 0.999 (CIFAR-10); RAdam lr 5e-5 (CIFAR-10); student and stage-1 networks both start
from the stage-1 checkpoint (the stage-1 model runs under no-grad); the teacher's dropout; the
two-step sampler re-noises to ``t'`` (FastGen's ``t_list = [80, 1, 0]``). The reference continues
stage 1's Δt schedule (``resume_tick``): set ``start_stage`` to stage 1's last ECT stage.

The stage-1 network runs in the student's mode and from the online pass's RNG state, so its targets
share the online pass's dropout mask (an eval-mode stage-1 target against a dropout student is
dropout noise divided by a tiny Δt: the first digits run, 2.36 / 2.89 at 1 / 2 NFE from ect's
1.25 / 1.15, had this defect). The frozen stage-1 copy is kept as an EMA of decay 1 (``emas()``),
so checkpoints, ``--resume`` and ``load_run`` carry it without a new engine concept. Deviations:
ECT's untruncated log-normal stage 1 is whatever run ``--init`` names (``cd`` and ``scd`` students
are consistency functions too).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from scipy import stats
from torch import Tensor, nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods import Batch, EMASpec, register
from fewstep.methods._trajectory import sampling_sigmas
from fewstep.methods.ect import ECT, ECTConfig, ect_r
from fewstep.solvers import renoise_sample


@dataclass
class TCMConfig(ECTConfig):
    transition: float = 1.0  # t': the truncation level
    df: float = 0.01  # ln t ~ Student-t(df, 0, scale) truncated to [ln t', ln sigma_max]
    scale: float = 0.2
    boundary_share: float = 0.25  # floor(share * B) samples at t = t'
    boundary_weight: float = 0.1  # lambda_b
    start_stage: int = 0  # the ECT stage the Δt schedule continues from
    sample_sigmas: tuple[float, ...] = (1.0,)  # 2-step level: t'
    lr: float = 5e-5


def truncated_student_t(n: int, df: float, scale: float, lo: float, hi: float) -> Tensor:
    """``n`` draws of a Student-t (location 0) truncated to ``[lo, hi]`` by the inverse CDF; the
    uniform draws come from torch's global RNG (reproducible on resume)."""
    a, b = stats.t.cdf([lo, hi], df, scale=scale)
    u = a + (b - a) * torch.rand(n, dtype=torch.float64)
    x = torch.from_numpy(stats.t.ppf(u.numpy(), df, scale=scale))
    return x.clamp(lo, hi)


@register
class TCM(ECT):
    name = "tcm"
    paper = "2410.14895"
    title = "Truncated consistency models: a second stage on t >= t' with a boundary loss"
    Config = TCMConfig
    needs_init = True

    def __init__(self, teacher: Denoiser, config: TCMConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config, student)
        c = self.config
        if not teacher.sigma_min < c.transition < teacher.sigma_max or not 0 <= c.boundary_share < 1:
            raise FewstepError(
                f"need sigma_min < transition < sigma_max and 0 <= boundary_share < 1, got {c.transition}, "
                f"{c.boundary_share}"
            )
        self.stage_one = copy.deepcopy(self.student).requires_grad_(False)  # f_stage1, frozen

    def emas(self) -> dict[str, EMASpec]:
        return {"stage_one": EMASpec("student", 1.0)}  # decay 1: never moves; saved with checkpoints

    def stage(self, step: int) -> int:
        return self.config.start_stage + step // self.config.stage_iters

    def target(self, x_r: Tensor, r: Tensor, cond: Any) -> Tensor:
        """``sg f(x_r, r)``: the student at ``r >= t'``, the frozen stage-1 model below — in the
        student's mode and from the same RNG state, so both share the online pass's dropout mask
        (the reference runs the stage-1 network with the same RNG state)."""
        low = (r < self.config.transition).reshape(-1, *[1] * (x_r.ndim - 1))
        devices = [x_r.device] if x_r.device.type == "cuda" else []
        mode = self.stage_one.training
        with torch.random.fork_rng(devices=devices):  # the student's pass below starts from the same state
            self.stage_one.train(self.student.training)
            try:
                below = self.stage_one(x_r, r, cond)
            finally:
                self.stage_one.train(mode)
        return torch.where(low, below, self.student(x_r, r, cond))

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("tcm trains on real data; pass a dataset (e.g. --data digits)")
        c, x0 = self.config, batch.x
        nb = math.floor(c.boundary_share * x0.shape[0])
        lo, hi = math.log(c.transition), math.log(self.teacher.sigma_max)
        t = truncated_student_t(x0.shape[0], c.df, c.scale, lo, hi).exp().to(x0)
        t[:nb] = c.transition
        r = ect_r(t, self.stage(step), c.q, c.k, c.b, c.ratio_limit)
        per_sample = self.pair_loss(x0, batch.labels, t, r, torch.randn_like(x0))
        loss = per_sample[nb:].mean()
        if nb:
            loss = loss + c.boundary_weight * per_sample[:nb].mean()
        return {"student": loss}

    def denoise(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """The truncated consistency function at one level for the whole batch (sampling)."""
        net = self.student if float(sigma.reshape(-1)[0]) >= self.config.transition else self.stage_one
        return net(x, sigma, cond)

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        t = self.teacher
        sigmas = sampling_sigmas(steps, t.sigma_min, t.sigma_max, self.config.sample_sigmas)
        return renoise_sample(self.denoise, noise, sigmas, cond)
