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
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.io import _fsync_dir, atomic_write_json, load_tensors, save_tensors

FORMAT = "fewstep-checkpoint"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointWarning(UserWarning):
    """A checkpoint was unreadable and an older one is used instead."""


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


def load_modules(modules: dict[str, nn.Module], weights: dict[str, Tensor], where: Path) -> None:
    """Load checkpoint ``weights`` into ``modules`` by key prefix (``{"net.student.": module}``), with a
    one-line error when a part does not fit; a sharded (FSDP2) module takes this process's shards."""
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
