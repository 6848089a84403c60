"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", arXiv 2202.00512).

Rounds halve the number of sampling steps, e.g. 64 -> 32 -> ... -> 1 (Sec. 4). In each round a
student initialised from the previous round's student learns to make one DDIM step do the work
of two DDIM steps of its teacher; the student then becomes the next round's teacher.

In sigma-space DDIM is Euler, ``x' = x0_hat + (s'/s)(x - x0_hat)``. Two teacher steps
``s -> s_mid -> s''`` give ``x''``; the student's x0-target ``x~`` is the one whose single step
``s -> s''`` lands on ``x''`` (Algorithm 2, the line defining ``x~``; with ``alpha = 1`` and
``sigma = s`` in the VE form):

    x~ = (x'' - (s''/s) x) / (1 - s''/s) = (s x'' - s'' x) / (s - s'')

and the loss is ``max(SNR, 1) ||x_hat(x, s) - x~||^2`` ("truncated SNR" weighting, Sec. 4 /
Eq. 10 with ``SNR = 1/s^2`` in sigma-space). Training points ``x = x0 + s eps`` use real data at
the student's grid points ``s`` (the discrete-time loss of Algorithm 2).

Grids: the round-0 teacher runs ``start_steps`` DDIM steps on a Karras grid (rho = 7, the EDM
teacher's grid); a ``k``-step model uses every ``start_steps/k``-th point of it, so each
student step spans exactly two teacher steps.

Rounds are scheduled by iteration (``steps_per_round``), so every piece of state follows from the
iteration number plus the networks the engine checkpoints: each round's student but the last is
kept as an EMA copy ``student_<k>`` (decay 0 — an exact copy of the live student — during the
round that trains the ``k``-step student, decay 1 otherwise). Round ``r``'s teacher is the previous
round's copy, so "teacher := student" happens at the boundary without an engine hook. Every
round's student stays evaluable: ``sample(noise, steps=k)`` uses the student trained for ``k``
steps — the kept copy, or for the last round the run's ``student`` (which holds the engine's
evaluation EMA when sampling; the paper uses no EMA, so run with ``ema_decay=0`` or make the last
round long enough that the EMA forgets the earlier rounds).

Deviations: the paper trains each round with a fresh optimizer whose learning rate decays linearly
(lr 5e-5 on CIFAR-10, 1e-4 on ImageNet-64, 50k updates per round); here one Adam runs through all
rounds (the engine owns optimizers), at a constant rate unless ``lr_anneal`` (the paper's decay,
off by default because the last round has no fixed end). The paper's networks predict x (or
"both"/v); here the student is the teacher's EDM-preconditioned x0-predictor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.methods import register
from fewstep.methods.base import Batch, EMASpec, Method, OptimizerSpec
from fewstep.schedules import halving_schedule, karras_sigmas
from fewstep.students import copy_teacher

X0Fn = Callable[[Tensor, Tensor], Tensor]  # (x, sigma (B,)) -> x0_hat

# --- the maths, shared with TRACT and guided distillation ---------------------------------------


def ddim_step(x: Tensor, x0: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Deterministic DDIM (= Euler in sigma-space): ``x' = x0 + (s'/s)(x - x0)``; per-sample sigmas."""
    ratio = append_dims(sigma_next / sigma, x.ndim)
    return x0 + ratio * (x - x0)


def x0_target(x: Tensor, x_next: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The ``x~`` whose DDIM step ``sigma -> sigma_next`` from ``x`` lands on ``x_next``
    (Salimans & Ho 2022, Algorithm 2): ``x~ = (s x_next - s' x) / (s - s')``."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    return (s * x_next - s_next * x) / (s - s_next)


@torch.no_grad()
def two_step_target(teacher: X0Fn, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor) -> Tensor:
    """Algorithm 2: two teacher DDIM steps ``s -> s_mid -> s''``, then the x0-target ``x~``."""
    x_mid = ddim_step(x, teacher(x, sigma), sigma, sigma_mid)
    x_next = ddim_step(x_mid, teacher(x_mid, sigma_mid), sigma_mid, sigma_next)
    return x0_target(x, x_next, sigma, sigma_next)


def loss_weight(sigma: Tensor, kind: str = "snr_trunc", sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight of an x0-space squared error. ``snr_trunc``: ``max(SNR, 1)`` with
    ``SNR = 1/sigma^2`` (Salimans & Ho 2022, Sec. 4); ``edm``: ``(s^2 + sd^2)/(s sd)^2`` (Karras
    et al. 2022, Table 1 — TRACT's EDM variant); ``constant``: 1."""
    if kind == "snr_trunc":
        return sigma.pow(-2).clamp_min(1.0)
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if kind == "constant":
        return torch.ones_like(sigma)
    raise FewstepError(f"unknown weighting {kind!r}; use snr_trunc, edm or constant")


def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``mean_b w_b * mean_dims (pred - target)^2``."""
    return (weight * (pred - target).square().flatten(1).mean(1)).mean()


def subgrid(fine: Tensor, steps: int) -> Tensor:
    """The ``steps``-step grid inside a decreasing grid ``fine`` (ending in 0): every
    ``(len(fine)-1)/steps``-th point. Raises when ``steps`` does not divide the fine count."""
    n = len(fine) - 1
    if steps < 1 or n % steps:
        raise FewstepError(f"{steps} steps do not divide the {n}-step grid; use a divisor of {n}")
    return fine[:: n // steps]


def pick_steps(trained: list[int], steps: int) -> int:
    """Which trained step count serves a request for ``steps``: the exact one, else the largest
    trained count below it, else the smallest trained count."""
    if steps in trained:
        return steps
    below = [k for k in trained if k < steps]
    return max(below) if below else min(trained)


@dataclass(frozen=True)
class RoundSchedule:
    """Rounds by iteration: round ``r`` turns a ``counts[r]``-step teacher into a
    ``counts[r+1]``-step student over ``steps_per_round`` iterations (one length for all rounds,
    or one per round), starting after ``offset`` iterations (round -1 before that). The last
    round continues past its nominal end."""

    counts: tuple[int, ...]
    steps_per_round: int | tuple[int, ...]
    offset: int = 0

    def __post_init__(self) -> None:
        spr = self.steps_per_round
        lengths = (spr,) if isinstance(spr, int) else tuple(spr)
        if not isinstance(spr, int) and len(lengths) != self.rounds:
            raise FewstepError(f"{len(lengths)} round lengths given for {self.rounds} rounds ({list(self.counts)})")
        if any(n < 1 for n in lengths):
            raise FewstepError(f"round lengths must be >= 1 iteration, got {list(lengths)}")

    @property
    def rounds(self) -> int:
        return len(self.counts) - 1

    def length(self, r: int) -> int:
        spr = self.steps_per_round
        return spr if isinstance(spr, int) else spr[r]

    def start(self, r: int) -> int:
        return self.offset + sum(self.length(i) for i in range(r))

    def round_of(self, iteration: int) -> int:
        if iteration < self.offset:
            return -1
        r = 0
        while r < self.rounds - 1 and iteration >= self.start(r + 1):
            r += 1
        return r

    def teacher_steps(self, r: int) -> int:
        return self.counts[r]

    def student_steps(self, r: int) -> int:
        return self.counts[r + 1]


class RoundEMA:
    """EMA decay of a per-round copy: active only during round ``r`` (decay 1 elsewhere). Inside the
    round it is the bias-corrected EMA of ``momentum`` counted from the round's start, so the first
    update copies the live student; ``momentum = 0`` keeps an exact copy."""

    def __init__(self, schedule: RoundSchedule, r: int, momentum: float = 0.0) -> None:
        self.schedule, self.r, self.momentum = schedule, r, momentum

    def __call__(self, iteration: int) -> float:
        if self.schedule.round_of(iteration) != self.r:
            return 1.0
        n = iteration - self.schedule.start(self.r) if self.r >= 0 else iteration
        m = self.momentum
        return 0.0 if m == 0 else 1.0 - (1.0 - m) / (1.0 - m ** (n + 1))


class RoundAnneal:
    """Learning-rate multiplier annealed linearly to 0 over each round (Salimans & Ho 2022,
    Sec. 5 / Appendix: "learning rate ... linearly annealed" within every halving); it stays at 0
    past the last round's nominal end. Input: the optimizer's step count (= the iteration)."""

    def __init__(self, schedule: RoundSchedule) -> None:
        self.schedule = schedule

    def __call__(self, k: int) -> float:
        s, r = self.schedule, self.schedule.round_of(k)
        if r < 0:
            return 1.0
        return max(1.0 - (k - s.start(r)) / s.length(r), 0.0)


def set_dropout(net: nn.Module, p: float | None) -> None:
    """Set the dropout rate of a student copied from the teacher (``None`` keeps the teacher's):
    ``nn.Dropout`` modules and fewstep blocks with a float ``dropout`` attribute."""
    if p is None:
        return
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = p
    config = getattr(getattr(net, "net", None), "config", None)
    if config is not None and hasattr(config, "dropout"):
        config.dropout = p


def frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)


# --- the method -----------------------------------------------------------------------------------


@dataclass
class ProgressiveConfig:
    start_steps: int = 64  # round-0 teacher's DDIM steps (the paper starts at 8192 / 1024)
    end_steps: int = 1
    steps_per_round: int | tuple[int, ...] = 500  # one length or one per round; paper: 50k each
    lr: float = 1e-4  # paper: 5e-5 (CIFAR-10), 1e-4 (ImageNet-64)
    weighting: str = "snr_trunc"  # max(SNR, 1)
    grad_clip: float | None = None
    lr_anneal: bool = False  # paper: linear decay to 0 within each round
    dropout: float | None = 0.0  # the student's dropout (paper's CIFAR configs: 0); None: the teacher's
    rho: float = 7.0


@register
class ProgressiveDistillation(Method):
    name = "progressive"
    family = "trajectory"
    paper = "2202.00512"
    title = "Progressive distillation (Salimans & Ho 2022)"
    needs_data = True
    Config = ProgressiveConfig

    def __init__(self, teacher: Denoiser, config: ProgressiveConfig | None = None, extra_dims: int = 0) -> None:
        super().__init__(teacher, config)
        c = self.config
        self.counts = halving_schedule(c.start_steps, c.end_steps)
        if len(self.counts) < 2:
            raise FewstepError(f"start_steps ({c.start_steps}) must exceed end_steps ({c.end_steps})")
        self.schedule = RoundSchedule(tuple(self.counts), c.steps_per_round, self._offset())
        self.fine = karras_sigmas(c.start_steps, teacher.sigma_min, teacher.sigma_max, c.rho)
        self.student = copy_teacher(teacher, extra_dims=extra_dims)
        set_dropout(self.student, c.dropout)
        for k in self._kept_counts():
            setattr(self, f"student_{k}", frozen_copy(self.student))

    def _offset(self) -> int:
        return 0

    def _kept_counts(self) -> list[int]:
        """Step counts with a kept copy: each round's output but the last (the live student)."""
        return self.counts[1:-1]

    def _copy_round(self, k: int) -> int:
        """The round whose live student is copied into ``student_<k>``."""
        return self.counts.index(k) - 1

    # --- engine contract ---------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        anneal = RoundAnneal(self.schedule) if c.lr_anneal else None
        return {"student": OptimizerSpec(["student"], lr=c.lr, grad_clip=c.grad_clip, lr_schedule=anneal)}

    def emas(self) -> dict[str, EMASpec]:
        return {
            f"student_{k}": EMASpec("student", RoundEMA(self.schedule, self._copy_round(k)))
            for k in self._kept_counts()
        }

    # --- maths --------------------------------------------------------------------------------
    def round_teacher(self, r: int) -> nn.Module:
        """Round ``r``'s teacher: the original teacher in round 0, else round ``r-1``'s student."""
        return self.teacher if r == 0 else getattr(self, f"student_{self.schedule.teacher_steps(r)}")

    def pd_loss(self, student: X0Fn, teacher: X0Fn, x0: Tensor, n: int) -> Tensor:
        """Algorithm 2 on a batch of data ``x0`` for an ``n``-step student of a ``2n``-step teacher."""
        g_s = subgrid(self.fine, n).to(x0)  # (n+1,) student grid, decreasing to 0
        g_t = subgrid(self.fine, 2 * n).to(x0)  # (2n+1,) teacher grid
        i = torch.randint(0, n, (x0.shape[0],), device=x0.device)  # student step index
        sigma, sigma_mid, sigma_next = g_s[i], g_t[2 * i + 1], g_s[i + 1]  # each (B,)
        x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        target = two_step_target(teacher, x, sigma, sigma_mid, sigma_next)
        w = loss_weight(sigma, self.config.weighting, self.teacher.sigma_data)
        return weighted_mse(student(x, sigma), target, w)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        if batch.x is None:
            raise FewstepError("progressive distillation needs real data; pass a dataset")
        r = self.schedule.round_of(step)
        teacher, labels = self.round_teacher(r), batch.labels
        return {
            "student": self.pd_loss(
                lambda x, s: self.student(x, s, labels),
                lambda x, s: teacher(x, s, labels),
                batch.x,
                self.schedule.student_steps(r),
            )
        }

    def model_for(self, steps: int) -> tuple[nn.Module, Tensor]:
        """The kept student serving ``steps`` and its sampling grid (see :func:`kept_student`)."""
        return kept_student(self, self.fine, self._kept_counts(), self.counts[-1], steps, self.config.rho)

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """DDIM with the student trained for ``steps`` steps on its own grid."""
        net, grid = self.model_for(steps)
        return ddim_sample(lambda x, s: net(x, s, cond), noise, grid)


def kept_student(
    method: Method, fine: Tensor, kept: list[int], final: int, steps: int, rho: float
) -> tuple[nn.Module, Tensor]:
    """The network serving ``steps`` and its ``steps``-step grid (a subgrid of ``fine`` when
    ``steps`` divides its count, else a Karras grid). Of the trained counts ``kept + [final]`` it
    picks one by :func:`pick_steps`: ``final`` is ``method.student`` — the run's student, holding
    the engine's evaluation EMA at sampling time — the others the copies ``method.student_<k>``;
    from the fine grid's count up, the teacher."""
    n, teacher = len(fine) - 1, method.teacher
    if n % steps == 0:
        grid = subgrid(fine, steps)
    else:
        grid = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max, rho)
    if steps >= n:
        return teacher, grid
    k = pick_steps([*kept, final], steps)
    return (method.student if k == final else getattr(method, f"student_{k}")), grid


@torch.no_grad()
def ddim_sample(model: X0Fn, noise: Tensor, grid: Tensor) -> Tensor:
    """DDIM along a decreasing ``grid`` (ending in 0) from ``grid[0] * noise``."""
    x = noise * float(grid[0])
    for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        sigma = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        x = ddim_step(x, model(x, sigma), sigma, torch.full_like(sigma, s_next))
    return x
