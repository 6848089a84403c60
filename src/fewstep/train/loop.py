"""The training loop: one function, :func:`train`, that runs any :class:`~fewstep.methods.Method`.

Read it top to bottom: set up (devices, optimizers, EMAs, data, resume), then iterate. One
iteration draws ``grad_accum`` micro-batches, asks the method for the losses of the optimizers that
are due, back-propagates each loss into its own optimizer's parameters only
(``backward(inputs=...)``, so gradients never leak between optimizers and the frozen teacher never
gets any; under FSDP2, where sharded parameters cannot be ``inputs=``, a backward into all
trainable parameters whose other optimizers' part is discarded), averages gradients over processes,
clips, steps, and updates the EMA copies of the networks that stepped. Everything between logging
points stays on the device.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewstep.data import Dataset
from fewstep.errors import FewstepError
from fewstep.methods.base import EMASpec, Method, OptimizerSpec
from fewstep.runs import checkpoints as runck
from fewstep.runs.folder import Metrics
from fewstep.train.checkpoint import restore, save
from fewstep.train.config import TrainConfig
from fewstep.train.distributed import (
    FSDP1_REFUSED,
    all_finite,
    all_reduce_grads,
    clock_passed,
    fsdp_plugin,
    full,
    isolated_backward,
    make_accelerator,
    shard,
    stop_reason,
)
from fewstep.train.ema import EMA, swap_weights
from fewstep.train.feed import Feeder, check_data, teacher_data
from fewstep.train.progress import Progress, Window, log_window

EvalHook = Callable[[Method, int, Path], "dict[str, float] | None"]
DATA_STREAM = 1 << 32  # seed-sequence key of the shared data sampler (ranks use 0 .. world-1)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message


def derive_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for ``stream`` (a process rank, or the data sampler) of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_process(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's RNG of this process."""
    import random

    s = derive_seed(seed, rank)
    torch.manual_seed(s)
    np.random.seed(s % (1 << 32))
    random.seed(s)


def check_run(cfg: TrainConfig, method: Method, data: Dataset | None, world: int, device) -> None:
    """One-line errors for a run that cannot start (checked before anything is written)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise FewstepError(
            "accelerate is configured for DEEPSPEED, which the engine does not support; use a data-parallel or "
            "FSDP config (fsdp_version: 2, docs/engine.md)"
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise FewstepError(FSDP1_REFUSED)
    if cfg.batch % (world * cfg.grad_accum):
        raise FewstepError(f"batch {cfg.batch} must divide by processes x grad_accum = {world * cfg.grad_accum}")
    if cfg.mixed_precision == "fp16" and torch.device(device).type != "cuda":
        raise FewstepError("mixed_precision fp16 needs a GPU; use bf16 on the CPU")
    for spec in method.optimizers().values():
        check_optimizer(spec)
    if getattr(method, "needs_data", False) and data is None:
        raise FewstepError(f"method {method.name!r} needs data; pass --data (e.g. digits)")
    if data is not None:
        check_data(data, method.teacher)


def check_optimizer(spec: OptimizerSpec) -> None:
    """One-line error for optimizer settings torch would refuse with a traceback."""
    b1, b2 = spec.betas
    if not (spec.lr > 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and spec.eps > 0 and spec.weight_decay >= 0):
        raise FewstepError(
            f"optimizer over {', '.join(spec.networks)}: lr must be > 0, betas in [0, 1), eps > 0 and weight_decay "
            f">= 0; got lr={spec.lr}, betas={tuple(spec.betas)}, eps={spec.eps}, weight_decay={spec.weight_decay}"
        )


def make_optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer of ``spec``; Adam/AdamW use the fused kernel, which can skip a step
    on a device-side flag (``found_inf``) without a host synchronisation."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    if spec.kind not in kinds:
        raise FewstepError(f"unknown optimizer kind {spec.kind!r}; use one of {', '.join(kinds)}")
    check_optimizer(spec)
    kwargs = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.kind in ("adam", "adamw"):
        try:
            return kinds[spec.kind](params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device/dtype without the fused kernel
            pass
    return kinds[spec.kind](params, **kwargs)


def steps_taken(spec: OptimizerSpec, iteration: int) -> int:
    """How many times ``spec`` stepped before ``iteration`` (its learning-rate schedule's input)."""
    return spec.steps_before(iteration)


@dataclass
class Run:
    """A run in progress: what :func:`train` built, handed to the iteration, checkpoints and logs."""

    method: Method
    setup: Setup
    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    feeder: Feeder
    counters: dict[str, Tensor]  # device-side: non-finite iterations in all, and in a row
    window: Window
    dir: Path


@dataclass
class Tracked:
    """An EMA copy a method's loss reads: its tracker, its spec (the decay) and the optimizer that
    steps its source (the copy is updated after that optimizer's steps only)."""

    ema: EMA
    spec: EMASpec
    owner: str


@dataclass
class Setup:
    """What :func:`train` builds from a method (also used by ``load_run``)."""

    nets: dict[str, nn.Module]
    specs: dict[str, OptimizerSpec]
    params: dict[str, list[nn.Parameter]]
    emas: dict[str, Tracked]  # the method's EMA copies by attribute name
    eval_ema: EMA
    student_opt: str
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    frozen: list[nn.Module] = field(default_factory=list)  # frozen() networks (FSDP2 shards them too)
    sharded: bool = False  # FSDP2: trainable networks sharded over processes


def prepare(method: Method, device: torch.device | str) -> Setup:
    """Check the method against the engine contract, place every network on ``device``, freeze
    the frozen ones, and build the EMA trackers. One-line errors for a broken contract."""
    nets, frozen, specs, ema_specs = method.networks(), method.frozen(), method.optimizers(), method.emas()
    if "student" not in nets:
        raise FewstepError(f"method {method.name!r}: networks() must include 'student' (the network users sample)")
    owner: dict[str, str] = {}
    for opt_name, spec in specs.items():
        for net in spec.networks:
            if net not in nets:
                raise FewstepError(f"method {method.name!r}: optimizer {opt_name!r} names unknown network {net!r}")
            if net in owner:
                raise FewstepError(f"method {method.name!r}: network {net!r} is in two optimizers")
            owner[net] = opt_name
        if spec.every < 1 or not spec.offsets or not all(0 <= o < spec.every for o in spec.offsets):
            raise FewstepError(
                f"method {method.name!r}: optimizer {opt_name!r} needs every >= 1 and 0 <= offset < every"
            )
    if set(nets) - set(owner):
        raise FewstepError(f"method {method.name!r}: network(s) {sorted(set(nets) - set(owner))} have no optimizer")
    for name, module in {**frozen, **{k: getattr(method, k, None) for k in ema_specs}}.items():
        if module is None:
            raise FewstepError(f"method {method.name!r}: EMA copy {name!r} must be an attribute of the method")
        module.to(device).eval().requires_grad_(False)
    for net in nets.values():
        net.to(device).train()
    trainable = {id(p) for n in nets.values() for p in n.parameters()}
    for name, module in frozen.items():
        if any(id(p) in trainable for p in module.parameters()):
            raise FewstepError(
                f"method {method.name!r}: frozen network {name!r} shares parameters with a trainable one"
            )
    params = {k: [p for n in s.networks for p in nets[n].parameters() if p.requires_grad] for k, s in specs.items()}
    emas = {}
    for name, spec in ema_specs.items():
        if spec.source not in nets:
            raise FewstepError(f"method {method.name!r}: EMA {name!r} follows unknown network {spec.source!r}")
        emas[name] = Tracked(EMA(getattr(method, name), nets[spec.source]), spec, owner[spec.source])
    eval_ema = EMA.copy_of(nets["student"])
    return Setup(nets, specs, params, emas, eval_ema, owner["student"], frozen=list(frozen.values()))


@contextmanager
def sampling_weights(method: Method, setup: Setup):
    """Evaluation mode with the evaluation EMA in the student's place; the training RNG and
    weights are restored afterwards, so sampling never changes a run's trajectory."""
    student = setup.nets["student"]
    devices = [student_device(setup).index or 0] if student_device(setup).type == "cuda" else []
    modes = {k: n.training for k, n in setup.nets.items()}
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        swap_weights(student, setup.eval_ema.target)
        for n in setup.nets.values():
            n.eval()
        try:
            yield
        finally:
            swap_weights(student, setup.eval_ema.target)
            for k, n in setup.nets.items():
                n.train(modes[k])


def student_device(setup: Setup) -> torch.device:
    return next(setup.nets["student"].parameters()).device


class _Signals:
    """SIGINT/SIGTERM set a flag (the loop saves and stops); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --- the loop -----------------------------------------------------------------------------------
def train(
    method: Method,
    cfg: TrainConfig,
    run_dir: str | Path,
    data: Dataset | None = None,
    eval_hook: EvalHook | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``method`` under ``cfg``, writing checkpoints, metrics and samples into ``run_dir``.

    Returns a summary ``{"step", "stopped_by", "nonfinite", "minutes"}``; ``stopped_by`` is
    ``max_steps`` or ``minutes``. Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (a
    checkpoint is saved first) and :class:`FewstepError` after ``max_nonfinite`` non-finite
    iterations in a row (no checkpoint is written, the last one stays intact).
    """
    run_dir = Path(run_dir)
    acc = make_accelerator(cfg)
    rank, world, device, main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
    if data is not None:
        data = teacher_data(data, method.teacher)
    check_run(cfg, method, data, world, device)
    micro = cfg.batch // (world * cfg.grad_accum)

    setup = prepare(method, device)
    if world > 1:  # identical starting weights on every process
        for p in [p for n in setup.nets.values() for p in n.state_dict().values()] + setup.eval_ema.target_params:
            torch.distributed.broadcast(p.data, 0)
    plugin = fsdp_plugin(acc)
    if plugin is not None:
        shard(setup, plugin)
    setup.optimizers = {k: make_optimizer(s, setup.params[k]) for k, s in setup.specs.items()}
    needs = data if getattr(method, "needs_data", False) else None
    data_seed = derive_seed(cfg.seed, DATA_STREAM)
    feeder = Feeder(needs, method.teacher.num_classes, micro, rank, world, cfg.grad_accum, data_seed, device)
    counters = {"nonfinite": torch.zeros((), device=device), "streak": torch.zeros((), device=device)}
    run = Run(method, setup, cfg, acc, feeder, counters, Window(setup.specs, device), run_dir)
    step = 0
    if resume:
        step = restore(run)
    else:
        seed_process(cfg.seed, rank)

    metrics = Metrics(run_dir, enabled=main, resume_step=step if resume else None)
    clock = {"start": time.monotonic(), "last": time.monotonic(), "last_step": step}
    deadline = clock["start"] + cfg.minutes * 60 if cfg.minutes else math.inf
    marks = sorted(m for m in cfg.snapshot_minutes if not cfg.minutes or m < cfg.minutes)  # minute-mark checkpoints
    total = cfg.max_steps if cfg.max_steps is not None else math.inf
    bar = Progress(cfg, step, method.name) if main else None
    stopped_by, last_saved = ("max_steps" if step >= total else None), (step if resume else -1)
    try:
        with _Signals() as signals:
            while stopped_by is None:
                due = [k for k, s in setup.specs.items() if s.due(step)]
                iteration(run, step, due)
                step += 1
                at_log = step % cfg.log_every == 0 or step >= total
                if world == 1 or at_log:  # processes agree on stopping only at logging points
                    stopped_by = stop_reason(step, total, deadline, signals.received, acc, world)
                if at_log or stopped_by:
                    stats = log_window(run, step, clock, metrics, bar)
                    if stats["streak"] >= cfg.max_nonfinite:
                        raise nonfinite_error(stats, step, run_dir)
                snap = None
                if marks and (world == 1 or at_log) and clock_passed(clock["start"] + marks[0] * 60, acc, world):
                    snap = {"snapshot_minutes": marks[0], "elapsed_minutes": (time.monotonic() - clock["start"]) / 60}
                    marks.pop(0)
                if stopped_by or snap or step % cfg.checkpoint_every == 0:
                    save(run, step, snap)
                    last_saved = step
                if cfg.sample_every and step % cfg.sample_every == 0 and not stopped_by:
                    sample_grids(run, step)
                if eval_hook is not None and cfg.eval_every and step % cfg.eval_every == 0 and not stopped_by:
                    run_eval(run, eval_hook, step, metrics)
        if stopped_by in ("SIGINT", "SIGTERM"):
            raise TrainingInterrupted(
                getattr(signal, stopped_by),
                f"{stopped_by} at step {step}: checkpoint saved in {run_dir / 'checkpoints'}; continue with --resume",
            )
        assert last_saved == step
        sample_grids(run, step)
        if eval_hook is not None:
            run_eval(run, eval_hook, step, metrics)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    minutes = round((time.monotonic() - clock["start"]) / 60, 3)
    return {"step": step, "stopped_by": stopped_by, "nonfinite": int(counters["nonfinite"]), "minutes": minutes}


def nonfinite_error(stats: dict[str, float], step: int, run_dir: Path) -> FewstepError:
    last = runck.checkpoint_dirs(run_dir / "checkpoints")
    return FewstepError(
        f"{int(stats['streak'])} non-finite losses in a row by step {step} ({int(stats['nonfinite'])} in all); "
        f"stopped without saving — the last checkpoint ({last[0].name if last else 'none'}) is intact: "
        "lower the learning rate or check the method's options, then --resume"
    )


def iteration(run: Run, step: int, due: list[str]) -> None:
    """One iteration: losses of the due optimizers over ``grad_accum`` micro-batches, a backward
    pass per loss into its own optimizer's parameters, gradient averaging over processes, clipping,
    the optimizer steps (skipped on the device when any loss is non-finite), EMA updates."""
    if not due:
        return
    method, setup, acc, cfg, counters, window = run.method, run.setup, run.acc, run.cfg, run.counters, run.window
    for k in due:
        setup.optimizers[k].zero_grad(set_to_none=True)
    stash: dict[str, list[Tensor | None]] = {k: [None] * len(setup.params[k]) for k in due} if setup.sharded else {}
    seen = []  # every loss of the iteration, detached
    autocast = acc.autocast if cfg.mixed_precision != "no" else nullcontext
    for batch in run.feeder.iteration():
        with autocast():
            losses = method.losses(batch, step, set(due))
        if set(losses) != set(due):
            raise FewstepError(
                f"method {method.name!r} returned losses {sorted(losses)} for due optimizers {sorted(due)}"
            )
        for j, k in enumerate(due):
            loss = losses[k] / cfg.grad_accum if cfg.grad_accum > 1 else losses[k]
            if acc.scaler is not None:  # fp16: accelerate's gradient scaler
                loss = acc.scaler.scale(loss)
            if setup.sharded:
                isolated_backward(setup, loss, j < len(due) - 1, k, stash[k])
            else:
                loss.backward(inputs=setup.params[k], retain_graph=j < len(due) - 1)
            seen.append(losses[k].detach())
            window.add(k, seen[-1])
    finite = torch.isfinite(torch.stack(seen) if len(seen) > 1 else seen[0]).all()
    if setup.sharded:  # FSDP already averaged (reduce-scattered) the gradients over processes
        for k in setup.params:
            for p in setup.params[k]:
                p.grad = None
        for k in due:
            for p, g in zip(setup.params[k], stash[k], strict=True):
                p.grad = g
    if acc.num_processes > 1:
        if not setup.sharded:
            for k in due:
                all_reduce_grads(setup.params[k], acc.num_processes)
        finite = all_finite(finite)
    bad = (~finite).float()
    for k in due:
        spec, opt = setup.specs[k], setup.optimizers[k]
        if acc.scaler is not None:
            acc.scaler.unscale_(opt)
        if spec.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(setup.params[k], spec.grad_clip)
            window.add_norm(k, full(norm))
        if spec.lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = spec.lr * float(spec.lr_schedule(steps_taken(spec, step)))
        if acc.scaler is not None:
            acc.scaler.step(opt)
        elif getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = None, bad  # fused kernels skip the update when found_inf != 0
            opt.step()
            del opt.grad_scale, opt.found_inf
        elif bool(finite):  # non-fused optimizers (RAdam): one host synchronisation
            opt.step()
    if acc.scaler is not None:
        acc.scaler.update()
    keep = 1.0 - bad
    for t in setup.emas.values():
        if t.owner in due:
            t.ema.update((1.0 - t.spec.value(step)) * keep)
    if setup.student_opt in due:
        setup.eval_ema.update((1.0 - cfg.eval_ema_decay(step)) * keep)
    counters["nonfinite"] += bad
    counters["streak"].mul_(bad).add_(bad)


# --- samples and evaluation ---------------------------------------------------------------------
def sample_grids(run: Run, step: int) -> None:
    """Seeded sample grids of the evaluation EMA at each of the method's step counts."""
    method, setup, acc, n, run_dir = run.method, run.setup, run.acc, run.cfg.sample_n, run.dir
    if acc.is_main_process and n and not setup.sharded:  # FSDP: sample the saved run (fewstep sample)
        from fewstep.seeding import seeded_labels, seeded_noise
        from fewstep.viz import save_samples

        teacher, device = method.teacher, student_device(setup)
        seeds = range(n)
        noise = seeded_noise(seeds, teacher.sample_shape).to(device)
        labels = seeded_labels(seeds, teacher.num_classes)
        labels = labels.to(device) if labels is not None else None
        with sampling_weights(method, setup):
            for k in getattr(method, "default_steps", (1,)):
                try:
                    x = method.sample(noise, k, cond=labels)
                except NotImplementedError:
                    break
                path = run_dir / "samples" / f"step-{step:08d}-{k}step.png"
                save_samples(x.float().cpu(), labels, seeds, path, model=teacher)
    acc.wait_for_everyone()


def run_eval(run: Run, hook: EvalHook, step: int, metrics: Metrics) -> None:
    """Call the evaluation hook on the main process with the evaluation EMA in place."""
    method, setup, acc, run_dir = run.method, run.setup, run.acc, run.dir
    if acc.is_main_process and not setup.sharded:  # FSDP: evaluate the saved run (fewstep eval)
        with sampling_weights(method, setup):
            result = hook(method, step, run_dir)
        if result:
            metrics.log(step, {f"eval/{k}": float(v) for k, v in result.items()})
    acc.wait_for_everyone()
