"""``fewstep bench``: distill several methods with one budget and rank them.

    fewstep bench --teacher builtin:digits --methods cd,ctm,sid --minutes 15 --out bench/digits
    fewstep bench --teacher builtin:digits --methods cd,kd --minutes 2 --n 2000 --seeds 1   # a quick look
    fewstep bench --methods sid,cd --minutes 12 --set sid.lr=1e-4 --set sid.batch=32    # per-method options
    fewstep bench --runs runs/a,runs/b --out bench/mine   # rank runs trained with `fewstep distill`
    fewstep bench --runs bench/mine,runs/c --out bench/mine   # add a run to a leaderboard
    fewstep bench --curves runs/a,runs/b --n 2000 --seeds 1 --out bench/curves   # quality vs minutes

Writes OUT/leaderboard.md, OUT/leaderboard.csv, OUT/quality_vs_nfe.png and one run directory
(with its report.md) per method under OUT/runs/.
With --curves: the FID ratio at 1 NFE of each run's minute-mark checkpoints (runs trained with
`fewstep distill --snapshot-minutes 1,2,4,...`) and final checkpoint, evaluation EMA and raw weights:
OUT/curves.png, OUT/curves.md, OUT/curves.json.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fewstep.commands import Formatter
from fewstep.commands.eval import add_protocol_args, settings_from, str_list
from fewstep.errors import FewstepError

if TYPE_CHECKING:
    from fewstep.eval.evaluate import EvalSettings


def per_method(pairs: list[str], methods: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--set METHOD.KEY=VALUE`` items -> ``{method: {key: value}}`` (values typed by the method)."""
    out: dict[str, dict[str, str]] = {}
    for item in pairs:
        name, eq, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not eq or not dot or not key:
            raise FewstepError(f"--set {item!r}: write METHOD.KEY=VALUE, e.g. --set sid.lr=1e-4")
        out.setdefault(method.strip(), {})[key.strip()] = value.strip()
    return out


def run(args) -> int:
    from fewstep.eval.bench import collect

    line = "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.curves:
        return curves(args, line)
    if args.runs:
        if args.methods or args.sets or args.minutes is not None or args.max_steps is not None:
            raise FewstepError("--runs ranks finished runs; drop --methods/--set/--minutes/--max-steps")
        rows, path = collect(list(args.runs), args.out, settings_from(args), line,
                             progress=lambda m: print(m, flush=True))  # fmt: skip
    else:
        if args.minutes is None and args.max_steps is None:
            raise FewstepError("give every method the same budget: --minutes M (and/or --max-steps N)")
        if not args.methods:
            raise FewstepError("name the methods to compare: --methods a,b,c (`fewstep methods` lists them)")
        engine = {"seed": args.seed, "batch": args.batch, "sample_n": 0}
        rows, path = bench(args.teacher, list(args.methods), args.out, settings_from(args), args.minutes,
                           args.max_steps, engine, line, progress=lambda m: print(m, flush=True),
                           options=per_method(args.sets, args.methods))  # fmt: skip
    for i, r in enumerate(rows, 1):
        if "error" in r:
            print(f"{i}. {r['method']}: failed ({r['error']})")
        else:
            ratio = r.get("ratio@1")
            print(f"{i}. {r['method']}: FID ratio at 1 NFE {ratio:.2f}" if ratio is not None else f"{i}. {r['method']}")
    print(f"leaderboard: {path}")
    return 0


def distill_and_evaluate(
    teacher: str,
    method: str,
    run_dir: Path,
    settings: EvalSettings,
    minutes: float | None,
    max_steps: int | None,
    engine: dict,
    progress=print,
    options: dict | None = None,
) -> dict:
    """Distill one method into ``run_dir`` (engine settings and ``options``: the method's own or
    per-method engine overrides such as ``batch``) and evaluate it; returns its results."""
    from fewstep.train import distill

    progress(f"== {method}: distilling ({minutes} min)" if minutes else f"== {method}: distilling ({max_steps} steps)")
    kwargs = {**engine, **(options or {})}
    distill(teacher, method, max_steps=max_steps, out=run_dir, minutes=minutes, overwrite=True, **kwargs)
    progress(f"== {method}: evaluating")
    from fewstep.eval.pipeline import evaluate, resolve

    return evaluate(resolve(run_dir), settings, run_dir, progress=progress)


def bench(
    teacher: str,
    methods: list[str],
    out: str | Path,
    settings: EvalSettings,
    minutes: float | None,
    max_steps: int | None = None,
    engine: dict | None = None,
    args_line: str = "",
    progress=print,
    options: dict[str, dict] | None = None,
) -> tuple[list[dict], Path]:
    """Run the bench (``options``: per-method option dicts); write ``leaderboard.md``,
    ``leaderboard.csv`` and ``quality_vs_nfe.png``."""
    import traceback

    from fewstep.eval.bench import write_leaderboard
    from fewstep.io import atomic_write_bytes
    from fewstep.methods import get_method

    settings.check()
    for m in methods:
        get_method(m)  # unknown names fail before any training
    for m in options or {}:
        if m not in methods:
            raise FewstepError(f"options given for {m!r}, which is not in --methods; add it or drop its --set")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict | str] = {}
    for m in methods:
        try:
            results[m] = distill_and_evaluate(teacher, m, out / "runs" / m, settings, minutes, max_steps,
                                              engine or {}, progress, (options or {}).get(m))  # fmt: skip
        except FewstepError as e:
            results[m] = str(e)
        except Exception as e:  # a broken method must not sink the others; the trace goes to the log
            (out / "runs").mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "runs" / f"{m}.error.txt", traceback.format_exc().encode())
            results[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        if isinstance(results[m], str):
            progress(f"== {m}: failed: {results[m]}")
    return write_leaderboard(results, out, args_line)


def curves(args, line: str) -> int:
    from fewstep.eval.curves import curve, plot_curves, render_curves
    from fewstep.io import atomic_write_bytes, atomic_write_json

    if args.runs or args.methods or args.minutes is not None or args.max_steps is not None:
        raise FewstepError("--curves scores finished runs; drop --runs/--methods/--minutes/--max-steps")
    settings, out = settings_from(args), Path(args.out)
    found = [curve(r, settings, progress=lambda m: print(m, flush=True)) for r in args.curves]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "curves.json", {"command": line, "n": settings.n, "seeds": settings.repeats,
                                            "curves": found})  # fmt: skip
    text = f"# FID ratio at 1 NFE against training minutes\n\n`{line}`\n\n" + render_curves(found)
    atomic_write_bytes(out / "curves.md", text.encode())
    print(f"curves: {plot_curves(found, out / 'curves.png')}, {out / 'curves.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="distill several methods with one budget; leaderboard + plot",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=Formatter)  # fmt: skip
    p.add_argument(
        "--teacher", default="builtin:digits", help="the teacher all methods distill (default builtin:digits)"
    )
    p.add_argument("--methods", type=str_list, default=(), help="comma-separated method names")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="an option of one method (its Config) or its engine setting, e.g. sid.lr=1e-4 (repeatable)",
    )
    p.add_argument(
        "--runs",
        type=str_list,
        default=(),
        help="comma-separated run directories (or earlier bench folders: all their rows) to rank instead of training",
    )
    p.add_argument(
        "--curves",
        type=str_list,
        default=(),
        help="comma-separated runs kept with --snapshot-minutes: FID ratio against training minutes",
    )
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget per method")
    p.add_argument("--max-steps", type=int, default=None, help="iteration budget per method")
    p.add_argument("--out", default="bench", help="output folder (default ./bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="global batch per iteration (default 64)")
    add_protocol_args(p, n_default=10000, seeds_default=3)
    p.set_defaults(func=run)
