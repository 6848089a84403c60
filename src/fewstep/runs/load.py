"""Loading a run back: its method with the run's options around its teacher, its checkpoint's
weights (the evaluation EMA by default — the student the run produced), and the data it trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewstep.data import Dataset
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods.base import Method
from fewstep.options import build
from fewstep.runs.checkpoints import Checkpoint, latest, load_modules, unusable, verify
from fewstep.runs.folder import RunInfo, read_run_config, run_teacher
from fewstep.students import (
    add_lora,
    build_layout,
    build_network,
    copyable,
    inner_denoiser,
    lora_rank,
    network_record,
    student_network,
)

DATA_FILE = "data.safetensors"  # data given to fewstep.distill as an object, kept for resume and eval


def data_record(data: Dataset | None) -> dict[str, Any] | None:
    """How a run's data is written in its config: the spec that reloads it, or ``saved`` (a data
    set built in Python, kept as ``data.safetensors`` in the run)."""
    if data is None:
        return None
    spec = data.spec.to_dict() if data.spec is not None else None
    return {"spec": spec, "saved": spec is None, "name": data.name, "size": len(data)}


def save_data(data: Dataset, out: Path) -> None:
    from fewstep.io import save_tensors

    tensors = {"x": data.x.contiguous()}
    if data.labels is not None:
        tensors["labels"] = data.labels.contiguous()
    save_tensors(out / DATA_FILE, tensors, metadata={"num_classes": str(data.num_classes), "name": data.name})


def load_saved_data(run_dir: Path) -> Dataset:
    from safetensors import safe_open

    from fewstep.io import load_tensors

    path = Path(run_dir) / DATA_FILE
    t = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return Dataset(t["x"], t.get("labels"), int(meta.get("num_classes", 0)), meta.get("name", str(path)))


def run_data(run_dir: Path, config: dict[str, Any]) -> Any:
    """What a run trained on: a :class:`~fewstep.data.DataSpec`, a :class:`Dataset` (saved in the
    run), or ``None`` (data-free methods)."""
    from fewstep.data import parse_data

    train = config.get("train", {}).get("data")
    record = config.get("data") or {}
    if record.get("saved") and (Path(run_dir) / DATA_FILE).is_file():
        return load_saved_data(run_dir)
    if record.get("spec"):
        return parse_data(record["spec"])
    return parse_data(train) if train else None


def load_checkpoint_into(method: Method, run_dir: Path, ema: bool = True, checkpoint: str | Path | None = None) -> int:
    """Load a run's checkpoint (newest intact one, or ``checkpoint``) into ``method``'s networks and
    EMA copies; with ``ema`` the student gets the evaluation-EMA weights. Every network ends in eval
    mode without gradients. Returns the checkpoint's step."""
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path if path.is_absolute() or path.exists() else run_dir / "checkpoints" / path
        problem = verify(path)
        if problem:
            raise FewstepError(f"checkpoint {path} is unusable ({problem})")
        found = Checkpoint(path, json.loads((path / "state.json").read_text()))
    else:
        found = latest(run_dir / "checkpoints")
        if found is None:
            raise FewstepError(f"run {run_dir} {unusable(run_dir / 'checkpoints', 'train it first (fewstep distill)')}")
    if found.meta.get("method") != method.name:
        raise FewstepError(
            f"checkpoint {found.path} belongs to method {found.meta.get('method')!r}, not {method.name!r}"
        )
    nets = method.networks()
    modules = {f"net.{n}.": m for n, m in nets.items()}
    modules.update({f"ema.{n}.": getattr(method, n) for n in method.emas()})
    weights = found.tensors("weights.safetensors")
    load_modules(modules, weights, found.path)
    if ema:
        load_modules({"eval_ema.": nets["student"]}, weights, found.path)
    method.load_extra_state(found.meta.get("method_state", {}))
    for net in [*nets.values(), *(getattr(method, n) for n in method.emas()), *method.frozen().values()]:
        net.eval().requires_grad_(False)
    return found.step


def load_run(
    path: str | Path,
    *,
    ema: bool = True,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    teacher: Denoiser | None = None,
    student: torch.nn.Module | None = None,
) -> Method:
    """Load a finished or partial run back as its method, ready to sample and evaluate.

    Rebuilds the teacher (its builtin/analytic name or folder, or the copy saved in the run), the
    method with the run's options, and loads the newest intact checkpoint (or ``checkpoint``, a
    ``step-XXXXXXXX`` name or path). With ``ema=True`` (default) ``method.student`` holds the
    evaluation-EMA weights — the student a run produces; ``ema=False`` gives the raw weights.
    Every network is in eval mode without gradients.

    Args:
        path: the run directory (``runs/x``).
        ema: load the evaluation EMA into the student (``False``: the raw trained weights).
        checkpoint: a specific checkpoint instead of the newest.
        device: where to place the networks.
        teacher: the teacher object, for runs whose teacher could not be saved.
        student: the student network object, for runs trained with one (``fewstep.distill(student=net)``).

    Returns:
        The :class:`~fewstep.methods.Method`; ``method.sample(noise, steps, cond)`` draws from the
        student, and ``method.run`` is ``{"path", "step", "config"}``.

    Example:
        >>> method = load_run("runs/x")  # doctest: +SKIP
        >>> x = method.sample(torch.randn(16, *method.teacher.sample_shape), steps=1)  # doctest: +SKIP
    """
    from fewstep.methods import get_method

    path = Path(path)
    config = read_run_config(path)
    cls = get_method(config["method"]["name"])
    options = build(cls.Config, config["method"]["options"], f"method {cls.name}")
    teacher = run_teacher(path, config, teacher)
    torch.manual_seed(config["train"].get("seed", 0))
    attach_stand_in(teacher, config.get("init"))
    method = build_method(cls, teacher, options, config.get("init"), config.get("student"), student)
    for module in [*method.networks().values(), *method.frozen().values()]:
        module.to(device)
    step = load_checkpoint_into(method, path, ema=ema, checkpoint=checkpoint)
    method.run = RunInfo(path, step, config)
    return method


def build_method(
    cls: type[Method],
    teacher: Denoiser,
    options: Any,
    init_record: dict[str, Any] | None,
    student: dict[str, Any] | None = None,
    network: torch.nn.Module | None = None,
) -> Method:
    """The method of a run (resumed or reloaded): rebuilt around the layout its chain recorded and
    the student network it recorded (:func:`student_record`; weights come from the checkpoint)."""
    spec = (init_record or {}).get("layout")
    if student:
        return cls(teacher, options, student=rebuild_student(cls, teacher, options, student, spec, network))
    if spec:
        return cls(teacher, options, student=build_layout(spec, teacher))
    return cls(teacher, options)


def attach_stand_in(teacher: Denoiser, init_record: dict[str, Any] | None) -> None:
    """Give a teacher without a network (an analytic mixture) the plain denoiser inside the student
    its run started from (``init``: the warm-up), as ``teacher.stand_in`` — the backbone of teacher
    features (discriminators). Not a submodule: the teacher's parameters stay its own."""
    if copyable(teacher) or not (init_record or {}).get("run"):
        return
    set_stand_in(teacher, load_run(init_record["run"], ema=True, teacher=teacher).student)


def set_stand_in(teacher: Denoiser, student: torch.nn.Module) -> None:
    """``teacher.stand_in`` = the plain denoiser inside ``student``, for a teacher without a network."""
    net = inner_denoiser(student)
    if not copyable(teacher) and net is not None:
        object.__setattr__(teacher, "stand_in", net.eval().requires_grad_(False))


def student_record(student: torch.nn.Module, teacher: Denoiser) -> dict | None:
    """What ``config.json`` keeps (``student``) to rebuild a student that is not a plain teacher
    copy: its network description (when it is not the teacher's) and its LoRA rank."""
    net = network_record(student)
    rank = None if hasattr(teacher, "lora_config") else lora_rank(student)  # a lora: teacher's adapters are its own
    other = not copyable(teacher) or (net is not None and _shape(net) != _shape(network_record(teacher)))
    if not other and not rank:
        return None
    return {"net": net if other else None, "lora_rank": rank}


def _shape(record: dict | None) -> dict | None:
    """A network description without its dropout rate (methods set the student's own)."""
    if not record or "net" not in record:
        return record
    return {**record, "net": {k: v for k, v in record["net"].items() if k != "dropout"}}


def rebuild_student(
    cls: type[Method],
    teacher: Denoiser,
    options: Any,
    record: dict,
    layout: list | None,
    network: torch.nn.Module | None = None,
):
    """The (untrained) student of a :func:`student_record`: the recorded network (or ``network``,
    for a student given as an object) in the method's wrapping (or the chain's recorded layout),
    with its LoRA adapters."""
    net = record.get("net")
    if net and "object" in net and network is not None:
        base = student_network(teacher, network)
    else:
        base = build_network(net) if net else teacher
    if layout:
        built = build_layout(layout, base)
    else:
        built = cls(base, options).student
    if record.get("lora_rank"):
        add_lora(built, record["lora_rank"])
    return built
