"""A run's state in a checkpoint, the engine's side: what :func:`save` writes at a step (every
network, EMA copy and the evaluation EMA; optimizer state flattened to tensors + JSON, never
pickled; each process's RNG) and :func:`restore` reads back for a bit-exact ``--resume``. The
folder format — atomic commits, checksums, newest-intact lookup — is
:mod:`fewstep.runs.checkpoints`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.runs.checkpoints import begin, commit, latest, load_modules, staging, unusable, write_tensors
from fewstep.train.distributed import full, shard_optimizer_state

if TYPE_CHECKING:
    from fewstep.methods.base import Method
    from fewstep.train.loop import Run, Setup


# --- optimizer state <-> tensors + JSON ---------------------------------------------------------
def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``opt.state_dict()`` as ``(tensors, json)``: tensors keyed ``{prefix}.{param}.{key}``."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{key}"] = v
            else:
                scalars.setdefault(str(idx), {})[key] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str) -> None:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for saved, current in zip(meta["groups"], opt.param_groups, strict=True):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})


# --- RNG state ----------------------------------------------------------------------------------
def rng_state(data_generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, str]]:
    """This process's RNG states (torch, CUDA, NumPy, Python, data sampler) as tensors + metadata."""
    tensors = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
            "python": json.dumps([version, list(py_state), gauss_next])}  # fmt: skip
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, str], data_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    data_generator.set_state(tensors["data"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(py_state), gauss_next))


# --- a run's state <-> a checkpoint (the loop's side) --------------------------------------------
def weights_of(method: Method, setup: Setup) -> dict[str, Tensor]:
    """Every network's and EMA's weights, whole (sharded ones gathered: call on every process)."""
    out = {}
    for name, net in setup.nets.items():
        out.update({f"net.{name}.{k}": full(v) for k, v in net.state_dict().items()})
    for name, tracked in setup.emas.items():
        out.update({f"ema.{name}.{k}": full(v) for k, v in tracked.ema.target.state_dict().items()})
    out.update({f"eval_ema.{k}": full(v) for k, v in setup.eval_ema.target.state_dict().items()})
    return out


def load_weights(method: Method, setup: Setup, weights: dict[str, Tensor], where: Path) -> None:
    """Load checkpoint weights into the networks, EMA copies and evaluation EMA of ``setup``."""
    modules = {f"net.{n}.": m for n, m in setup.nets.items()}
    modules.update({f"ema.{n}.": t.ema.target for n, t in setup.emas.items()})
    modules["eval_ema."] = setup.eval_ema.target
    load_modules(modules, weights, where)


def save(run: Run, step: int, snapshot: dict | None = None) -> None:
    """Write the checkpoint of ``step`` (every process its RNG; the main process the rest);
    ``snapshot`` marks a minute-mark checkpoint that pruning keeps (its minutes go in the state)."""
    method, setup, acc, cfg, root = run.method, run.setup, run.acc, run.cfg, run.dir / "checkpoints"
    feeder, counters = run.feeder, run.counters
    tmp = begin(root, step) if acc.is_main_process else staging(root, step)
    acc.wait_for_everyone()
    rng_tensors, rng_meta = rng_state(feeder.generator)
    write_tensors(tmp, f"rng-{acc.process_index}.safetensors", rng_tensors, rng_meta)
    acc.wait_for_everyone()
    if acc.is_main_process or setup.sharded:  # sharded weights and optimizer state are gathered by all
        weights = weights_of(method, setup)
        optim, optim_meta = {}, {}
        for k, opt in setup.optimizers.items():
            tensors, meta = flatten_optimizer(opt, f"opt.{k}")
            optim.update({name: full(v) for name, v in tensors.items()})
            optim_meta[k] = meta
        optim.update({f"counter.{k}": v for k, v in counters.items()})
    if acc.is_main_process:
        write_tensors(tmp, "weights.safetensors", weights)
        write_tensors(tmp, "optim.safetensors", optim)
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
        commit(tmp, root, step, meta, cfg.keep_checkpoints)
    acc.wait_for_everyone()


def restore(run: Run) -> int:
    """Load the run's newest intact checkpoint; return its step."""
    method, setup, root, counters = run.method, run.setup, run.dir / "checkpoints", run.counters
    rank, world = run.acc.process_index, run.acc.num_processes
    found = latest(root)
    if found is None:
        raise FewstepError(f"{root} {unusable(root, 'start the run again without --resume')}")
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
        load_optimizer(opt, optim, meta["optimizers"][k], f"opt.{k}")
    for k, t in counters.items():
        t.copy_(optim[f"counter.{k}"])
    method.load_extra_state(meta.get("method_state", {}))
    set_rng_state(*found.rng(rank), run.feeder.generator)
    return found.step
