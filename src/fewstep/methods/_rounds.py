"""Round machinery of the methods that halve their step count round by round — progressive
distillation, guided distillation, SDXL-Lightning — and TRACT's phases (a helper, not a method).

Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2): in sigma-space DDIM
is Euler, ``x' = x0_hat + (s'/s)(x - x0_hat)``. Two teacher steps ``s -> s_mid -> s''`` give
``x''``; the student's x0-target ``x~`` is the one whose single step ``s -> s''`` lands on ``x''``:

    x~ = (x'' - (s''/s) x) / (1 - s''/s) = (s x'' - s'' x) / (s - s'')       (:func:`x0_target`)

(:func:`two_step_target`, :func:`pd_loss`). Grids: the round-0 teacher runs ``start_steps`` DDIM
steps on a Karras grid; a ``k``-step model uses every ``start_steps/k``-th point of it
(:func:`subgrid`), so each student step spans exactly two teacher steps.

Rounds are scheduled by iteration (:class:`RoundSchedule`), so every piece of state follows from the
iteration number plus the networks the engine checkpoints: each round's student that stays
evaluable is kept as an EMA copy ``student_<k>`` whose decay is 0 (an exact copy of the live
student) during the round that trains the ``k``-step student and 1 otherwise (:class:`RoundEMA`);
round ``r``'s teacher is the copy of round ``r - 1``'s student, so "teacher := student" happens at the
boundary without an engine hook. :class:`RoundMethod` holds this bookkeeping for PD, guided
distillation and Lightning (each method file keeps its own losses and sampling);
:class:`RoundAnneal` is the paper's per-round linear learning-rate decay.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.losses import loss_weight, weighted_mse
from fewstep.methods.base import EMASpec, Method, OptimizerSpec
from fewstep.schedules import halving_schedule, karras_sigmas
from fewstep.solvers import X0Fn, ddim_step
from fewstep.students import copy_teacher, set_dropout


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


def frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval().requires_grad_(False)


def kept_student(
    method: Method, fine: Tensor, kept: list[int], final: int, steps: int, rho: float
) -> tuple[nn.Module, Tensor]:
    """The network serving ``steps`` and its ``steps``-step grid (a subgrid of ``fine`` when
    ``steps`` divides its count, else a Karras grid). Of the trained counts ``kept + [final]`` it
    picks one by :func:`pick_steps`: ``final`` is ``method.student`` — the run's student, holding
    the engine's evaluation EMA at sampling time — the others the copies ``method.student_<k>``;
    from the fine grid's count up, the teacher."""
    n, teacher = len(fine) - 1, getattr(method, "start_teacher", method.teacher)
    if n % steps == 0:
        grid = subgrid(fine, steps)
    else:
        grid = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max, rho)
    if steps >= n:
        return teacher, grid
    k = pick_steps([*kept, final], steps)
    return (method.student if k == final else getattr(method, f"student_{k}")), grid


def pd_loss(
    student: X0Fn, teacher: X0Fn, x0: Tensor, n: int, fine: Tensor, weighting: str, sigma_data: float
) -> Tensor:
    """Algorithm 2 on a batch of data ``x0`` for an ``n``-step student of a ``2n``-step teacher on the
    fine grid ``fine``: ``x = x0 + s eps`` at a student grid level, the two-step target ``x~``, and
    ``weight(s) ||x_hat(x, s) - x~||^2`` (``snr_trunc``: ``max(SNR, 1)``, Sec. 4 / Eq. 10)."""
    g_s = subgrid(fine, n).to(x0)  # (n+1,) student grid, decreasing to 0
    g_t = subgrid(fine, 2 * n).to(x0)  # (2n+1,) teacher grid
    i = torch.randint(0, n, (x0.shape[0],), device=x0.device)  # student step index
    sigma, sigma_mid, sigma_next = g_s[i], g_t[2 * i + 1], g_s[i + 1]  # each (B,)
    x = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
    target = two_step_target(teacher, x, sigma, sigma_mid, sigma_next)
    return weighted_mse(student(x, sigma), target, loss_weight(sigma, weighting, sigma_data))


@dataclass
class RoundConfig:
    """The options every round-based method shares (its own Config adds to them)."""

    start_steps: int = 64  # round-0 teacher's DDIM steps (the paper starts at 8192 / 1024)
    end_steps: int = 1
    steps_per_round: int | tuple[int, ...] = 500  # one length or one per round; paper: 50k each
    lr: float = 1e-4  # paper: 5e-5 (CIFAR-10), 1e-4 (ImageNet-64)
    weighting: str = "snr_trunc"  # max(SNR, 1)
    grad_clip: float | None = None
    lr_anneal: bool = False  # paper: linear decay to 0 within each round
    dropout: float | None = 0.0  # the student's dropout (paper's CIFAR configs: 0); None: the teacher's
    rho: float = 7.0


class RoundMethod(Method):
    """The round bookkeeping of a method that halves its step count: the live ``student``, the kept
    copies ``student_<k>`` of the step counts in ``kept`` (each an EMA of the live student that is
    exact during the round producing it), each round's teacher, and the student serving a request
    for ``steps``. ``offset`` iterations precede round 0 (guided distillation's stage one)."""

    chains = False  # each round's teacher is the previous round's student, from the teacher on

    def __init__(self, teacher: Denoiser, config: RoundConfig, *, extra_dims: int = 0, offset: int = 0,
                 keep_first: bool = False, student: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__(teacher, config)
        c = self.config
        self.counts = halving_schedule(c.start_steps, c.end_steps)
        if len(self.counts) < 2:
            raise FewstepError(f"start_steps ({c.start_steps}) must exceed end_steps ({c.end_steps})")
        self.schedule = RoundSchedule(tuple(self.counts), c.steps_per_round, offset)
        self.fine = karras_sigmas(c.start_steps, teacher.sigma_min, teacher.sigma_max, c.rho)
        self.start_teacher = teacher  # round 0's teacher (a guided wrapper where a method's guidance asks)
        # round 0 starts from the teacher, or from a given student (a smaller network warmed up by compress)
        self.student = student if student is not None else copy_teacher(teacher, extra_dims=extra_dims)
        set_dropout(self.student, c.dropout)
        # each round's output but the last (the live student); with keep_first also stage one's
        self.kept = self.counts[:-1] if keep_first else self.counts[1:-1]
        for k in self.kept:
            setattr(self, f"student_{k}", frozen_copy(self.student))

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        anneal = RoundAnneal(self.schedule) if c.lr_anneal else None
        return {"student": OptimizerSpec(["student"], lr=c.lr, grad_clip=c.grad_clip, lr_schedule=anneal)}

    def emas(self) -> dict[str, EMASpec]:
        # the copy of k steps follows the live student during the round that trains it
        return {
            f"student_{k}": EMASpec("student", RoundEMA(self.schedule, self.counts.index(k) - 1)) for k in self.kept
        }

    def round_teacher(self, r: int) -> nn.Module:
        """Round ``r``'s teacher: the kept copy of ``counts[r]`` steps, else (round 0 of PD) the teacher
        (guided at the method's ``guidance`` where it has one)."""
        k = self.schedule.teacher_steps(r)
        return getattr(self, f"student_{k}") if k in self.kept else self.start_teacher

    def model_for(self, steps: int) -> tuple[nn.Module, Tensor]:
        """The kept student serving ``steps`` and its sampling grid (see :func:`kept_student`)."""
        return kept_student(self, self.fine, self.kept, self.counts[-1], steps, self.config.rho)
