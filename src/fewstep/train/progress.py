"""What a run reports while it trains: loss and gradient-norm windows, metrics lines, the bar."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fewstep.methods.base import OptimizerSpec
from fewstep.runs.folder import Metrics
from fewstep.train.config import TrainConfig

if TYPE_CHECKING:
    from fewstep.train.loop import Run


def log_window(run: Run, step: int, clock: dict, metrics: Metrics, bar: Progress | None) -> dict[str, float]:
    """Bring the window's statistics to the host (the one synchronisation per ``log_every``),
    write them to the metrics and the progress bar."""
    stats = run.window.flush(run.acc, run.counters)
    now = time.monotonic()
    rate = (step - clock["last_step"]) / max(now - clock["last"], 1e-9)
    clock.update(last=now, last_step=step)
    metrics.log(step, {**stats, "it_per_s": rate, "elapsed_s": now - clock["start"]})
    if bar is not None:
        bar.update(step, now - clock["start"], {k.split("/")[-1]: v for k, v in stats.items() if k.startswith("loss/")})
    return stats


class Window:
    """Losses and gradient norms between logging points. A step only appends device tensors to a
    list; every ``FOLD`` entries (and at each logging point) they are reduced to a finite-only sum
    and count on the device."""

    FOLD = 256

    def __init__(self, specs: dict[str, OptimizerSpec], device) -> None:
        zero = lambda: torch.zeros((), device=device)
        self.pending: dict[str, list[Tensor]] = {f"{kind}/{k}": [] for k in specs for kind in ("loss", "grad_norm")}
        self.totals = {name: [zero(), zero()] for name in self.pending}  # finite sum, finite count

    def add(self, k: str, loss: Tensor) -> None:
        self._append(f"loss/{k}", loss)

    def add_norm(self, k: str, norm: Tensor) -> None:
        self._append(f"grad_norm/{k}", norm)

    def _append(self, name: str, value: Tensor) -> None:
        self.pending[name].append(value)
        if len(self.pending[name]) >= self.FOLD:
            self._fold(name)

    def _fold(self, name: str) -> None:
        if self.pending[name]:
            v = torch.stack(self.pending[name]).float()
            ok = torch.isfinite(v)
            self.totals[name][0] += torch.where(ok, v, 0.0).sum()
            self.totals[name][1] += ok.float().sum()
            self.pending[name] = []

    def flush(self, acc, counters: dict[str, Tensor]) -> dict[str, float]:
        """Means over the window (averaged over processes); the one host transfer per window."""
        for name in self.pending:
            self._fold(name)
        names = list(self.totals)
        packed = torch.stack([t for n in names for t in self.totals[n]] + [counters["nonfinite"], counters["streak"]])
        if acc.num_processes > 1:
            packed = acc.reduce(packed, "mean")
        values = packed.tolist()
        out = {n: values[2 * i] / values[2 * i + 1] for i, n in enumerate(names) if values[2 * i + 1] > 0}
        out["nonfinite"], out["streak"] = values[-2], values[-1]
        for total in self.totals.values():
            total[0].zero_()
            total[1].zero_()
        return out


class Progress:
    """The run's progress bar, whose total and ETA follow the budget: iterations, minutes, or
    whichever ends first (in per mille of the budget when minutes are given). Where standard error
    is not a terminal (a log file, a notebook's captured output), a plain line at the logging
    points, at most one per 30 seconds."""

    def __init__(self, cfg: TrainConfig, step: int, name: str) -> None:
        import sys

        from tqdm.auto import tqdm

        self.steps, self.seconds, self.name, self.step0 = cfg.max_steps, cfg.minutes and cfg.minutes * 60, name, step
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0  # runs shorter than 30 s print no lines
        if self.seconds:
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
            self.bar = tqdm(total=1000, desc=name, bar_format=fmt, dynamic_ncols=True, disable=not self.tty)
        else:
            self.bar = tqdm(total=self.steps, initial=step, desc=name, dynamic_ncols=True, unit="it",
                            disable=not self.tty)  # fmt: skip

    def fraction(self, step: int, elapsed: float) -> float:
        done = step / self.steps if self.steps else 0.0
        return min(1.0, max(done, elapsed / self.seconds if self.seconds else 0.0))

    def update(self, step: int, elapsed: float, losses: dict[str, float]) -> None:
        shown = {k: f"{v:.4g}" for k, v in losses.items()}
        rate = (step - self.step0) / max(elapsed, 1e-9)
        if self.seconds:
            self.bar.set_postfix({"it": step, "it/s": f"{rate:.2f}", **shown}, refresh=False)
            self.bar.update(round(1000 * self.fraction(step, elapsed)) - self.bar.n)
        else:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)
        if not self.tty and (elapsed - self.last_line >= 30 or (self.last_line and self.fraction(step, elapsed) >= 1)):
            import sys

            self.last_line = elapsed
            f = self.fraction(step, elapsed)
            f0 = self.steps and not self.seconds and self.step0 / self.steps or 0.0
            eta = elapsed * (1 - f) / max(f - f0, 1e-9)
            loss = ", ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.name}: step {step} ({100 * f:.0f}%), {loss}, {rate:.2f} it/s, {elapsed / 60:.1f} min, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        self.bar.close()
