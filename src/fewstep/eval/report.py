"""The pictures and the Markdown of an evaluation: quality-vs-NFE plot, sample grids, report.md."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from fewstep.eval.evaluate import Row

SOLVER_NAMES = {"euler": "Euler (=DDIM)", "heun": "Heun", "dpmpp_2m": "DPM-Solver++(2M)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from fewstep.viz import _atomic_save

    _atomic_save(path, lambda t: fig.savefig(t, format="png"))
    _plt().close(fig)
    return path


def quality_plot(
    series: dict[str, list[Row]],
    path: str | Path,
    teacher: Row | None = None,
    floor: float | None = None,
    metric: str = "fid",
    title: str = "",
) -> Path:
    """FID (log scale) against NFE (log scale) for each series (baselines dashed, students solid),
    the teacher's reference point as a horizontal line and the held-out floor dotted."""
    plt = _plt()
    many = len(series) > 8  # a bench of many methods: distinct colours and markers, legend outside
    fig, ax = plt.subplots(figsize=(8.5, 5) if many else (6, 4.2), dpi=110)
    colours = plt.get_cmap("tab20").colors
    markers = "os^vDP*Xhp<>"
    k = 0
    for name, rows in series.items():
        rows = sorted((r for r in rows if getattr(r, metric) is not None), key=lambda r: r.nfe)
        if not rows:
            continue
        nfe, val = [r.nfe for r in rows], [max(getattr(r, metric), 1e-6) for r in rows]
        err = [r.fid_std or 0.0 for r in rows] if metric == "fid" else None
        student = rows[0].kind == "student"
        style = {"color": colours[k % len(colours)], "marker": markers[k % len(markers)]} if many and student else {}
        k += student
        ax.errorbar(nfe, val, yerr=err, **{"marker": "o" if student else ".", **style}, ms=7 if student else 5,
                    ls="-" if student else "--", lw=2 if student else 1, capsize=2,
                    label=SOLVER_NAMES.get(name, name) + ("" if student else " (teacher)"))  # fmt: skip
    if teacher is not None and getattr(teacher, metric) is not None:
        ax.axhline(getattr(teacher, metric), color="k", lw=1, label=f"teacher {teacher.name} @ {teacher.nfe} NFE")
    if floor is not None and metric == "fid":
        ax.axhline(floor, color="0.5", lw=1, ls=":", label="held-out data (floor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(metric.upper())
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


FAMILY_COLOURS = {"output": "Blues", "trajectory": "Greens", "adversarial": "Reds"}
MARKERS = "os^vDP*Xhp<>d"


def leaderboard_plot(
    runs: dict[str, tuple[str, str, list[Row]]],
    baselines: dict[str, list[Row]],
    teacher: Row,
    path: str | Path,
    best_only: bool = True,
    title: str = "",
) -> Path:
    """The leaderboard's picture: FID against NFE (log-log) of each run ``name -> (method, family,
    rows)``, one colour family per distillation family and a marker per method, each line labelled
    at its end; with ``best_only`` only each method's best run (lowest FID at its fewest steps).
    The teacher is a black line, the best training-free sampler (lowest FID at the largest NFE
    its curve shares with the runs) a dashed grey curve."""
    plt = _plt()
    if best_only:
        best: dict[str, tuple[str, tuple[str, str, list[Row]]]] = {}
        for name, run in runs.items():
            first = min(run[2], key=lambda r: r.nfe)
            if run[0] not in best or first.fid < min(best[run[0]][1][2], key=lambda r: r.nfe).fid:
                best[run[0]] = (name, run)
        runs = dict(best.values())
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    by_family: dict[str, list[str]] = {}
    for name, (_, family, _) in runs.items():
        by_family.setdefault(family, []).append(name)
    methods = sorted({m for m, _, _ in runs.values()})
    for family, names in by_family.items():
        cmap = plt.get_cmap(FAMILY_COLOURS.get(family, "Greys"))
        for i, name in enumerate(sorted(names)):
            method, _, rows = runs[name]
            rows = sorted((r for r in rows if r.fid is not None), key=lambda r: r.nfe)
            colour = cmap(0.45 + 0.5 * i / max(len(names) - 1, 1))
            nfe, fid = [r.nfe for r in rows], [max(r.fid, 1e-6) for r in rows]
            ax.plot(nfe, fid, marker=MARKERS[methods.index(method) % len(MARKERS)], color=colour, lw=2, ms=7,
                    label=f"{name} ({family})")  # fmt: skip
            ax.annotate(name, (nfe[-1], fid[-1]), xytext=(6, 0), textcoords="offset points", fontsize=7,
                        color=colour, va="center")  # fmt: skip
    if baselines:
        top = max(r.nfe for rows in baselines.values() for r in rows)
        at_top = {
            n: min((r for r in rows if r.nfe == top), key=lambda r: r.fid, default=None)
            for n, rows in baselines.items()
        }
        best_name = min((n for n in at_top if at_top[n] is not None), key=lambda n: at_top[n].fid)
        rows = sorted(baselines[best_name], key=lambda r: r.nfe)
        ax.plot([r.nfe for r in rows], [r.fid for r in rows], ls="--", color="0.55", lw=1.5, marker=".",
                label=f"best training-free: {SOLVER_NAMES.get(best_name, best_name)} (teacher)")  # fmt: skip
    ax.axhline(teacher.fid, color="k", lw=1, label=f"teacher {SOLVER_NAMES.get(teacher.name, teacher.name)} @ "
               f"{teacher.nfe} NFE")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID")
    ax.set_title(title + (" — best run per method" if best_only else " — every run"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, Path(path))


def sample_figure(rows: Sequence[tuple[str, Tensor]], path: str | Path, reference: Tensor | None = None) -> Path:
    """Samplers side by side for the same noise: one row of an image grid per sampler, or one 2-D
    scatter panel per sampler (over the reference data in grey)."""
    from fewstep.viz import image_grid

    plt = _plt()
    images = rows[0][1].ndim == 4
    if images:
        fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.9 * len(rows) + 0.3), dpi=110, squeeze=False)
        for ax, (label, x) in zip(axes[:, 0], rows, strict=True):
            grid = image_grid(x, nrow=x.shape[0], scale=1)
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    else:
        fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 3.2), dpi=100, squeeze=False)
        for ax, (label, x) in zip(axes[0], rows, strict=True):
            if reference is not None:
                ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.8")
            ax.scatter(x[:, 0].cpu(), x[:, 1].cpu(), s=1, c="C0")
            ax.set_title(label, fontsize=9)
            ax.set_aspect("equal")
    fig.tight_layout()
    return _save(fig, Path(path))


# --- Markdown -------------------------------------------------------------------------------------
def _f(v, digits: int = 2, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.{digits}f}" if abs(v) >= 10 ** (-digits) or v == 0 else f"{v:.2e}"


def _pm(mean, std, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{_f(mean, digits)} ± {_f(std, digits)}" if std else _f(mean, digits)


def quality_table(rows: Sequence[Row], teacher_fid: float | None, columns: Sequence[str]) -> list[str]:
    """Markdown rows of the quality table; ``columns`` picks optional columns that have values."""
    head = ["sampler", "NFE", "FID", "FID ratio", "KID", "precision", "recall"]
    extra = {"fidelity": "fidelity RMSE", "label_acc": "label acc.", "swd": "SW₁", "loglik": "log-lik.",
             "modes": "modes", "mass_tv": "mode-mass TV"}  # fmt: skip
    head += [extra[c] for c in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r.fid / teacher_fid if (r.fid is not None and teacher_fid) else None
        name = (SOLVER_NAMES.get(r.name, r.name) + (" (teacher)" if r.kind == "teacher" else "")) + (
            " ᶜ" if r.cached else ""
        )
        cells = [name, str(r.nfe), _pm(r.fid, r.fid_std), _f(ratio),
                 _pm(r.kid, r.kid_std, 3),
                 _f(r.precision, 3), _f(r.recall, 3)]  # fmt: skip
        for c in columns:
            if c == "fidelity":
                cells.append(_f(r.fidelity, 4))
            elif c == "label_acc":
                cells.append(_f(r.label_acc, pct=True))
            elif c == "swd":
                cells.append(_f(r.swd, 4))
            elif c == "loglik":
                cells.append(_f(r.extra.get("loglik"), 3))
            elif c == "modes":
                cells.append(f"{r.extra.get('modes_covered', 0):.1f}/{r.extra.get('modes', 0)}")
            elif c == "mass_tv":
                cells.append(_f(r.extra.get("mass_tv"), 3))
        out.append("| " + " | ".join(cells) + " |")
    return out


def optional_columns(rows: Sequence[Row]) -> list[str]:
    cols = []
    for c in ("fidelity", "label_acc", "swd"):
        if any(getattr(r, c) is not None for r in rows):
            cols.append(c)
    if any(r.extra for r in rows):
        cols += ["loglik", "modes", "mass_tv"]
    return cols


def speed_table(speeds: Sequence[dict], teacher_sps: float | None) -> list[str]:
    out = ["| sampler | NFE | batch | latency / batch | samples/s | speed-up vs teacher | peak memory |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in speeds:
        name = SOLVER_NAMES.get(s["name"], s["name"]) + (" (teacher)" if s["kind"] == "teacher" else "")
        up = f"{s['samples_per_s'] / teacher_sps:.1f}×" if teacher_sps else "—"
        mem = "—" if s["peak_mem_mb"] is None else f"{s['peak_mem_mb']:.0f} MB"
        out.append(f"| {name} | {s['nfe']} | {s['batch']} | {1e3 * s['latency_s']:.1f} ms | "
                   f"{s['samples_per_s']:.0f} | {up} | {mem} |")  # fmt: skip
    return out


def machine() -> str:
    import os

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip
