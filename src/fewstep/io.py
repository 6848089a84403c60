"""Safe files: safetensors + JSON only, written atomically, pickles refused.

A pickle can run arbitrary code when loaded, so fewstep never unpickles a file. Weights are
safetensors, everything else JSON. Writes go to a temporary file in the same folder, are flushed
and fsync'ed, then renamed over the target, so a crash leaves the old file or the new one, never
half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fewstep.errors import FewstepError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (mkstemp's temp files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def refuse_pickle(path: str | Path) -> None:
    """Raise a clear error for a pickle-based checkpoint."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise FewstepError(
            f"{path} is a pickle-based file, which can run arbitrary code when loaded, so fewstep refuses it; "
            "convert it once, in a session you trust, with "
            "`safetensors.torch.save_file(torch.load(path), 'model.safetensors')`"
        )


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickles; name a corrupt file clearly."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise FewstepError(f"{path} does not exist; check the path")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise FewstepError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{path} does not exist; check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewstepError(f"{path} is not valid JSON ({e}); fix or regenerate it") from None


def cache_dir() -> Path:
    """fewstep's cache: ``$FEWSTEP_CACHE``, else ``~/.cache/fewstep`` (pairs, trajectories, reference
    features, classifiers)."""
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
