"""Checkpoints: safetensors + JSON only, committed atomically, verified by checksums.

One checkpoint is a folder ``checkpoints/step-00000100/``::

    weights.safetensors   every trainable network, EMA copy and the evaluation EMA
    optim.safetensors     optimizer state tensors (Adam moments, step counts) and engine counters
    rng-<rank>.safetensors  each process's torch/CUDA/NumPy/Python RNG and data-sampler state
    state.json            step, method, shapes, optimizer hyper-parameters, sha256 of every file

Files are written into a hidden temporary folder, ``state.json`` last, and the folder is renamed
into place, so a crash at any moment leaves either the complete new checkpoint or none. Loading
walks the checkpoints newest first and skips (with a warning) any whose files are missing or do
not match their checksums. Optimizer state is flattened to tensors + JSON, never pickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.io import _fsync_dir, atomic_write_json, load_tensors, save_tensors
from fewstep.train.distributed import full, shard_optimizer_state

if TYPE_CHECKING:
    from fewstep.methods.base import Method
    from fewstep.train.loop import Run, Setup

FORMAT = "fewstep-checkpoint"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointWarning(UserWarning):
    """A checkpoint was unreadable and an older one is used instead."""


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


# --- folders ------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dirs(root: Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, newest first (unverified)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_snapshot(path: Path) -> bool:
    """A checkpoint kept at a minute mark (``snapshot_minutes``), which pruning leaves alone."""
    try:
        return json.loads((path / "state.json").read_text()).get("snapshot_minutes") is not None
    except (OSError, ValueError):
        return False


def snapshots(root: Path) -> list[Checkpoint]:
    """The intact minute-mark checkpoints under ``root``, oldest first."""
    found = [Checkpoint(d, json.loads((d / "state.json").read_text())) for d in checkpoint_dirs(root)
             if is_snapshot(d) and verify(d) is None]  # fmt: skip
    return sorted(found, key=lambda c: c.step)


def staging(root: Path, step: int) -> Path:
    """The hidden temporary folder in which the checkpoint of ``step`` is assembled."""
    return root / f".step-{step:08d}.tmp"


def begin(root: Path, step: int) -> Path:
    """Create :func:`staging` afresh (a leftover from a killed run is discarded)."""
    tmp = staging(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_tensors(tmp: Path, name: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    save_tensors(tmp / name, tensors, metadata)


def commit(tmp: Path, root: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Checksum every file in ``tmp``, write ``state.json`` last, rename the folder into place and
    delete all but the newest ``keep`` checkpoints (and stale temporary folders)."""
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and not p.name.startswith(".")}
    atomic_write_json(tmp / "state.json", {**meta, "format": FORMAT, "step": step, "files": files})
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved again (e.g. a resumed run that ends where it resumed)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in [d for d in checkpoint_dirs(root) if not is_snapshot(d)][keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def tensors(self, name: str) -> dict[str, Tensor]:
        return load_tensors(self.path / name)

    def rng(self, rank: int) -> tuple[dict[str, Tensor], dict[str, str]]:
        from safetensors import safe_open

        path = self.path / f"rng-{rank}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def verify(path: Path) -> str | None:
    """``None`` if the checkpoint at ``path`` is complete and intact, else what is wrong."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "state.json is missing or unreadable"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        return "state.json is not a fewstep checkpoint description"
    for name, digest in meta["files"].items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256(p) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def latest(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root``; a warning for each broken one skipped."""
    for path in checkpoint_dirs(root):
        problem = verify(path)
        if problem is None:
            return Checkpoint(path, json.loads((path / "state.json").read_text()))
        warnings.warn(
            f"checkpoint {path} is unusable ({problem}); trying the previous one", CheckpointWarning, stacklevel=2
        )
    return None


def unusable(root: Path, then: str) -> str:
    """Why ``root`` holds no usable checkpoint, for an error message: none written yet (followed by
    ``then``, what to do), or every one damaged (with what is wrong with the newest)."""
    dirs = checkpoint_dirs(root)
    if not dirs:
        return f"has no usable checkpoint yet (none written); {then}"
    return (f"has no usable checkpoint: all {len(dirs)} are damaged (newest {dirs[0].name}: {verify(dirs[0])}); "
            "restore them from a copy, or start again with --overwrite")  # fmt: skip


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
    """Load checkpoint weights into the networks, with a one-line error when they do not fit."""
    modules = {f"net.{n}.": m for n, m in setup.nets.items()}
    modules.update({f"ema.{n}.": t.ema.target for n, t in setup.emas.items()})
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
