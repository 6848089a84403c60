"""Starting, resuming and loading runs: what ``fewstep distill`` and ``fewstep.distill`` call."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from fewstep.data import Dataset
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods.base import Method
from fewstep.options import build, coerce, field_types, option_names, to_json
from fewstep.runs.folder import (
    RUN_FORMAT,
    RunInfo,
    RunLock,
    check_out_dir,
    read_run_config,
    reset_out_dir,
    run_teacher,
    save_student,
    save_teacher,
)
from fewstep.runs.load import data_record, load_checkpoint_into, run_data, save_data, student_record
from fewstep.train.config import (
    RESUMABLE,
    Sources,
    TrainConfig,
    method_name,
    resolve,
    split_options,
    wall_clock_rule,
)

RUN_VERSION = 1
BY_NAME = ("builtin:", "analytic:", "lora:")  # teachers that load by name: never copied into a run


@dataclasses.dataclass
class Plan:
    """A resolved run: what to train, how, and where (nothing is touched until it is executed)."""

    out: Path
    cfg: TrainConfig
    method_cls: type[Method]
    options: Any
    teacher: Denoiser
    teacher_obj: bool
    data_obj: Dataset | None
    resume: bool
    overwrite: bool
    warmup: Path | None = None  # the compress run this run's student starts from (train/warmup.py)
    student_obj: Any = None  # a student network given as an object (fewstep.distill(student=module))

    def config(self) -> dict[str, Any]:
        """The JSON written to ``config.json`` (and printed by ``--dry-run``)."""
        from fewstep.version import __version__

        m = self.method_cls
        return {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "fewstep": __version__,
            "method": {"name": m.name, "family": m.family, "paper": m.paper, "options": to_json(self.options)},
            "teacher": {
                "spec": None if self.teacher_obj else self.cfg.teacher,
                "saved": self.teacher_obj,
                "sample_shape": list(self.teacher.sample_shape),
                "num_classes": int(self.teacher.num_classes),
            },
            "train": to_json(self.cfg),
        }


def plan_run(
    sources: Sources,
    out: str | Path | None,
    teacher: Denoiser | None = None,
    data: Dataset | None = None,
    resume: bool = False,
    overwrite: bool = False,
    student: Any = None,
) -> Plan:
    """Resolve options (typed, validated) into a :class:`Plan`; one-line errors for bad input.
    ``teacher``/``data`` are objects given through the Python API (else specs in the options)."""
    from fewstep.methods import get_method
    from fewstep.teachers import load_teacher

    if out is None:
        raise FewstepError("give an output folder (--out runs/NAME)")
    out = Path(out)
    check_out_dir(out, resume, overwrite)
    if resume:
        sources = _resume_sources(out, sources)
    method_cls = get_method(method_name(sources))
    cfg, options = resolve(sources, method_cls, new_run=not resume, teacher_given=teacher is not None)
    from fewstep.train.warmup import check_student_options, parse_student_net

    cfg.student_net = parse_student_net(cfg.student_net)
    check_student_options(method_cls, cfg, student)
    if method_cls.needs_init and not cfg.init and not resume:
        raise FewstepError(
            f"{method_cls.name} is a second training stage: give --init RUN, the run it continues "
            "(e.g. an ect, cd or scd run of the same teacher)"
        )
    if cfg.teacher and not resume:
        cfg.teacher = absolute_spec(cfg.teacher)
    if cfg.init and not resume:
        from fewstep.train.warmstart import read_init

        cfg.init = str(read_init(cfg.init, out))
    if cfg.data is not None:
        from fewstep.data import parse_data

        cfg.data = parse_data(cfg.data).to_dict()
    teacher_obj = teacher is not None and not resume
    if teacher is None:
        teacher = _resume_teacher(out) if resume else load_teacher(cfg.teacher)
    return Plan(out, cfg, method_cls, options, teacher, teacher_obj, data, resume, overwrite, student_obj=student)


def absolute_spec(spec: str) -> str:
    """A teacher spec that names a folder, made absolute (a run then works from any directory)."""
    if spec.startswith(("builtin:", "analytic:")):
        return spec
    if spec.startswith("lora:"):
        head, _, folder = spec.rpartition(":")
        return f"{head}:{Path(folder).expanduser().resolve()}" if Path(folder).expanduser().exists() else spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _resume_sources(out: Path, sources: Sources) -> Sources:
    """A resumed run keeps its saved configuration: options that steer the budget or bookkeeping
    (:data:`~fewstep.train.config.RESUMABLE`) may change, any other given option must equal the
    saved value (one-line error otherwise)."""
    from fewstep.methods import get_method

    saved = read_run_config(out)
    train, method = dict(saved["train"]), saved["method"]
    given = {**sources.file, **{k: v for k, v in sources.flags.items() if v is not None}}
    if given.get("teacher"):
        given["teacher"] = absolute_spec(str(given["teacher"]))
    if given.get("data") is not None:
        from fewstep.data import parse_data

        given["data"] = parse_data(given["data"]).to_dict()
    if given.get("method", method["name"]) != method["name"]:
        raise FewstepError(f"{out} is a {method['name']!r} run; --resume cannot switch it to {given['method']!r}")
    if given.get("teacher", "") not in ("", saved["teacher"].get("spec")):
        raise FewstepError(
            f"{out} was trained from teacher {saved['teacher'].get('spec')!r}; --resume cannot change it"
        )
    cls = get_method(method["name"])
    engine, options = split_options(Sources(given, {}, sources.sets), option_names(cls.Config))
    engine_types = field_types(TrainConfig)
    budget = {}
    for key, value in engine.items():
        if key in ("method", "teacher"):
            continue
        if key not in engine_types:
            raise FewstepError(f"unknown option {key!r} for the engine; valid options: {', '.join(engine_types)}")
        value = coerce(value, engine_types[key], key)
        if key in RESUMABLE:
            budget[key] = value
        elif value != train.get(key):
            raise FewstepError(f"{out} was made with {key}={train.get(key)!r}; --resume cannot change it to {value!r}")
    saved_options = to_json(build(cls.Config, method["options"], f"method {cls.name}"))
    for key, value in to_json(build(cls.Config, options, f"method {cls.name}")).items():
        if key in options and value != saved_options[key]:
            raise FewstepError(f"{out} was made with {key}={saved_options[key]!r}; --resume cannot change it")
    train.pop("method", None)  # runs before 2026-12 kept the method name here too
    return Sources(file={**train, **wall_clock_rule(budget), "options": method["options"], "method": method["name"]})


def _resume_teacher(out: Path) -> Denoiser:
    return run_teacher(out, read_run_config(out))


def resolve_data(plan: Plan, method: Method) -> Dataset | None:
    """The data of a method that needs it: the given object, ``--data``, the copy a resumed run
    saved, or the teacher's own."""
    from fewstep.data import data_of, load_dataset
    from fewstep.teachers.analytic import GaussianMixture

    if not getattr(method, "needs_data", False):
        return None
    if plan.data_obj is not None:
        return plan.data_obj
    if plan.cfg.data is not None:
        return load_dataset(plan.cfg.data)
    if plan.resume:
        recorded = run_data(plan.out, read_run_config(plan.out))
        if recorded is not None:
            return recorded if isinstance(recorded, Dataset) else load_dataset(recorded)
    spec = data_of(plan.teacher)
    if spec is not None:
        return load_dataset(spec)
    if isinstance(plan.teacher, GaussianMixture):  # exact samples of the analytic teacher
        g = torch.Generator().manual_seed(plan.cfg.seed)
        n = 20000
        labels = torch.randint(plan.teacher.num_classes, (n,), generator=g) if plan.teacher.num_classes else None
        x = plan.teacher.sample(n, generator=g, cond=labels)
        return Dataset(x.float(), labels, plan.teacher.num_classes, "analytic")
    raise FewstepError(
        f"method {method.name!r} needs data and the teacher does not say what it was trained on; pass --data"
    )


def execute(plan: Plan, eval_hook=None) -> Method:
    """Build the method, train it, save the final student; return the method whose ``student``
    holds the evaluation-EMA weights (in eval mode)."""
    from accelerate import PartialState

    from fewstep.train.loop import check_run

    # cpu= before accelerate's state exists: under an FSDP launch on a CPU machine, a state built
    # without it sees a single process
    state = PartialState(cpu=plan.cfg.cpu)
    from fewstep.train.warmup import needs_warmup, run_warmup

    if not plan.resume and needs_warmup(plan):
        plan.warmup = run_warmup(plan)
    method, init = make_method(plan, state)
    data = resolve_data(plan, method)
    device = "cpu" if plan.cfg.cpu else state.device
    check_run(plan.cfg, method, data, state.num_processes, device)
    if plan.resume:
        from fewstep.runs.checkpoints import latest, unusable

        if latest(plan.out / "checkpoints") is None:
            raise FewstepError(
                f"--resume: {plan.out} {unusable(plan.out / 'checkpoints', 'start it again with --overwrite')}"
            )
    config = plan.config()
    config["data"] = data_record(data)
    config["init"] = init
    config["student"] = student_record(method.student, plan.teacher)
    if plan.resume:  # keep what the run was made with; only the budget options may have changed
        config = {**read_run_config(plan.out), "train": config["train"]}
    lock = take_lock(plan, state)
    try:
        return _write_and_train(plan, state, method, data, config, eval_hook)
    finally:
        lock.release()


def make_method(plan: Plan, state) -> tuple[Method, dict[str, Any] | None]:
    """The method of ``plan`` (identically initialised on every process) and, for a chain, the
    ``init`` record of ``config.json``: a new run starts from ``--init``'s student, a resumed one
    rebuilds the student layout its chain recorded (the weights come from the checkpoint)."""
    from fewstep.runs.load import attach_stand_in, build_method
    from fewstep.students import add_lora
    from fewstep.train.warmstart import warm_start
    from fewstep.train.warmup import WARMUP_METHOD, custom, fresh_student, student_from_run

    cls, cfg = plan.method_cls, plan.cfg
    if plan.resume:
        saved = read_run_config(plan.out)
        attach_stand_in(plan.teacher, saved.get("init"))
        torch.manual_seed(cfg.seed)
        method = build_method(
            cls, plan.teacher, plan.options, saved.get("init"), saved.get("student"), plan.student_obj
        )
        return method, saved.get("init")
    if cfg.init and read_run_config(Path(cfg.init))["method"]["name"] == WARMUP_METHOD:
        plan.warmup = Path(cfg.init)  # a compress run: the method wraps its network as it wraps a teacher copy
    if cfg.init and plan.warmup is None:
        if state.is_main_process:
            print(f"starting the student from {cfg.init}", flush=True)
        attach_stand_in(plan.teacher, {"run": cfg.init})
        return warm_start(cls, plan.teacher, plan.options, Path(cfg.init), cfg.seed)
    init, student = None, None
    if plan.warmup is not None:
        student, init = student_from_run(plan, plan.warmup)
    elif custom(plan):
        student = fresh_student(plan)
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)
        student = student if student is not None else cls(plan.teacher, plan.options).student
        add_lora(student, cfg.lora_rank)
    torch.manual_seed(cfg.seed)
    if student is None:
        return cls(plan.teacher, plan.options), None
    return cls(plan.teacher, plan.options, student=student), init


def take_lock(plan: Plan, state) -> RunLock:
    """The main process locks the run folder (one-line error if another process trains into it)
    and checks it again now that no other process can change it; every process learns the outcome."""
    lock, problem = RunLock(plan.out), ""
    if state.is_main_process:
        try:
            lock.acquire()
            check_out_dir(plan.out, plan.resume, plan.overwrite)
        except FewstepError as e:
            lock.release()
            problem = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise FewstepError(problem)
    return lock


def _write_and_train(plan: Plan, state, method: Method, data: Dataset | None, config: dict, eval_hook) -> Method:
    from fewstep.io import atomic_write_json
    from fewstep.train.loop import train

    state.wait_for_everyone()
    if state.is_main_process:
        if not plan.resume:
            reset_out_dir(plan.out)
            # a teacher object, or a model folder (small: copied so the run never needs its folder again)
            if plan.teacher_obj or (plan.cfg.teacher and not plan.cfg.teacher.startswith(BY_NAME)):
                config["teacher"]["saved"] = save_teacher(plan.teacher, plan.out / "teacher")
            if data is not None and data.spec is None:
                save_data(data, plan.out)
        atomic_write_json(plan.out / "config.json", config)
    state.wait_for_everyone()
    summary = train(method, plan.cfg, plan.out, data=data, eval_hook=eval_hook, resume=plan.resume)
    return finish(method, plan.out, summary)


def finish(method: Method, out: Path, summary: dict[str, Any]) -> Method:
    """Move the evaluation EMA into ``method.student`` and save it as ``out/student``.

    Under FSDP the networks stay sharded: every process loads its shards of the evaluation EMA
    from the checkpoint, the student's weights are gathered once to write ``out/student``, and the
    teacher is never loaded whole (call the returned method on every process, or ``load_run`` the
    saved run in one process)."""
    from accelerate import PartialState

    state = None
    if any(hasattr(p, "device_mesh") for p in method.networks()["student"].parameters()):
        state = load_sharded_eval_ema(method, out)
    else:
        load_checkpoint_into(method, out, ema=True)
    if PartialState().is_main_process:
        info = {"method": method.name, **summary}
        record = read_run_config(out).get("data") or {}
        if record.get("spec"):  # the student says what it learned from (a trained teacher is used so)
            info["data"] = record["spec"]
            info["trained_on"] = record.get("name")
        from fewstep.students import lora_rank, merge_lora

        student = method.student
        if lora_rank(student) and state is None:  # the adapters, and the merged full student
            from fewstep.io import save_tensors

            lora = {k: v for k, v in student.state_dict().items() if "lora_" in k}
            save_tensors(out / "lora.safetensors", lora)
            info["lora_rank"] = lora_rank(student)
            student = merge_lora(student)
        save_student(student, out / "student", info, state=state)
    method.run = RunInfo(out, summary["step"], read_run_config(out), summary)
    return method


def load_sharded_eval_ema(method: Method, out: Path) -> dict[str, torch.Tensor]:
    """FSDP: put this process's shards of the newest checkpoint's evaluation EMA into the sharded
    student (read tensor by tensor, never the whole file), and return the student's weights
    gathered whole (a collective: every process calls it)."""
    from safetensors import safe_open
    from torch.distributed.tensor import distribute_tensor

    from fewstep.runs import checkpoints as runck
    from fewstep.train.distributed import full

    found = runck.latest(out / "checkpoints")
    if found is None:
        raise FewstepError(f"run {out} {runck.unusable(out / 'checkpoints', 'nothing to save as its student')}")
    student = method.networks()["student"]
    expected = student.state_dict()
    with safe_open(str(found.path / "weights.safetensors"), framework="pt") as f:
        part = {}
        for k, e in expected.items():
            v = f.get_tensor(f"eval_ema.{k}").to(e.device)
            part[k] = distribute_tensor(v, e.device_mesh, e.placements) if hasattr(e, "device_mesh") else v
    student.load_state_dict(part)
    student.eval().requires_grad_(False)
    return {k: full(v) for k, v in student.state_dict().items()}


# --- the Python entry point ---------------------------------------------------------------------
def distill(
    teacher: str | Denoiser | None,
    method: str | None = None,
    max_steps: int | None = None,
    out: str | Path | None = None,
    *,
    data: str | Dataset | None = None,
    options: dict[str, Any] | None = None,
    student: str | dict | torch.nn.Module | None = None,
    eval_hook=None,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> Method:
    """Distill ``teacher`` with ``method``; return the method with its trained student.

    Keyword arguments that name a :class:`~fewstep.train.config.TrainConfig` field (``minutes``,
    ``seed``, ``batch``, ``checkpoint_every``, ``ema_decay``, ...) configure the engine; any other
    keyword is an option of the method's ``Config`` (or pass them as ``options={...}``).

    Args:
        teacher: a spec (``"builtin:digits"``, ``"analytic:gaussians8"``, a model or run folder) or a
            :class:`~fewstep.denoiser.Denoiser` object (saved into the run so it can be reloaded);
            ``None`` with ``resume=True`` (the run's own).
        method: a registered method name (``fewstep methods`` lists them; default ``denoise``, or
            the resumed run's).
        max_steps: iterations to train (default 1000 when ``minutes`` is not given either).
        out: the run directory; a fresh temporary folder when ``None``.
        data: a data spec or :class:`~fewstep.data.Dataset` for methods that need data.
        student: the student network when it is not a teacher copy: ``"half"``, ``"quarter"``, a dict
            of network options (``{"channels": 16}``), or a module (an :class:`~fewstep.denoiser.EDMDenoiser`,
            or a network ``F(x, c_noise, labels, extra)`` wrapped in EDM's preconditioning). Methods
            that start at the teacher first warm it up with ``compress`` (:mod:`fewstep.train.warmup`;
            ``warmup_minutes``/``warmup_steps``). ``lora_rank=R`` trains LoRA adapters instead.
        init: (keyword, an engine option) a run folder whose student this run's student starts
            from — a warm-started chain such as ``kd`` then ``dmd2`` (:mod:`fewstep.train.warmstart`).
        eval_hook: ``callable(method, step, run_dir) -> dict | None`` run every ``eval_every`` steps.
        resume: continue the run in ``out`` from its newest checkpoint.
        overwrite: replace an existing run in ``out``.

    Returns:
        The method; ``method.student`` holds the evaluation-EMA weights (what ``load_run(out)``
        returns too), ``method.run`` is its :class:`~fewstep.runs.folder.RunInfo` (``run.summary``: how the run ended).

    Example:
        >>> m = distill("analytic:gaussians8", "denoise", max_steps=100, out="runs/demo")  # doctest: +SKIP
    """
    engine_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    engine = {k: v for k, v in kwargs.items() if k in engine_fields and v is not None}
    method_opts = {**(options or {}), **{k: v for k, v in kwargs.items() if k not in engine_fields}}
    if method is not None or not resume:
        engine["method"] = method or "denoise"
    if max_steps is not None:
        engine["max_steps"] = max_steps
    obj_teacher = teacher if isinstance(teacher, Denoiser) else None
    if obj_teacher is None and teacher is not None:
        engine["teacher"] = str(teacher)
    obj_data = data if isinstance(data, Dataset) else None
    if isinstance(data, str):
        engine["data"] = data
    if out is None:
        if resume:
            raise FewstepError("resume=True needs the run's out= folder")
        out = tempfile.mkdtemp(prefix="fewstep-run-")
    student_obj = student if isinstance(student, torch.nn.Module) else None
    if student is not None and student_obj is None:
        engine["student_net"] = student
    sources = Sources(flags=engine, options=method_opts)
    plan = plan_run(sources, out, teacher=obj_teacher, data=obj_data, resume=resume, overwrite=overwrite,
                    student=student_obj)  # fmt: skip
    if resume and obj_teacher is not None:
        plan.teacher = obj_teacher
    return execute(plan, eval_hook=eval_hook)
