"""The run directory (DESIGN.md §7): everything about one distillation run, in one folder.

    runs/x/config.json        the resolved configuration ({"format": "fewstep-run", ...})
    runs/x/metrics.jsonl      one JSON object per logging point (losses, it/s, evaluation results)
    runs/x/checkpoints/       step-XXXXXXXX/ folders (see fewstep.train.checkpoint)
    runs/x/samples/           sample grids of the evaluation EMA
    runs/x/student/           the final student (evaluation EMA): model.safetensors + config.json
    runs/x/teacher/           the teacher, when it was given as an object rather than a name
    runs/x/tensorboard/       TensorBoard events, when tensorboard is installed
    runs/x/.lock              held (flock) by the process training into the folder

An existing run directory is never overwritten: starting a run in a non-empty folder needs
``--resume`` (continue it) or ``--overwrite`` (delete it first; only a fewstep run folder).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.denoiser import Denoiser, EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.io import atomic_write_bytes, atomic_write_json, read_json, save_tensors

RUN_FORMAT = "fewstep-run"


@dataclass
class RunInfo:
    """What a method knows about its run (``method.run``): the folder, the checkpoint step it holds,
    the run's ``config.json``, and — after training — how the training ended (``summary``: step,
    stopped_by, nonfinite, minutes)."""

    path: Path
    step: int
    config: dict[str, Any]
    summary: dict[str, Any] | None = None


STUDENT_FORMAT = "fewstep-student"


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a fewstep run (its ``config.json`` says so)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == RUN_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_run_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_run_dir(path):
        raise FewstepError(f"{path} is not a fewstep run directory (no config.json with format {RUN_FORMAT!r})")
    return read_json(path / "config.json")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch ``out`` unless the flags allow it (called before anything is written)."""
    if resume and overwrite:
        raise FewstepError("--resume and --overwrite contradict each other; pick one")
    exists = out.exists() and (not out.is_dir() or any(p.name != LOCK for p in out.iterdir()))
    if resume:
        if not is_run_dir(out):
            raise FewstepError(f"--resume: {out} is not a fewstep run directory; start a new run without --resume")
    elif exists and not overwrite:
        raise FewstepError(
            f"{out} already exists; continue it with --resume, replace it with --overwrite, or pick another --out"
        )
    elif exists and not is_run_dir(out):
        raise FewstepError(
            f"{out} is not a fewstep run directory, so --overwrite will not delete it; pick another --out"
        )


def reset_out_dir(out: Path) -> None:
    """Delete an old run in ``out`` (checked by :func:`check_out_dir`) and create the folder; the
    lock file held by this process stays."""
    if out.exists() and is_run_dir(out):
        for p in out.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder while one process trains into it: ``flock`` on
    ``runs/x/.lock``. The kernel releases it when the process ends, however it ends, so a lock file
    left by a killed process is stale by construction and the next process simply takes it."""

    def __init__(self, out: Path) -> None:
        self.path, self.fd = Path(out) / LOCK, None

    def acquire(self) -> None:
        """Take the lock, or a one-line :class:`FewstepError` naming the process that holds it."""
        import fcntl
        import os
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FewstepError(
                f"{self.path.parent} is in use by another fewstep process ({holder}); wait for it to finish or "
                "stop it, or pick another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        import fcntl
        import os

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --- metrics ------------------------------------------------------------------------------------
class Metrics:
    """``metrics.jsonl`` (always) and TensorBoard events (when ``tensorboard`` is installed)."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():  # drop records the resumed run will redo
                keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
                atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# --- teachers given as objects ------------------------------------------------------------------
def save_teacher(teacher: Denoiser, folder: Path) -> bool:
    """Save a teacher object so ``load_run`` can rebuild it; ``False`` if its type cannot be saved.
    fewstep networks are written in the model format, other teachers by their own ``save(folder)``
    (an analytic mixture), which :func:`fewstep.teachers.load_teacher` reads back."""
    from fewstep.networks import MLP, UNet
    from fewstep.teachers.native import save_model

    if isinstance(teacher, EDMDenoiser) and isinstance(teacher.net, (UNet, MLP)):
        save_model(teacher, folder, getattr(teacher, "info", {}))
        return True
    if callable(getattr(teacher, "save", None)):
        teacher.save(folder)
        return True
    return False


def run_teacher(run_dir: Path, config: dict[str, Any], teacher: Denoiser | None = None) -> Denoiser:
    """The teacher of a run: ``teacher`` if given, else the run's saved copy, else its spec."""
    from fewstep.teachers import load_teacher

    if teacher is not None:
        return teacher
    info = config["teacher"]
    if info.get("saved") and (run_dir / "teacher" / "config.json").is_file():
        return load_teacher(run_dir / "teacher")
    if info.get("saved") and not info.get("spec"):
        raise FewstepError(f"run {run_dir} lost its copy of the teacher ({run_dir / 'teacher'}); pass teacher=...")
    if info.get("spec"):
        return load_teacher(info["spec"])
    raise FewstepError(f"run {run_dir} was trained on a teacher object that could not be saved; pass teacher=...")


# --- the final student --------------------------------------------------------------------------
def save_student(
    student: torch.nn.Module, folder: Path, info: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the student as ``model.safetensors`` + ``config.json``. A student that is itself a
    fewstep EDM network is saved in the model format (``fewstep sample --model runs/x/student``
    and ``load_teacher`` read it); other students (wrappers) record their method, and are loaded
    back with ``load_run``. ``state`` replaces ``student.state_dict()`` (a sharded student's
    gathered weights)."""
    from fewstep.networks import MLP, UNet
    from fewstep.teachers.native import model_config, save_model

    if isinstance(student, EDMDenoiser) and isinstance(student.net, (UNet, MLP)):
        return save_model(student, folder, info, state=state)
    save_tensors(folder / "model.safetensors", student.state_dict() if state is None else state)
    inner = getattr(student, "net", None)
    cfg = {"format": STUDENT_FORMAT, "wrapper": type(student).__name__, "info": info}
    if isinstance(inner, EDMDenoiser) and isinstance(inner.net, (UNet, MLP)):
        cfg["inner"] = model_config(inner)
    atomic_write_json(folder / "config.json", cfg)
    return folder


# --- what a run cost ------------------------------------------------------------------------------
def run_cost(run_dir: str | Path) -> dict:
    """Distillation wall time (minutes) and optimizer iterations of a run: the summary saved with
    its student (``student/config.json``), else the last record of ``metrics.jsonl``. A warm-started
    chain (``--init``) counts the whole chain: ``minutes`` and ``steps`` add the earlier runs',
    ``chain`` names the methods in order and ``own_minutes`` is this run's part."""
    run_dir = Path(run_dir)
    cost = _own_cost(run_dir)
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    init = config.get("init") or {}
    if init and cost["minutes"] is not None and init.get("minutes") is not None:
        cost["own_minutes"] = cost["minutes"]
        cost["minutes"] = round(cost["minutes"] + init["minutes"], 3)
        cost["steps"] = cost["steps"] + (init.get("steps") or 0)
        cost["chain"] = [*init.get("chain", []), config["method"]["name"]]
    return cost


def _own_cost(run_dir: Path) -> dict:
    info = {}
    if (run_dir / "student" / "config.json").is_file():
        info = read_json(run_dir / "student" / "config.json").get("info", {})
    if "minutes" in info and "step" in info:
        return {"minutes": info["minutes"], "steps": info["step"], "stopped_by": info.get("stopped_by")}

    records = [r for r in read_metrics(run_dir) if "elapsed_s" in r]
    if not records:
        return {"minutes": None, "steps": None, "stopped_by": None}
    last = records[-1]
    return {"minutes": round(last["elapsed_s"] / 60, 3), "steps": last["step"], "stopped_by": None}
