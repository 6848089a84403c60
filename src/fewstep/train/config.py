"""Typed run configuration: the engine's :class:`TrainConfig` and a method's ``Config`` dataclass.

Options arrive as strings (``--set key=value``), YAML/JSON values (``--config file.yaml``) or Python
values (``fewstep.distill(..., lr=1e-4)``). Each is checked against the dataclass field's type and
converted (``"1e-4"`` -> ``1e-4`` for a float, ``"0.9,0.99"`` -> ``(0.9, 0.99)`` for a tuple);
an unknown key or a value of the wrong type is a one-line :class:`FewstepError`.

A config file holds engine options at the top level and the method's options under ``options``::

    method: denoise
    teacher: builtin:digits
    max_steps: 2000
    options:
      lr: 1.0e-4
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewstep.errors import FewstepError
from fewstep.options import build, option_names

MIXED_PRECISION = ("no", "bf16", "fp16")

# Engine defaults of every new run that differ from the dataclass's (which keep older runs' meaning
# when they are resumed): the evaluation EMA ramps up as EDM's does.
NEW_RUN_DEFAULTS = {"ema_rampup": 0.05}
EMA_KEYS = ("ema_decay", "ema_halflife_kimg")

# Options a `--resume` may change: they steer the budget and bookkeeping, never the maths.
RESUMABLE = frozenset(
    {"max_steps", "minutes", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "sample_n",
     "eval_every", "max_nonfinite", "snapshot_minutes"}
)  # fmt: skip


@dataclass
class TrainConfig:
    """Engine options (everything that is not a method's maths).

    ``batch`` is the global batch of one iteration: it is split over processes and over
    ``grad_accum`` micro-batches (``batch`` must divide evenly). An iteration steps every optimizer
    that is due; ``max_steps`` counts iterations. ``ema_decay`` is the evaluation EMA of the student
    (what ``load_run`` and ``fewstep sample`` use; 0 keeps it equal to the raw student).
    """

    teacher: str = ""
    data: str | dict | None = None  # data for methods that need it (a spec; saved whole); default: the teacher's
    init: str | None = None  # start the student from this run's student (a warm-started chain; train/warmstart.py)
    # a student that is not a teacher copy: "half", "quarter" or network options ({"channels": 16});
    # methods that start at the teacher first train it with compress (train/warmup.py)
    student_net: str | dict | None = None
    warmup_minutes: float | None = None  # the compress warm-up's budget (default: a quarter of this run's)
    warmup_steps: int | None = None
    lora_rank: int | None = None  # train peft LoRA adapters of this rank instead of the student's weights
    max_steps: int | None = 1000
    minutes: float | None = None
    seed: int = 0
    batch: int = 64
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's autocast; weights stay float32)
    cpu: bool = False  # force the CPU even when a GPU is present
    ema_decay: float = 0.999
    # EDM's evaluation EMA: a half-life in thousands of images (instead of ema_decay), and a ramp-up
    # that keeps the half-life under ema_rampup x the images seen (Karras et al. 2022; EDM: 500, 0.05).
    # New runs get ema_rampup 0.05 and their method's EMA defaults (NEW_RUN_DEFAULTS, Method.engine_defaults)
    ema_halflife_kimg: float | None = None
    ema_rampup: float | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # also checkpoint at these minutes of training, kept beside the newest keep_checkpoints (curves)
    snapshot_minutes: tuple[float, ...] = ()
    log_every: int = 50
    sample_every: int = 0  # 0: one grid at the end only
    sample_n: int = 64
    eval_every: int = 0  # 0: no periodic evaluation
    max_nonfinite: int = 20  # this many non-finite iterations in a row stop the run

    def eval_ema_decay(self, step: int) -> float:
        """The evaluation EMA's decay at iteration ``step`` (0-based), EDM's rule (Karras et al.
        2022, ``training_loop.py``): ``0.5 ** (batch / h)`` with the half-life ``h`` in images —
        ``ema_halflife_kimg * 1000``, or the one of a fixed ``ema_decay`` — capped at
        ``ema_rampup x images seen``. ``ema_decay = 0`` (no halflife) is no EMA at all; without a
        ramp-up a fixed ``ema_decay`` is used as it is. A pure function of the step, so resumes are exact."""
        if self.ema_halflife_kimg is not None:
            half = self.ema_halflife_kimg * 1000
        elif self.ema_decay == 0.0 or self.ema_rampup is None:
            return self.ema_decay
        else:
            half = self.batch * math.log(0.5) / math.log(self.ema_decay)
        if self.ema_rampup is not None:
            half = min(half, (step + 1) * self.batch * self.ema_rampup)
        return 0.5 ** (self.batch / max(half, 1e-8))

    def validate(self) -> None:
        """One-line errors for values no type check catches."""
        if self.max_steps is None and self.minutes is None:
            raise FewstepError("give a budget: --max-steps N and/or --minutes M")
        mp = self.mixed_precision
        checks = [
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (mp in MIXED_PRECISION, f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mp!r}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), got {self.ema_decay}"),
            (
                self.ema_halflife_kimg is None or self.ema_halflife_kimg > 0,
                f"ema_halflife_kimg must be > 0, got {self.ema_halflife_kimg}",
            ),
            (
                self.ema_rampup is None or 0 < self.ema_rampup <= 1,
                f"ema_rampup must lie in (0, 1], got {self.ema_rampup}",
            ),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (
                min(self.sample_every, self.eval_every, self.sample_n) >= 0,
                "sample_every/eval_every/sample_n must be >= 0",
            ),
            (self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.lora_rank is None or self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}"),
            (self.warmup_minutes is None or self.warmup_minutes > 0, "warmup_minutes must be > 0"),
            (self.warmup_steps is None or self.warmup_steps >= 1, "warmup_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise FewstepError(message)


# --- sources: files and --set -------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a dict (engine keys at the top, method options under ``options``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FewstepError(f"{path} is not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FewstepError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    return data


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FewstepError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value
    return out


@dataclass
class Sources:
    """Options from every source, lowest precedence first: a config file, flags (``None``: not given),
    ``--set``; ``options`` are method options given as Python values (``fewstep.distill(..., lr=...)``)."""

    file: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def wall_clock_rule(engine: dict[str, Any]) -> dict[str, Any]:
    """A run given ``minutes`` and no ``max_steps`` stops by the clock alone (no default iteration cap)."""
    if engine.get("minutes") is not None and "max_steps" not in engine:
        return {**engine, "max_steps": None}
    return engine


def split_options(sources: Sources, method_fields: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge the sources into ``(engine options, method options)``. A ``--set`` key goes to the engine
    if :class:`TrainConfig` has it, else to the method; ``train.KEY`` / ``options.KEY`` force a side."""
    engine_keys = {f.name for f in dataclasses.fields(TrainConfig)} | {"method"}
    file = dict(sources.file)
    method_opts = file.pop("options", None) or {}
    if not isinstance(method_opts, dict):
        raise FewstepError("'options' in the config file must be a mapping of method options")
    engine = {**file, **{k: v for k, v in sources.flags.items() if v is not None}}
    method = {**method_opts, **sources.options}
    for key, value in sources.sets.items():
        side, dot, name = key.partition(".")
        if dot and side in ("train", "options", "method"):
            (engine if side == "train" else method)[name] = value
        elif key in engine_keys and key in method_fields:
            raise FewstepError(f"--set {key} is both an engine and a method option; write train.{key} or options.{key}")
        elif key in engine_keys:
            engine[key] = value
        else:
            method[key] = value
    return wall_clock_rule(engine), method


def method_name(sources: Sources) -> str:
    """The method the sources name (``method`` in a file or flag, or ``--set method=...``)."""
    given = {**sources.file, **{k: v for k, v in sources.flags.items() if v is not None}}.get("method")
    name = given or sources.sets.get("method") or sources.sets.get("train.method")
    if not name:
        raise FewstepError("give a method (--method NAME; `fewstep methods` lists them)")
    return str(name)


def with_new_run_defaults(engine: dict[str, Any], method_cls: type) -> dict[str, Any]:
    """``engine`` completed with :data:`~fewstep.train.config.NEW_RUN_DEFAULTS` and the method's
    ``engine_defaults`` (its EMA defaults only when the user set no EMA option)."""
    out = dict(engine)
    for key, value in {**NEW_RUN_DEFAULTS, **method_cls.engine_defaults}.items():
        user_ema = key in EMA_KEYS and any(k in engine for k in EMA_KEYS)
        if key not in engine and not user_ema:
            out[key] = value
    return out


def resolve(sources: Sources, method_cls: type, new_run: bool, teacher_given: bool = False) -> tuple[TrainConfig, Any]:
    """The one way from a config file, flags, ``--set`` and Python keywords to a run's options: the
    engine's :class:`TrainConfig` and the method's ``Config``, typed and validated (one-line errors).
    A new run gets :data:`NEW_RUN_DEFAULTS` and the method's ``engine_defaults``; ``teacher_given``:
    the teacher is an object, so no spec is needed."""
    engine, method = split_options(sources, option_names(method_cls.Config))
    engine.pop("method", None)
    if teacher_given:
        engine["teacher"] = engine.get("teacher") or ""
    elif new_run and not engine.get("teacher"):
        raise FewstepError("give a teacher (--teacher builtin:digits, analytic:gaussians8 or a model folder)")
    if new_run:
        engine = with_new_run_defaults(engine, method_cls)
    cfg = build(TrainConfig, engine, "the engine (fewstep distill)")
    cfg.validate()
    return cfg, build(method_cls.Config, method, f"method {method_cls.name}")
