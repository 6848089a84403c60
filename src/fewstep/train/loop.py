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
from fewstep.methods.base import Method, OptimizerSpec
from fewstep.train import checkpoint as ckpt
from fewstep.train.config import TrainConfig
from fewstep.train.ema import EMA, swap_weights
from fewstep.train.feed import Feeder, check_data
from fewstep.train.rundir import Metrics

EvalHook = Callable[[Method, int, Path], "dict[str, float] | None"]
FSDP1_REFUSED = (
    "accelerate is configured for FSDP version 1, which wraps the method's networks; the engine runs FSDP2 "
    "(fully_shard, in place): set fsdp_version: 2 in the accelerate config (docs/engine.md)"
)
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


def make_accelerator(cfg: TrainConfig):
    """An :class:`accelerate.Accelerator` for ``cfg`` (a second in-process run may change the
    precision: accelerate's process-wide state is then reset, the process group kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") != cfg.mixed_precision or state.get("_cpu", False) != cfg.cpu):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)


def fsdp_plugin(acc):
    """accelerate's FSDP plugin when the launch configures FSDP (``ACCELERATE_USE_FSDP``), else ``None``.
    accelerate 1.15 builds it only for GPUs; on the CPU it is built here from the same environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise FewstepError(FSDP1_REFUSED)
    return plugin


def shard(setup: Setup, plugin) -> None:
    """FSDP2: shard every trainable network in place with ``fully_shard`` (accelerate's plugin
    settings; ``fsdp_transformer_layer_cls_to_wrap`` etc. are not applied: one unit per network).
    The frozen networks (``frozen()``: the teacher, feature nets) are sharded too, one unit per
    submodule that owns parameters (bottom-up), so that any forward through them — also a
    submodule's, as feature extractors call — gathers what it needs; a network shared by several
    attributes is sharded once, in place. EMA copies (a method's targets and the evaluation EMA) are
    sharded like their sources, so each process updates its own shards with no communication, and a
    method's target network runs as a sharded module (every process calls it, as in its step)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = dict(
        reshard_after_forward=plugin.reshard_after_forward,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        offload_policy=plugin.cpu_offload,
    )
    for net in setup.nets.values():
        fully_shard(net, **options)
    for tracker in [*(t for t, _, _ in setup.emas.values()), setup.eval_ema]:
        fully_shard(tracker.target, **options)  # one unit per copy, as its source: identical placements
    for net in setup.frozen:
        for module in reversed(list(net.modules())):  # children before their parents
            own = list(module.parameters(recurse=False))
            if own and not any(hasattr(p, "device_mesh") for p in own):  # not sharded yet (shared modules)
                fully_shard(module, **options)
    setup.params = {
        k: [p for n in s.networks for p in setup.nets[n].parameters() if p.requires_grad]
        for k, s in setup.specs.items()
    }
    setup.emas = {k: (EMA(t.target, setup.nets[spec.source]), spec, o) for k, (t, spec, o) in setup.emas.items()}
    setup.eval_ema = EMA(setup.eval_ema.target, setup.nets["student"])
    setup.sharded = True


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded (DTensor) one — a collective: every process must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
class Setup:
    """What :func:`train` builds from a method (also used by ``load_run``)."""

    nets: dict[str, nn.Module]
    specs: dict[str, OptimizerSpec]
    params: dict[str, list[nn.Parameter]]
    emas: dict[str, tuple[EMA, Any, str]]  # attribute -> (tracker, decay, optimizer that owns its source)
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
        emas[name] = (EMA(getattr(method, name), nets[spec.source]), spec, owner[spec.source])
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
    step = 0
    if resume:
        step = restore(run_dir / "checkpoints", method, setup, feeder, counters, rank, world)
    else:
        seed_process(cfg.seed, rank)

    metrics = Metrics(run_dir, enabled=main, resume_step=step if resume else None)
    window = Window(setup.specs, device)
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
                iteration(method, setup, acc, feeder, cfg, step, due, counters, window)
                step += 1
                at_log = step % cfg.log_every == 0 or step >= total
                if world == 1 or at_log:  # processes agree on stopping only at logging points
                    stopped_by = stop_reason(step, total, deadline, signals.received, acc, world)
                if at_log or stopped_by:
                    stats = log_window(window, counters, step, clock, metrics, bar, acc)
                    if stats["streak"] >= cfg.max_nonfinite:
                        raise nonfinite_error(stats, step, run_dir)
                snap = None
                if marks and (world == 1 or at_log) and clock_passed(clock["start"] + marks[0] * 60, acc, world):
                    snap = {"snapshot_minutes": marks[0], "elapsed_minutes": (time.monotonic() - clock["start"]) / 60}
                    marks.pop(0)
                if stopped_by or snap or step % cfg.checkpoint_every == 0:
                    save(run_dir / "checkpoints", method, setup, feeder, counters, step, cfg, acc, snap)
                    last_saved = step
                if cfg.sample_every and step % cfg.sample_every == 0 and not stopped_by:
                    sample_grids(method, setup, run_dir, step, cfg.sample_n, acc)
                if eval_hook is not None and cfg.eval_every and step % cfg.eval_every == 0 and not stopped_by:
                    run_eval(eval_hook, method, setup, run_dir, step, metrics, acc)
        if stopped_by in ("SIGINT", "SIGTERM"):
            raise TrainingInterrupted(
                getattr(signal, stopped_by),
                f"{stopped_by} at step {step}: checkpoint saved in {run_dir / 'checkpoints'}; continue with --resume",
            )
        assert last_saved == step
        sample_grids(method, setup, run_dir, step, cfg.sample_n, acc)
        if eval_hook is not None:
            run_eval(eval_hook, method, setup, run_dir, step, metrics, acc)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    minutes = round((time.monotonic() - clock["start"]) / 60, 3)
    return {"step": step, "stopped_by": stopped_by, "nonfinite": int(counters["nonfinite"]), "minutes": minutes}


def log_window(window: Window, counters, step: int, clock: dict, metrics: Metrics, bar, acc) -> dict[str, float]:
    """Bring the window's statistics to the host (the one synchronisation per ``log_every``),
    write them to the metrics and the progress bar."""
    stats = window.flush(acc, counters)
    now = time.monotonic()
    rate = (step - clock["last_step"]) / max(now - clock["last"], 1e-9)
    clock.update(last=now, last_step=step)
    metrics.log(step, {**stats, "it_per_s": rate, "elapsed_s": now - clock["start"]})
    if bar is not None:
        bar.update(step, now - clock["start"], {k.split("/")[-1]: v for k, v in stats.items() if k.startswith("loss/")})
    return stats


def nonfinite_error(stats: dict[str, float], step: int, run_dir: Path) -> FewstepError:
    last = ckpt.checkpoint_dirs(run_dir / "checkpoints")
    return FewstepError(
        f"{int(stats['streak'])} non-finite losses in a row by step {step} ({int(stats['nonfinite'])} in all); "
        f"stopped without saving — the last checkpoint ({last[0].name if last else 'none'}) is intact: "
        "lower the learning rate or check the method's options, then --resume"
    )


def iteration(
    method, setup: Setup, acc, feeder: Feeder, cfg: TrainConfig, step: int, due: list[str], counters, window
) -> None:
    """One iteration: losses of the due optimizers over ``grad_accum`` micro-batches, a backward
    pass per loss into its own optimizer's parameters, gradient averaging over processes, clipping,
    the optimizer steps (skipped on the device when any loss is non-finite), EMA updates."""
    if not due:
        return
    for k in due:
        setup.optimizers[k].zero_grad(set_to_none=True)
    stash: dict[str, list[Tensor | None]] = {k: [None] * len(setup.params[k]) for k in due} if setup.sharded else {}
    seen = []  # every loss of the iteration, detached
    autocast = acc.autocast if cfg.mixed_precision != "no" else nullcontext
    for batch in feeder.iteration():
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
    for tracker, spec, owner in setup.emas.values():
        if owner in due:
            tracker.update((1.0 - spec.value(step)) * keep)
    if setup.student_opt in due:
        setup.eval_ema.update((1.0 - cfg.eval_ema_decay(step)) * keep)
    counters["nonfinite"] += bad
    counters["streak"].mul_(bad).add_(bad)


def isolated_backward(setup: Setup, loss: Tensor, retain: bool, k: str, stash: list[Tensor | None]) -> None:
    """The FSDP path of ``backward(inputs=...)`` (sharded parameters are not leaves of the step's
    graph, so ``inputs=`` would leave their gradients ``None``): back-propagate ``loss`` into every
    trainable parameter from zero, and add what optimizer ``k``'s parameters got to ``stash``."""
    for params in setup.params.values():
        for p in params:
            p.grad = None
    loss.backward(retain_graph=retain)
    for i, p in enumerate(setup.params[k]):
        if p.grad is not None:
            stash[i] = p.grad if stash[i] is None else stash[i] + p.grad


def all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes in one flat bucket (what DDP computes)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(r)


def all_finite(finite: Tensor) -> Tensor:
    t = (~finite).float()
    torch.distributed.all_reduce(t)
    return t == 0


def clock_passed(deadline: float, acc, world: int) -> bool:
    """Whether any process's clock has passed ``deadline`` (so that all act on it together)."""
    flag = float(time.monotonic() >= deadline)
    if world > 1:
        t = torch.tensor([flag], device=acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = t.item()
    return bool(flag)


def stop_reason(step: int, total: float, deadline: float, signum: int | None, acc, world: int) -> str | None:
    """Why to stop now, agreed by every process (a signal or the clock may reach only some)."""
    flags = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM), float(time.monotonic() >= deadline)]
    if world > 1:
        t = torch.tensor(flags, device=acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flags = t.tolist()
    if flags[0]:
        return "SIGINT"
    if flags[1]:
        return "SIGTERM"
    if step >= total:
        return "max_steps"
    return "minutes" if flags[2] else None


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


# --- checkpoints --------------------------------------------------------------------------------
def weights_of(method: Method, setup: Setup) -> dict[str, Tensor]:
    """Every network's and EMA's weights, whole (sharded ones gathered: call on every process)."""
    out = {}
    for name, net in setup.nets.items():
        out.update({f"net.{name}.{k}": full(v) for k, v in net.state_dict().items()})
    for name, (tracker, _, _) in setup.emas.items():
        out.update({f"ema.{name}.{k}": full(v) for k, v in tracker.target.state_dict().items()})
    out.update({f"eval_ema.{k}": full(v) for k, v in setup.eval_ema.target.state_dict().items()})
    return out


def load_weights(method: Method, setup: Setup, weights: dict[str, Tensor], where: Path) -> None:
    """Load checkpoint weights into the networks, with a one-line error when they do not fit."""
    modules = {f"net.{n}.": m for n, m in setup.nets.items()}
    modules.update({f"ema.{n}.": t.target for n, (t, _, _) in setup.emas.items()})
    modules["eval_ema."] = setup.eval_ema.target
    for prefix, module in modules.items():
        part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        expected = module.state_dict()
        if set(part) != set(expected) or any(part[k].shape != expected[k].shape for k in part):
            raise FewstepError(
                f"checkpoint {where} does not fit this run's {prefix.rstrip('.')} network (another method, teacher "
                "or configuration); start a new run with another --out"
            )
        if any(hasattr(v, "device_mesh") for v in expected.values()):  # sharded: take this process's shards
            from torch.distributed.tensor import distribute_tensor

            part = {
                k: distribute_tensor(v.to(e.device), e.device_mesh, e.placements) if hasattr(e, "device_mesh") else v
                for (k, v), e in ((kv, expected[kv[0]]) for kv in part.items())
            }
        module.load_state_dict(part)


def save(
    root: Path,
    method: Method,
    setup: Setup,
    feeder: Feeder,
    counters,
    step: int,
    cfg: TrainConfig,
    acc,
    snapshot: dict | None = None,
) -> None:
    """Write the checkpoint of ``step`` (every process its RNG; the main process the rest);
    ``snapshot`` marks a minute-mark checkpoint that pruning keeps (its minutes go in the state)."""
    tmp = ckpt.begin(root, step) if acc.is_main_process else ckpt.staging(root, step)
    acc.wait_for_everyone()
    rng_tensors, rng_meta = ckpt.rng_state(feeder.generator)
    ckpt.write_tensors(tmp, f"rng-{acc.process_index}.safetensors", rng_tensors, rng_meta)
    acc.wait_for_everyone()
    if acc.is_main_process or setup.sharded:  # sharded weights and optimizer state are gathered by all
        weights = weights_of(method, setup)
        optim, optim_meta = {}, {}
        for k, opt in setup.optimizers.items():
            tensors, meta = ckpt.flatten_optimizer(opt, f"opt.{k}")
            optim.update({name: full(v) for name, v in tensors.items()})
            optim_meta[k] = meta
        optim.update({f"counter.{k}": v for k, v in counters.items()})
    if acc.is_main_process:
        ckpt.write_tensors(tmp, "weights.safetensors", weights)
        ckpt.write_tensors(tmp, "optim.safetensors", optim)
        meta = {
            "method": method.name,
            "sample_shape": list(method.teacher.sample_shape),
            "num_classes": method.teacher.num_classes,
            "world_size": acc.num_processes,
            "optimizers": optim_meta,
            "method_state": method.extra_state(),
            "seed": cfg.seed,
            **(snapshot or {}),
        }
        ckpt.commit(tmp, root, step, meta, cfg.keep_checkpoints)
    acc.wait_for_everyone()


def restore(root: Path, method: Method, setup: Setup, feeder: Feeder, counters, rank: int, world: int) -> int:
    """Load the newest intact checkpoint under ``root``; return its step."""
    found = ckpt.latest(root)
    if found is None:
        raise FewstepError(f"{root} {ckpt.unusable(root, 'start the run again without --resume')}")
    meta = found.meta
    if meta.get("method") != method.name or list(meta.get("sample_shape", [])) != list(method.teacher.sample_shape):
        raise FewstepError(
            f"checkpoint {found.path} is from method {meta.get('method')!r} with samples {meta.get('sample_shape')}, "
            f"not {method.name!r} with {list(method.teacher.sample_shape)}; pass the run's own method and teacher"
        )
    if meta.get("world_size") != world:
        raise FewstepError(
            f"checkpoint {found.path} was written by {meta.get('world_size')} process(es); resume with {world}"
        )
    load_weights(method, setup, found.tensors("weights.safetensors"), found.path)
    optim = found.tensors("optim.safetensors")
    for k, opt in setup.optimizers.items():
        if setup.sharded:
            optim.update(shard_optimizer_state(opt, optim, f"opt.{k}"))
        ckpt.load_optimizer(opt, optim, meta["optimizers"][k], f"opt.{k}")
    for k, t in counters.items():
        t.copy_(optim[f"counter.{k}"])
    method.load_extra_state(meta.get("method_state", {}))
    ckpt.set_rng_state(*found.rng(rank), feeder.generator)
    return found.step


def shard_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The whole optimizer-state tensors of sharded parameters, cut to this process's shards."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for name, v in tensors.items():
        if name.startswith(prefix + "."):
            p = params[int(name[len(prefix) + 1 :].split(".", 1)[0])]
            if hasattr(p, "device_mesh") and v.shape == p.shape:
                out[name] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
    return out


# --- samples and evaluation ---------------------------------------------------------------------
def sample_grids(method: Method, setup: Setup, run_dir: Path, step: int, n: int, acc) -> None:
    """Seeded sample grids of the evaluation EMA at each of the method's step counts."""
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
                save_samples(x.float().cpu(), labels, seeds, run_dir / "samples" / f"step-{step:08d}-{k}step.png")
    acc.wait_for_everyone()


def run_eval(hook: EvalHook, method: Method, setup: Setup, run_dir: Path, step: int, metrics: Metrics, acc) -> None:
    """Call the evaluation hook on the main process with the evaluation EMA in place."""
    if acc.is_main_process and not setup.sharded:  # FSDP: evaluate the saved run (fewstep eval)
        with sampling_weights(method, setup):
            result = hook(method, step, run_dir)
        if result:
            metrics.log(step, {f"eval/{k}": float(v) for k, v in result.items()})
    acc.wait_for_everyone()
