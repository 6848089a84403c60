"""Quality against training time: the FID ratio at 1 NFE of a run's minute-mark checkpoints.

A single number at the end of a budget says which method is ahead *then*; the papers' claims (e.g.
distribution matching overtaking regression) are about where the curves go. A run trained with
``--snapshot-minutes 1,2,4,...`` keeps a checkpoint at each mark (:mod:`fewstep.train.checkpoint`);
:func:`curve` scores each of them and the run's final checkpoint, with the evaluation EMA and the raw
weights, under one protocol, and :func:`plot_curves` draws several runs on one time axis. A chain
(``--init``) starts its curve at the minutes its earlier runs took.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewstep.errors import FewstepError


@dataclass
class Point:
    minutes: float  # wall-clock training minutes, the chain's earlier runs included
    step: int
    weights: str  # "ema" or "raw"
    fid: float
    ratio: float  # FID / the teacher's FID (its reference sampler, same protocol)


def checkpoints_of(run_dir: Path) -> list[tuple[float, str]]:
    """(own minutes, checkpoint name) for a run's minute marks and its final checkpoint."""
    from fewstep.runs import checkpoints as runck
    from fewstep.runs.folder import run_cost

    marks = [(float(c.meta["elapsed_minutes"]), c.path.name) for c in runck.snapshots(run_dir / "checkpoints")]
    final = runck.latest(run_dir / "checkpoints")
    if final is None:
        raise FewstepError(f"run {run_dir} {runck.unusable(run_dir / 'checkpoints', 'train it first')}")
    cost = run_cost(run_dir)
    own = cost.get("own_minutes", cost.get("minutes"))
    if final.path.name not in {name for _, name in marks}:
        marks.append((float(own) if own is not None else float("nan"), final.path.name))
    return marks


def curve(run_dir: str | Path, settings, weights: tuple[str, ...] = ("ema", "raw"), progress=print) -> dict:
    """Score every minute mark of ``run_dir`` at 1 NFE; returns ``{"run", "label", "points", ...}``."""
    from fewstep.eval.evaluate import Evaluator
    from fewstep.eval.sampling import student_sampler
    from fewstep.runs import load_run, run_data

    run_dir = Path(run_dir)
    first = load_run(run_dir)
    config = first.run.config
    init = config.get("init") or {}
    offset = float(init.get("minutes") or 0.0)
    label = "→".join([*init.get("chain", []), first.name]) if init else first.name
    ev = Evaluator(first.teacher, settings, run_data(run_dir, config), progress)
    s = settings
    (teacher,) = ev.teacher_rows(((s.teacher_solver, s.teacher_nfe),), progress)
    points = []
    for own, name in checkpoints_of(run_dir):
        for w in weights:
            method = load_run(run_dir, ema=w == "ema", checkpoint=name)
            row = ev.measure(student_sampler(method, 1, method.name), fidelity=False)
            points.append(Point(round(offset + own, 3), method.run.step, w, row.fid, row.fid / teacher.fid))
            progress(f"{run_dir.name} {name} ({offset + own:.1f} min, {w}): FID {row.fid:.3f}, "
                     f"ratio {row.fid / teacher.fid:.2f}")  # fmt: skip
    return {"run": str(run_dir), "name": run_dir.name, "label": label, "teacher_fid": teacher.fid,
            "chain_start": offset, "points": [p.__dict__ for p in points]}  # fmt: skip


def plot_curves(curves: list[dict], path: str | Path, title: str = "FID ratio at 1 NFE against training time") -> Path:
    """One line per run and weights (EMA solid, raw dashed); a chain's line starts at its first
    stage's minutes, joined to that stage's end by a dotted segment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        for w, style in (("ema", "-"), ("raw", "--")):
            pts = sorted((p["minutes"], p["ratio"]) for p in c["points"] if p["weights"] == w)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, marker="o" if w == "ema" else "x", color=colors(i % 10),
                    label=f"{c['name']} ({c['label']}, {w})")  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8, ls=":", label="teacher (Heun, 35 NFE)")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (a chain: its earlier stages included)")
    ax.set_ylabel("FID / teacher FID, 1 NFE")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_curves(curves: list[dict]) -> str:
    """A markdown table: minutes and FID ratio (EMA / raw) per run."""
    lines = ["| run | chain | minutes | step | ratio (EMA) | ratio (raw) |", "|---|---|---|---|---|---|"]
    for c in curves:
        by_step: dict[int, dict] = {}
        for p in c["points"]:
            by_step.setdefault(p["step"], {"minutes": p["minutes"]})[p["weights"]] = p["ratio"]
        for step, d in sorted(by_step.items()):
            ema, raw = (("—" if d.get(w) is None else f"{d[w]:.2f}") for w in ("ema", "raw"))
            lines.append(f"| {c['name']} | {c['label']} | {d['minutes']:.1f} | {step} | {ema} | {raw} |")
    return "\n".join(lines) + "\n"
