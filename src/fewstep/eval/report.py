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
