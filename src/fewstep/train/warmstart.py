"""Warm-started chains: a run whose student starts from another run's student (``--init``).

The strongest recent recipes chain methods — regression on teacher pairs, then distribution
matching (DMD2, Self-Forcing); a consistency model, then an adversarial stage (SANA-Sprint);
PD plus a GAN (SDXL-Lightning). ``fewstep distill --method dmd2 --init runs/kd`` builds the new
method around the earlier run's student (its evaluation-EMA weights, the student that run
produced) and, where both methods keep a fake score of the same shape, its fake score too.

Students come in four parameterisations (:mod:`fewstep.students`): a teacher-shaped denoiser
``D(x, sigma)``, a :class:`~fewstep.students.ConsistencyStudent`, a
:class:`~fewstep.students.OneStepGenerator` ``G(z) = D(sigma_init z, sigma_init)`` and CTM's
:class:`~fewstep.students.FlowMapStudent`. A student is carried over as it is when the new
method uses the same kind, and otherwise wrapped so that it computes the same function:

- denoiser or consistency student -> one-step generator: ``G(z) = f(sigma_init z, sigma_init)``;
- consistency student -> denoiser: the consistency student *is* a denoiser (kept with its scalings);
- one-step generator -> denoiser / consistency / flow map: its inner network;
- denoiser -> consistency student or flow map: the wrapping the method itself applies to the
  teacher (consistency scalings; CTM's zero-initialised target-level input).

Where a one-step generator is involved (it exists at one input level only), the two runs' one-step
samples of the same noise are compared before any training and the chain starts only if they agree
(largest difference relative to ``sigma_data`` under :data:`TOLERANCE`): a ``kd`` generator fed at
``sigma_init`` 80 does not silently start a ``sid`` generator fed at 2.5 (the error names the option
that makes it exact). Elsewhere the function is carried over by construction; the gap is still
recorded (``init.one_step_gap``) — it is not zero where the new method samples from its own first
level, e.g. ``cd`` -> ``ladd`` (80 -> ADD's 7.3). Methods that rebuild their student from the teacher round by
round (``progressive``, ``tract``, ``guided``, ``lightning``) and ``denoise`` cannot start from a
run. A chain's cost is the whole chain's: ``config.json`` records the earlier runs' minutes and
method names, and reports and leaderboards add them (:func:`fewstep.runs.folder.run_cost`).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods._fake_score import eval_mode
from fewstep.methods.base import Method
from fewstep.options import option_names
from fewstep.students import ConsistencyStudent, FlowMapStudent, OneStepGenerator, copy_teacher, layout

TOLERANCE = 1e-3  # max |one-step sample difference| / sigma_data for a warm start to count as exact


def accepts_student(cls: type[Method]) -> bool:
    """Whether the method can start from another run's student (``student=`` in its constructor,
    and not rebuilt round by round from the teacher)."""
    return "student" in inspect.signature(cls.__init__).parameters and cls.chains


def chainable() -> list[str]:
    from fewstep.methods import available

    return sorted(n for n, c in available().items() if accepts_student(c))


# --- converting one parameterisation into another ----------------------------------------------------
def convert(src: nn.Module, default: nn.Module) -> nn.Module | None:
    """``src`` as a student of the kind ``default`` is (a copy; ``None``: no conversion)."""
    src = copy.deepcopy(src)
    if type(src) is type(default):
        if isinstance(src, OneStepGenerator):  # fed at the new method's sigma_init (the gap check says if that differs)
            return OneStepGenerator(src.net, default.sigma_init) if layout(src.net) == layout(default.net) else None
        same = {k: v.shape for k, v in src.state_dict().items()} == {
            k: v.shape for k, v in default.state_dict().items()
        }
        return src if same else None
    inner = src.net if isinstance(src, OneStepGenerator) else src
    if isinstance(default, OneStepGenerator):
        return OneStepGenerator(src, default.sigma_init) if layout(src) in (["denoiser"], ["consistency"]) else None
    if layout(default) == ["denoiser"]:
        return inner if layout(inner) in (["denoiser"], ["consistency"]) else None
    if isinstance(default, ConsistencyStudent):
        return ConsistencyStudent(inner) if layout(inner) == ["denoiser"] else None
    if isinstance(default, FlowMapStudent):
        return FlowMapStudent(copy_teacher(inner, extra_dims=1)) if layout(inner) == ["denoiser"] else None
    return None


def _kind(m: nn.Module) -> str:
    spec = layout(m)
    if spec is None:
        return type(m).__name__
    names = {"denoiser": "denoiser", "consistency": "consistency student", "flowmap": "flow map (CTM)"}
    if spec[0].startswith("generator:"):
        return f"one-step generator at sigma_init {float(spec[0].split(':')[1]):g}"
    return names[spec[0]]


@torch.no_grad()
def one_step_gap(a: Method, b: Method, n: int = 8, seed: int = 0) -> float:
    """Largest difference between the one-step samples of ``a`` and ``b`` for the same noise and
    labels, relative to ``sigma_data`` (0: the same one-step function)."""
    t = a.teacher
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *t.sample_shape), generator=g)
    cond = torch.randint(0, t.num_classes, (n,), generator=g) if t.num_classes else None
    with eval_mode(*a.networks().values(), *b.networks().values()):
        xa, xb = a.sample(noise, 1, cond), b.sample(noise, 1, cond)
    return float((xa - xb).abs().max() / t.sigma_data)


# --- the entry points ----------------------------------------------------------------------------------
def read_init(init: str | Path, out: Path) -> Path:
    """The run folder ``init`` names, checked (one-line errors)."""
    from fewstep.runs.folder import is_run_dir

    path = Path(init).expanduser().resolve()
    if not path.is_dir() or not is_run_dir(path):
        raise FewstepError(f"--init {init}: not a fewstep run directory (a folder made by `fewstep distill`)")
    if path == out.resolve():
        raise FewstepError(f"--init {init} is the run being written; start from another run")
    return path


def warm_start(
    cls: type[Method], teacher: Denoiser, options: Any, init: Path, seed: int = 0
) -> tuple[Method, dict[str, Any]]:
    """``cls`` built around the student of run ``init`` (and its fake score where both have one);
    returns the method and the ``init`` record for ``config.json``."""
    from fewstep.runs import load_run
    from fewstep.runs.folder import run_cost

    if not accepts_student(cls):
        raise FewstepError(
            f"--init: method {cls.name} rebuilds its student from the teacher and cannot start from a run; "
            f"methods that can: {', '.join(chainable())}"
        )
    before = load_run(init, ema=True, teacher=None)
    src_t = before.teacher
    if tuple(src_t.sample_shape) != tuple(teacher.sample_shape) or src_t.num_classes != teacher.num_classes:
        raise FewstepError(
            f"--init {init}: its teacher makes samples {tuple(src_t.sample_shape)} with {src_t.num_classes} classes, "
            f"this run's {tuple(teacher.sample_shape)} with {teacher.num_classes}; chain runs of the same teacher"
        )
    from fewstep.runs.load import student_record
    from fewstep.students import build_network, lora_rank, merge_lora

    record = student_record(before.student, before.teacher)
    src = merge_lora(before.student) if lora_rank(before.student) else before.student
    torch.manual_seed(seed)
    # the default student of the new method, around the same network as the earlier run's student
    default = cls(build_network(record["net"]) if record and record.get("net") else teacher, options)
    student = convert(src, default.student)
    if student is None:
        raise FewstepError(
            f"--init {init}: a {before.name} student ({_kind(before.student)}) cannot become a {cls.name} student "
            f"({_kind(default.student)}); compatible: denoiser, consistency and one-step students into each other, "
            "denoisers into flow maps (CTM)"
        )
    student.train().requires_grad_(True)
    torch.manual_seed(seed)  # the method's other networks start as in an unchained run
    method = cls(teacher, options, student=student)
    gap = one_step_gap(before, method)
    generators = [m for m in (before.student, method.student) if isinstance(m, OneStepGenerator)]
    if gap > TOLERANCE and generators:  # a generator exists at one input level only: it must be the same
        b = before.student
        s = b.sigma_init if isinstance(b, OneStepGenerator) else before.teacher.sigma_max
        hint = (f"; --set sigma_init={s:g} makes it exact" if "sigma_init" in option_names(cls.Config)
                else f"; the {before.name} generator reads noise at sigma {s:g} only")  # fmt: skip
        raise FewstepError(
            f"--init {init}: the {cls.name} student would not start where the {before.name} run ended "
            f"(one-step samples differ by {gap:.3g} x sigma_data{hint})"
        )
    carried = ["student"]
    fake_a, fake_b = getattr(before, "fake_score", None), getattr(method, "fake_score", None)
    if cls.carries_fake_score and isinstance(fake_a, nn.Module) and isinstance(fake_b, nn.Module):
        shapes = {k: v.shape for k, v in fake_b.state_dict().items()}
        if {k: v.shape for k, v in fake_a.state_dict().items()} == shapes:
            fake_b.load_state_dict(fake_a.state_dict())
            carried.append("fake_score")
    prior = before.run.config.get("init") or {}
    cost = run_cost(init)
    record = {
        "run": str(init),
        "method": before.name,
        "chain": [*prior.get("chain", []), before.name],
        "minutes": cost.get("minutes"),
        "steps": cost.get("steps"),
        "weights": "ema",
        "carried": carried,
        "layout": layout(method.student) if layout(method.student) != layout(default.student) else None,
        "one_step_gap": gap,
    }
    return method, record
