"""Students that are not teacher copies: smaller networks (``--student-net``), the default networks of
analytic teachers, and LoRA adapters on fewstep's own networks (``--lora-rank``).

What each method does with such a student (``Method.starts_at_teacher``):

- **Methods whose student must start where the teacher is** (every method but ``kd`` and
  ``compress``: CD/LCM, CTM, DMD, DMD2, SiD, Diff-Instruct, ADD, LADD, UFOGen, PD, TRACT, guided,
  Lightning): the student network is first trained by ``compress`` (BK-SDM's output- and
  feature-level distillation) into a sibling run ``<out>.warmup`` (reused when it exists, resumed
  when unfinished), then wrapped as the method wraps a teacher copy (consistency scalings, a
  one-step generator at the method's ``sigma_init``, CTM's target-level input, guided
  distillation's w input). The fake scores and discriminators that copy the teacher still do
  (an analytic teacher's fake score is a mixture with trainable means and scales). The run
  records the warm-up as a chain (``config.json`` ``init``), so reports count its minutes.
- ``kd`` and ``compress`` train the new network from its own start.

An analytic teacher has no network to copy: its students get :func:`fewstep.students.student_network`'s
default (an MLP for flat samples, a UNet for images) and the same warm-up.

``--lora-rank R`` puts peft LoRA adapters on the student's convolutions and linear layers
(:func:`fewstep.students.add_lora`) and trains only them; the run saves them with its checkpoints,
``<out>/student`` is the merged full student and ``<out>/lora.safetensors`` the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.methods.base import Method
from fewstep.students import copyable, student_network

WARMUP_METHOD = "compress"


def parse_student_net(value: Any) -> str | dict | None:
    """``--student-net`` as given (a preset name, a JSON object or a dict) -> a preset or a dict."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise FewstepError(f"--student-net {text}: not valid JSON ({e.msg}); e.g. '{{\"channels\": 16}}'") from None
        if not isinstance(parsed, dict):
            raise FewstepError("--student-net must be a preset name or a JSON object of network options")
        return parsed
    return text


def student_spec(plan: Any) -> Any:
    """The student network a run asks for: an object given to ``fewstep.distill``, ``--student-net``, or None."""
    return plan.student_obj if plan.student_obj is not None else plan.cfg.student_net


def custom(plan: Any) -> bool:
    """Whether this run's student is not a teacher copy."""
    return student_spec(plan) is not None or not copyable(plan.teacher)


def needs_warmup(plan: Any) -> bool:
    cls = plan.method_cls
    return custom(plan) and cls.starts_at_teacher and not plan.cfg.init and cls.name != WARMUP_METHOD


def check_student_options(cls: type[Method], cfg: Any, obj: nn.Module | None = None) -> None:
    """One-line errors for student options the method or the other options rule out."""
    import inspect

    if obj is not None and cfg.student_net is not None:
        raise FewstepError("give the student network once: student=<module> or student_net=..., not both")
    given = cfg.student_net is not None or obj is not None
    what = "--student-net" if given else "--lora-rank" if cfg.lora_rank else None
    if what and "student" not in inspect.signature(cls.__init__).parameters:
        raise FewstepError(f"{what}: method {cls.name} trains a teacher-shaped network only; "
                           "use `fewstep teacher train --net` for a new architecture")  # fmt: skip
    if given and cfg.init:
        raise FewstepError("--student-net with --init: the student comes from --init's run; give one of them")
    if cfg.lora_rank and cfg.init:
        raise FewstepError("--lora-rank with --init: a chain trains its student whole; drop --lora-rank")


def warmup_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.warmup"


def warmup_budget(cfg: Any) -> dict[str, Any]:
    """The warm-up's budget: the given one, else a quarter of this run's."""
    if cfg.warmup_steps or cfg.warmup_minutes:
        return {"max_steps": cfg.warmup_steps, "minutes": cfg.warmup_minutes}
    return {
        "max_steps": max(1, cfg.max_steps // 4) if cfg.max_steps else None,
        "minutes": cfg.minutes / 4 if cfg.minutes else None,
    }


def run_warmup(plan: Any) -> Path:
    """Train (or reuse, or resume) the ``compress`` run that brings this run's student network to
    the teacher; returns its folder."""
    from fewstep.runs.folder import is_run_dir, read_run_config
    from fewstep.train.api import execute, plan_run
    from fewstep.train.config import Sources

    cfg, out = plan.cfg, warmup_dir(plan.out)
    flags: dict[str, Any] = {
        "method": WARMUP_METHOD,
        "teacher": cfg.teacher or None,
        "data": cfg.data,
        "student_net": cfg.student_net,
        "seed": cfg.seed,
        "batch": cfg.batch,
        "cpu": cfg.cpu,
        "checkpoint_every": cfg.checkpoint_every,
        **warmup_budget(cfg),
    }
    resume = out.is_dir() and is_run_dir(out)
    if resume:
        saved = read_run_config(out)
        if saved["method"]["name"] != WARMUP_METHOD or saved["train"].get("student_net") != cfg.student_net:
            raise FewstepError(
                f"{out} exists and is not this run's warm-up ({saved['method']['name']}, student_net "
                f"{saved['train'].get('student_net')!r}); move it away or choose another --out"
            )
        if (out / "student" / "config.json").is_file():
            print(f"warm-up: using the finished {WARMUP_METHOD} run {out}", flush=True)
            return out
        flags = {k: flags[k] for k in ("max_steps", "minutes")}
    print(f"warm-up: training the student network with {WARMUP_METHOD} into {out} "
          f"({', '.join(f'{k}={v:g}' for k, v in warmup_budget(cfg).items() if v)})", flush=True)  # fmt: skip
    teacher = plan.teacher if plan.teacher_obj else None
    try:
        sub = plan_run(Sources(flags=flags), out, teacher=teacher, data=plan.data_obj, resume=resume,
                       student=plan.student_obj)  # fmt: skip
        execute(sub)
    except FewstepError as e:
        raise FewstepError(f"the warm-up of the {plan.method_cls.name} student ({out}): {e}") from None
    return out


def student_from_run(plan: Any, run: Path):
    """The method's student around the warmed-up network of ``run`` (its evaluation EMA), wrapped as
    the method wraps a teacher copy; returns the student and the ``init`` record of ``config.json``."""
    from fewstep.runs import load_run
    from fewstep.runs.folder import run_cost

    cls, options, seed = plan.method_cls, plan.options, plan.cfg.seed
    from fewstep.runs.load import set_stand_in

    before = load_run(run, ema=True, teacher=plan.teacher, student=plan.student_obj)
    set_stand_in(plan.teacher, before.student)  # an analytic teacher's feature backbone
    net = before.student
    torch.manual_seed(seed)
    student = cls(net, options).student  # the method's own wrapping, around the warmed-up network
    student.train().requires_grad_(True)
    cost = run_cost(run)
    record = {
        "run": str(run),
        "method": before.name,
        "chain": [before.name],
        "minutes": cost.get("minutes"),
        "steps": cost.get("steps"),
        "weights": "ema",
        "carried": ["student"],
        "layout": None,
        "warmup": True,
    }
    return student, record


def fresh_student(plan: Any) -> nn.Module:
    """The method's student around a fresh network of the asked-for kind (methods that need no warm-up)."""
    torch.manual_seed(plan.cfg.seed)
    return plan.method_cls(student_network(plan.teacher, student_spec(plan)), plan.options).student
