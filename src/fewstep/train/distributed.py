"""Processes: the accelerator, FSDP2 sharding, and the collectives the loop needs.

Why not ``accelerator.prepare``: a method holds several networks with their own optimizers, EMA
copies that must be sharded exactly like their sources, frozen networks every process runs, and
optimizers that step on different iterations (``every``/``offset``). ``prepare`` wraps one model per
optimizer in DDP (whose bucketed all-reduce fires inside ``backward`` and assumes every parameter
gets a gradient each step) or FSDP1 (which replaces the modules the method holds). The engine
instead keeps the method's modules in place: data-parallel gradients are averaged here in one flat
all-reduce per stepping optimizer after all of an iteration's backward passes
(:func:`all_reduce_grads`, what DDP computes), and FSDP2's ``fully_shard`` shards modules in place
(:func:`shard`). accelerate still provides the launch, the process group, devices, mixed precision
and its gradient scaler.

Private APIs: :func:`make_accelerator` resets ``AcceleratorState`` (``_reset_state``) when a second
run in the same process asks for another precision or device — accelerate keeps one process-wide
state and offers no public way to change it; the fused Adam step reads a device-side ``found_inf``
(:mod:`fewstep.train.loop`), the hook ``torch.amp.GradScaler`` uses, because a public skip would
cost a host synchronisation per step.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.train.ema import EMA

if TYPE_CHECKING:
    from fewstep.train.config import TrainConfig
    from fewstep.train.loop import Setup

FSDP1_REFUSED = (
    "accelerate is configured for FSDP version 1, which wraps the method's networks; the engine runs FSDP2 "
    "(fully_shard, in place): set fsdp_version: 2 in the accelerate config (docs/engine.md)"
)


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
    for tracker in [*(t.ema for t in setup.emas.values()), setup.eval_ema]:
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
    for t in setup.emas.values():  # trackers of the sharded modules
        t.ema = EMA(t.ema.target, setup.nets[t.spec.source])
    setup.eval_ema = EMA(setup.eval_ema.target, setup.nets["student"])
    setup.sharded = True


def full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded (DTensor) one — a collective: every process must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


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
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, r in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(r.view_as(g))


def all_finite(finite: Tensor) -> Tensor:
    t = (~finite).float()
    torch.distributed.all_reduce(t)
    return t == 0


def any_process(flags: list[float], acc, world: int) -> list[float]:
    """Each flag set if it is set on any process (an all-reduce MAX), so that all act on it together."""
    if world > 1:
        t = torch.tensor(flags, device=acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flags = t.tolist()
    return flags


def clock_passed(deadline: float, acc, world: int) -> bool:
    """Whether any process's clock has passed ``deadline``."""
    return bool(any_process([float(time.monotonic() >= deadline)], acc, world)[0])


def stop_reason(step: int, total: float, deadline: float, signum: int | None, acc, world: int) -> str | None:
    """Why to stop now, agreed by every process (a signal or the clock may reach only some)."""
    flags = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM), float(time.monotonic() >= deadline)]
    flags = any_process(flags, acc, world)
    if flags[0]:
        return "SIGINT"
    if flags[1]:
        return "SIGTERM"
    if step >= total:
        return "max_steps"
    return "minutes" if flags[2] else None


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
