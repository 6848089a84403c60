"""Leaderboards: runs of several methods on one teacher, evaluated on one protocol, ranked.

:func:`collect` evaluates run folders (``fewstep distill``, or the runs ``fewstep bench`` trains:
its orchestration lives in :mod:`fewstep.commands.bench`) with :func:`fewstep.eval.pipeline.evaluate`
and :func:`write_leaderboard` writes ``leaderboard.md``, ``leaderboard.csv`` and the quality-vs-NFE
pictures. The teacher's reference and baseline rows are measured once (cached) and shared.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.eval.evaluate import EvalSettings, Row
from fewstep.eval.pipeline import evaluate as evaluate_subject
from fewstep.eval.pipeline import resolve
from fewstep.eval.report import SOLVER_NAMES, leaderboard_plot, machine
from fewstep.io import atomic_write_bytes, atomic_write_json


def leaderboard_rows(results: dict[str, dict | str]) -> list[dict]:
    """One row per method: FID and ratio at 1/2/4 NFE, precision/recall/fidelity at 1 NFE, speed,
    cost; failed methods keep their error. Sorted by the FID ratio at 1 NFE."""
    rows = []
    for name, res in results.items():
        if isinstance(res, str):
            rows.append({"method": name, "error": res})
            continue
        t_fid = res["teacher_row"]["fid"]
        what = _label(res, name)
        row: dict = {"method": name if what == name else f"{name} ({what})"}
        for r in res["students"]:
            k = r["nfe"]
            row[f"fid@{k}"], row[f"fid_std@{k}"] = r["fid"], r["fid_std"]
            row[f"ratio@{k}"] = r["fid"] / t_fid if t_fid else None
            if k == min(s["nfe"] for s in res["students"]):
                row.update(precision=r["precision"], recall=r["recall"], fidelity=r["fidelity"])
        sps = {(s["kind"], s["nfe"]): s["samples_per_s"] for s in res["speed"]}
        t_sps = sps.get(("teacher", res["teacher_row"]["nfe"]))
        s1 = min((k for kind, k in sps if kind == "student"), default=None)
        row["samples_per_s@1"] = sps.get(("student", s1))
        row["speedup"] = row["samples_per_s@1"] / t_sps if (t_sps and row["samples_per_s@1"]) else None
        row["minutes"], row["steps"] = res["cost"].get("minutes"), res["cost"].get("steps")
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("ratio@1") is None, r.get("ratio@1") or 0.0))


def _label(res: dict, name: str) -> str:
    """What a run is: its method, or a chain's methods in order (``kd→dmd2``: its own entry in the
    best-run-per-method picture, beside the plain methods)."""
    chain = (res.get("cost") or {}).get("chain")
    return "→".join(chain) if chain else (res.get("method") or name)


def _fmt(v, d: int = 2) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def render_leaderboard(rows: list[dict], results: dict, args_line: str) -> str:
    ok = next((r for r in results.values() if isinstance(r, dict)), None)
    lines = ["# fewstep bench — leaderboard", ""]
    if ok:
        t = ok["teacher_row"]
        p = ok["protocol"]
        lines += [f"- teacher: `{ok['teacher']}`, reference sampler {SOLVER_NAMES.get(t['name'], t['name'])} @ "
                  f"{t['nfe']} NFE: FID {t['fid']:.3f} ± {t['fid_std']:.3f}",
                  f"- protocol: {p['n']} samples × {p['repeats']} seed range(s), features `{p['features']}`, "
                  f"reference `{p['reference']}`; FID ratio = FID / teacher FID (same run)"]  # fmt: skip
    lines += [f"- machine: {machine()}", f"- command: `{args_line}`", ""]
    head = "| # | method | FID ratio @1 | @2 | @4 | FID @1 | precision @1 | recall @1 | fidelity @1 | " \
           "speed-up @1 | minutes | steps |"  # fmt: skip
    lines += [head, "|" + "---|" * 12]
    for i, r in enumerate(rows, 1):
        if "error" in r:
            lines.append(f"| {i} | {r['method']} | failed: {r['error']} |" + " |" * 9)
            continue
        fid1 = f"{_fmt(r.get('fid@1'))} ± {_fmt(r.get('fid_std@1'))}" if r.get("fid@1") is not None else "—"
        up = f"{r['speedup']:.1f}×" if r.get("speedup") else "—"
        cells = [str(i), r["method"], _fmt(r.get("ratio@1")), _fmt(r.get("ratio@2")), _fmt(r.get("ratio@4")), fid1,
                 _fmt(r.get("precision"), 3), _fmt(r.get("recall"), 3), _fmt(r.get("fidelity"), 4), up,
                 _fmt(r.get("minutes"), 1), str(r.get("steps", "—"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if ok:
        lines += ["", "Baselines (the teacher without distillation), FID ratio:", ""]
        base = [Row(**b) for b in ok["baselines"]]
        nfes = sorted({b.nfe for b in base})
        lines += ["| solver | " + " | ".join(f"{k} NFE" for k in nfes) + " |", "|" + "---|" * (len(nfes) + 1)]
        for solver in dict.fromkeys(b.name for b in base):
            by = {b.nfe: b.fid / ok["teacher_row"]["fid"] for b in base if b.name == solver}
            lines.append(f"| {SOLVER_NAMES.get(solver, solver)} | " + " | ".join(_fmt(by.get(k)) for k in nfes) + " |")
    lines += [
        "",
        "![quality vs NFE](quality_vs_nfe.png)",
        "",
        "Each method's own report: `report.md` in its run directory.",
        "",
    ]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = ["method"] + sorted({k for r in rows for k in r} - {"method"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def collect(run_dirs: list[str | Path], out: str | Path, settings: EvalSettings, args_line: str = "",
            progress=print) -> tuple[list[dict], Path]:  # fmt: skip
    """Rank runs trained elsewhere: each run's ``results.json`` (from ``fewstep eval``) is read, a
    run without one is evaluated first; all must share one teacher and protocol. Rows are named by
    the run folder (the same method may appear with different options).

    A folder written by ``fewstep bench`` (it holds ``leaderboard.md``) adds every row it ranked, so
    a leaderboard grows without its runs on disk: ``--runs docs/bench-digits,runs/new``. A run
    given after such a folder replaces the folder's row of the same name (a re-run method)."""
    results: dict[str, dict | str] = {}
    given: set[str] = set()  # names of the run folders given (a leaderboard's row may be replaced by one)
    for d in map(Path, run_dirs):
        if (d / "leaderboard.md").is_file() and (d / "results.json").is_file():
            for name, res in json.loads((d / "results.json").read_text()).items():
                if name in results:
                    raise FewstepError(f"two runs are named {name!r} (one in {d}); give runs with distinct names")
                results[name] = res
            continue
        if d.name in given:
            raise FewstepError(f"two runs are named {d.name!r}; give runs with distinct folder names")
        given.add(d.name)
        path = d / "results.json"
        if path.is_file():
            res = json.loads(path.read_text())
        else:
            progress(f"== {d.name}: evaluating")
            res = evaluate_subject(resolve(d), settings, d, progress=progress)
        if res.get("students") is None or not res["students"]:
            raise FewstepError(f"{d} was evaluated as a model, not a run; give run directories (fewstep distill)")
        results.pop(d.name, None)  # a re-run replaces a leaderboard's row and takes its own place
        results[d.name] = res
    first_name = next((n for n, r in results.items() if isinstance(r, dict)), None)
    if first_name is None:
        raise FewstepError("give at least one run directory (or a leaderboard holding a finished run) to collect")

    def key(res: dict) -> tuple:
        p = res["protocol"]
        return res["teacher"], p["n"], p["repeats"], p["features"], p["reference"], p.get("fidelity_n")

    first = results[first_name]
    for name, res in results.items():
        if isinstance(res, dict) and key(res) != key(first):
            raise FewstepError(
                f"run {name} was evaluated with another teacher or protocol than {first_name}; "
                "re-evaluate them alike (fewstep eval RUN with the same --n/--seeds/--features)"
            )
    return write_leaderboard(results, out, args_line)


def write_leaderboard(results: dict[str, dict | str], out: str | Path, args_line: str) -> tuple[list[dict], Path]:
    """``results.json``, ``leaderboard.csv``, ``quality_vs_nfe.png`` and ``leaderboard.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(results)
    atomic_write_json(out / "results.json", results)
    write_csv(rows, out / "leaderboard.csv")
    ok = [r for r in results.values() if isinstance(r, dict)]
    if ok:
        from fewstep.methods import available

        baselines: dict[str, list[Row]] = {}
        for b in ok[0]["baselines"]:
            baselines.setdefault(b["name"], []).append(Row(**b))
        families = {name: cls.family for name, cls in available().items()}
        runs = {name: (_label(res, name), families.get(res.get("method") or name, "other"),
                       [Row(**{**r, "name": name}) for r in res["students"]])
                for name, res in results.items() if isinstance(res, dict)}  # fmt: skip
        teacher = Row(**ok[0]["teacher_row"])
        leaderboard_plot(runs, baselines, teacher, out / "quality_vs_nfe.png", title="fewstep bench")
        leaderboard_plot(runs, baselines, teacher, out / "quality_vs_nfe_all.png", best_only=False,
                         title="fewstep bench")  # fmt: skip
    path = out / "leaderboard.md"
    atomic_write_bytes(path, render_leaderboard(rows, results, args_line).encode())
    return rows, path
