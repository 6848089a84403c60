"""``fewstep eval`` end to end: resolve what to evaluate, measure it, write report.md + pictures.

The subject is a run directory (its student at 1/2/4 steps, against its teacher) or a model (a
``builtin:``/``analytic:`` name or a model folder: the model itself with the training-free
solvers). Everything in a report is measured in one call, on one machine; teacher and baseline
rows are deterministic given the seeds and may come from the cache of an earlier identical
measurement (marked ᶜ in the tables).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.eval.evaluate import EvalSettings, Evaluator, Row
from fewstep.eval.report import (
    SOLVER_NAMES,
    machine,
    optional_columns,
    quality_plot,
    quality_table,
    sample_figure,
    speed_table,
)
from fewstep.eval.sampling import Sampler, generate, student_sampler, teacher_sampler
from fewstep.io import atomic_write_bytes, atomic_write_json

GRID_N = 16  # samples per row of the side-by-side figure


@dataclass
class Subject:
    """What is evaluated: a teacher and, for a run, the method holding its student."""

    name: str
    teacher: Denoiser
    teacher_spec: str
    method: Any = None
    run_dir: Path | None = None
    students: list[Sampler] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    data: Any = None  # what a run trained on (DataSpec or Dataset); None: the teacher's own
    weights: str | None = None  # which student weights are scored (a run's evaluation EMA or raw)


def describe_weights(train: dict, weights: str) -> str:
    """How a run's scored weights came about, for the report."""
    if weights == "raw":
        return "the raw trained weights (`--weights raw`)"
    half, ramp, decay = train.get("ema_halflife_kimg"), train.get("ema_rampup"), train.get("ema_decay", 0.999)
    if half is None and (decay == 0 or decay is None):
        return "the raw trained weights (this run keeps no EMA: ema_decay 0)"
    what = f"half-life {half:g} kimg" if half is not None else f"decay {decay:g}"
    return f"the evaluation EMA ({what}" + (f", ramp-up {ramp:g}" if ramp else ", no ramp-up") + ")"


def resolve(spec: str | Path, student_steps: tuple[int, ...] | None = None, weights: str = "ema") -> Subject:
    """A run directory (its evaluation-EMA student, or the raw trained weights with
    ``weights="raw"``) or a model spec. ``student_steps`` defaults to the method's own
    ``default_steps`` up to 4 (1, 2, 4 for multi-step students)."""
    if weights not in ("ema", "raw"):
        raise FewstepError(f"--weights must be ema or raw, got {weights!r}")
    from fewstep.runs.folder import is_run_dir
    from fewstep.teachers import load_teacher

    path = Path(str(spec))
    if path.is_dir() and is_run_dir(path):
        from fewstep.runs import load_run, run_data
        from fewstep.runs.folder import run_cost

        method = load_run(path, ema=weights == "ema")
        from fewstep.students import lora_rank, merge_lora

        if lora_rank(method.student):  # the same function with the adapters folded in: timed as the run's student
            method.student = merge_lora(method.student)
        cfg = method.run.config
        data = run_data(path, cfg)
        teacher_spec = cfg["teacher"].get("spec") or f"{path}/teacher"
        if student_steps is None:
            student_steps = tuple(k for k in getattr(method, "default_steps", (1, 2, 4)) if k <= 4) or (1,)
        students = [student_sampler(method, k, f"{method.name}") for k in student_steps]
        subject = Subject(f"{method.name} run {path.name}", method.teacher, teacher_spec, method, path, students,
                          run_cost(path), data)  # fmt: skip
        subject.weights = describe_weights(cfg["train"], weights)
        return subject
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("format") == "fewstep-student":
            raise FewstepError(f"{path} is a run's student; evaluate the run directory {path.parent} instead")
    return Subject(str(spec), load_teacher(spec), str(spec))


def evaluate(
    subject: Subject,
    settings: EvalSettings,
    out_dir: str | Path,
    progress=print,
    command: str | None = None,
) -> dict:
    """Measure ``subject`` and write ``report.md``, ``results.json``, ``quality_vs_nfe.png`` and
    ``samples.png`` into ``out_dir``; return the results (also the headline)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ev = Evaluator(subject.teacher, settings, subject.data, progress)
    progress(f"reference: {ev.data or 'exact samples'} ({ev.ref_stats.n} samples, features {ev.extractor.name})")
    s = settings
    pairs = [(s.teacher_solver, s.teacher_nfe)] + [(sv, k) for sv in s.baseline_solvers for k in s.baseline_nfe]
    t_rows = ev.teacher_rows(tuple(pairs), progress)
    teacher_row = t_rows[0]
    students: list[Row] = []
    for sampler in subject.students:
        progress(f"measuring student {sampler.label}")
        students.append(ev.measure(sampler))
    t_sampler = teacher_sampler(subject.teacher, s.teacher_solver, s.teacher_nfe, s.guidance)
    floor = ev.floor(t_sampler)
    progress("measuring speed")
    speeds = [ev.speed(sm) for sm in subject.students] + [ev.speed(t_sampler)]
    results = {
        "subject": subject.name,
        "teacher": subject.teacher_spec,
        "method": getattr(subject.method, "name", None),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": command or "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "protocol": ev.describe(),
        "teacher_row": teacher_row.to_dict(),
        "students": [r.to_dict() for r in students],
        "baselines": [r.to_dict() for r in t_rows[1:]],
        "floor": floor,
        "speed": speeds,
        "cost": subject.cost,
        "weights": subject.weights,
        "eval_minutes": None,
    }
    progress("drawing pictures")
    _pictures(subject, ev, t_rows, students, out_dir)
    results["eval_minutes"] = round((time.time() - t0) / 60, 2)
    results["headline"] = headline(results)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_bytes(out_dir / "report.md", render(results).encode())
    return results


def _pictures(subject: Subject, ev: Evaluator, t_rows: list[Row], students: list[Row], out_dir: Path) -> None:
    series: dict[str, list[Row]] = {}
    for r in t_rows[1:]:
        series.setdefault(r.name, []).append(r)
    for r in students:
        series.setdefault(r.name, []).append(r)
    # no held-out line: its few samples make its FID incomparable with the curves'
    quality_plot(series, out_dir / "quality_vs_nfe.png", t_rows[0], title=subject.name)
    s = ev.s
    seeds = range(GRID_N if len(ev.shape) > 1 else 2000)
    t_sampler = teacher_sampler(subject.teacher, s.teacher_solver, s.teacher_nfe, s.guidance)
    panels = [(f"teacher {t_sampler.label}", ev.images(generate(t_sampler, seeds, ev.shape, ev.classes)[0]))]
    for sm in subject.students:
        panels.append((sm.label, ev.images(generate(sm, seeds, ev.shape, ev.classes)[0])))
    if not subject.students:  # a model alone: its fast solvers (at the NFE nearest 4) beside its reference
        few = min(s.baseline_nfe, key=lambda k: (abs(k - 4), k))
        for solver in s.baseline_solvers:
            sm = teacher_sampler(subject.teacher, solver, few, s.guidance)
            panels.append((f"{SOLVER_NAMES.get(solver, solver)} @ {sm.nfe} NFE",
                           ev.images(generate(sm, seeds, ev.shape, ev.classes)[0])))  # fmt: skip
    sample_figure(panels, out_dir / "samples.png", ev.ref_x if len(ev.shape) == 1 else None)


def headline(results: dict) -> str:
    """``FID ratio at 1 NFE X.XX (student FID a vs teacher b at 35 NFE), N× faster``."""
    t = results["teacher_row"]
    st = [r for r in results["students"] if r["nfe"] == min((r["nfe"] for r in results["students"]), default=0)]
    if not st or not t["fid"]:
        return f"teacher {t['name']} @ {t['nfe']} NFE: FID {t['fid']:.3f}"
    r = st[0]
    sps = {(x["kind"], x["nfe"]): x["samples_per_s"] for x in results["speed"]}
    up = sps.get(("student", r["nfe"]), 0) / max(sps.get(("teacher", t["nfe"]), 0), 1e-12)
    return (f"FID ratio at {r['nfe']} NFE: {r['fid'] / t['fid']:.2f} (student FID {r['fid']:.2f} vs teacher "
            f"{t['fid']:.2f} at {t['nfe']} NFE), sampling {up:.1f}× faster")  # fmt: skip


def render(results: dict) -> str:
    """report.md from ``results``."""
    p = results["protocol"]
    teacher = Row(**results["teacher_row"])
    students = [Row(**r) for r in results["students"]]
    baselines = [Row(**r) for r in results["baselines"]]
    cols = optional_columns([teacher, *students, *baselines])
    lines = [f"# fewstep evaluation — {results['subject']}", "", f"**{results['headline']}**", ""]
    lines += [
        f"- teacher: `{results['teacher']}`" + (f"; method: `{results['method']}`" if results["method"] else ""),
        f"- protocol: {p['n']} samples × {p['repeats']} seed range(s) (sample *i* from seed *i*), labels uniform, "
        f"teacher guidance {p.get('guidance', 1.0):g}; FID/KID/precision/recall (k=3) in the features "
        f"`{p['features']}` ({p['feature_dim']}-d)"
        + (f", held-out accuracy of the feature network {100 * acc:.2f}%"
           + (" (rotation prediction: the data has no labels)" if p.get("classifier_task") == "rotation" else "")
           + (f" on `{p['classifier_test_split']}`" if p.get("classifier_test_split") else "")
           if (acc := p.get("classifier_test_accuracy")) else "")
        + f"; reference: `{p['reference']}` ({p['reference_n']} samples)",
        f"- FID ratio = FID / FID(teacher {SOLVER_NAMES.get(teacher.name, teacher.name)} @ {teacher.nfe} NFE), "
        f"measured in this run; fidelity = RMSE to the teacher's ODE answer (Heun, 128 steps) for the same noise, "
        f"first {min(p['fidelity_n'], p['n'])} seeds; KID = unbiased MMD² (torchmetrics' cubic kernel) in the "
        "same features (0: one distribution)",
        f"- machine: {results['machine']}; date: {results['date']}; evaluation took {results['eval_minutes']} min",
        f"- command: `{results['command']}`",
    ]  # fmt: skip
    if results.get("weights"):
        lines.append(f"- student weights scored: {results['weights']}")
    cost = results.get("cost") or {}
    if cost.get("minutes") is not None:
        lines.append(f"- distillation: {cost['minutes']:.1f} min, {cost['steps']} iterations"
                     + (f" (stopped by {cost['stopped_by']})" if cost.get("stopped_by") else "")
                     + (f"; a chain {' → '.join(cost['chain'])}, this last stage {cost['own_minutes']:.1f} min"
                        if cost.get("chain") else ""))  # fmt: skip
    lines += ["", "## Quality", ""]
    lines += quality_table([*students, teacher], teacher.fid, cols)
    fl = results.get("floor")
    if fl:
        same = fl.get("teacher_fid_same_n")
        lines += ["", f"Held-out real data (`{fl['data']}`, {fl['n']} images) against the reference: FID "
                  f"{fl['fid']:.2f}, KID {fl['kid']:.3f}, precision {fl['precision']:.3f}, recall {fl['recall']:.3f} "
                  "— what a perfect model scores with that few samples"
                  + (f"; the teacher scores FID {same:.2f} on the same number of seeds" if same is not None else "")
                  + " (FID is biased upward at few samples, so only equal counts compare)."]  # fmt: skip
    lines += ["", "## Baselines: the teacher with training-free solvers", ""]
    lines += quality_table(baselines, teacher.fid, cols)
    if any(r.cached for r in [teacher, *baselines]):
        lines += ["", "ᶜ read from the cache of an identical earlier measurement (same teacher weights, seeds, "
                  "features and reference)."]  # fmt: skip
    t_sps = next((s["samples_per_s"] for s in results["speed"] if s["kind"] == "teacher"), None)
    lines += ["", "## Speed", ""] + speed_table(results["speed"], t_sps)
    lines += ["", "Latency: median of repeated batches after a warm-up; peak memory: growth of the process's "
              "peak resident set while sampling (CPU) or of allocated accelerator memory (GPU).", ""]  # fmt: skip
    lines += ["## Pictures", "", "![quality vs NFE](quality_vs_nfe.png)", ""]
    lines += ["Samples for the same noise and labels (seeds 0…), teacher first:", "", "![samples](samples.png)", ""]
    return "\n".join(lines)
