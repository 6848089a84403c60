"""``fewstep eval RUN_OR_MODEL``: quality, fidelity and speed against the teacher and the
training-free solvers; writes report.md with tables and pictures.

    fewstep eval runs/x                                  # report.md in the run directory
    fewstep eval builtin:digits --out reports/teacher    # a model alone: its solvers at each NFE
    fewstep eval runs/x --n 2000 --seeds 1               # a quick look (protocol: 10000 x 3)
"""

from __future__ import annotations

from fewstep.commands import Formatter, add_data_args
from fewstep.errors import FewstepError


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise FewstepError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise FewstepError(f"expected positive integers, got {text!r}")
    return values


def str_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_protocol_args(p, n_default: int = 10000, seeds_default: int = 3) -> None:
    """Options shared by eval, bench and demo (the measurement protocol)."""
    p.add_argument(
        "--n",
        type=int,
        default=n_default,
        help=f"samples per seed range (default {n_default}; a quick look: --n 2000 --seeds 1)",
    )
    p.add_argument("--seeds", type=int, default=seeds_default, help="repeats over disjoint seed ranges (mean ± std)")
    p.add_argument(
        "--features",
        default="auto",
        help="data (a classifier trained on the data folder's training split, cached), digits (the "
        "shipped 8x8 classifier), inception (local weights), raw (vectors), or auto (by data and shape)",
    )
    p.add_argument("--feature-weights", default=None, help="classifier folder or Inception weights file")
    add_data_args(p, "reference data (default: what the run, else the teacher, was trained on)")
    p.add_argument("--fidelity-n", type=int, default=1000, help="samples for teacher fidelity (default 1000)")
    p.add_argument("--baselines", type=str_list, default=("euler", "heun", "dpmpp_2m"), help="solvers to compare")
    p.add_argument("--baseline-nfe", type=int_list, default=(1, 2, 4, 8, 16, 35), help="NFE of the baselines")
    p.add_argument("--no-cache", action="store_true", help="recompute reference features and teacher rows")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="the teacher's classifier-free guidance scale (its reference and baselines; a guided "
                   "student is scored against the guided teacher)")  # fmt: skip
    p.add_argument(
        "--teacher-solver",
        default="heun",
        choices=("heun", "dpmpp_2m", "euler"),
        help="the teacher's reference solver (heun; dpmpp_2m: DPM-Solver++(2M), what SD users run)",
    )
    p.add_argument("--teacher-nfe", type=int, default=35, help="the reference's NFE (35; SD's DPM-Solver++: 25)")
    p.add_argument("--speed-batch", type=int, default=256, help="batch of the latency measurement (default 256)")
    p.add_argument("--speed-repeats", type=int, default=5, help="timed batches per sampler, after a warm-up (5)")


def settings_from(args):
    from fewstep.commands import data_spec
    from fewstep.eval.evaluate import EvalSettings

    return EvalSettings(n=args.n, repeats=args.seeds, features=args.features, feature_weights=args.feature_weights,
                        data=data_spec(args), fidelity_n=args.fidelity_n, baseline_solvers=args.baselines,
                        baseline_nfe=args.baseline_nfe, cache=not args.no_cache, guidance=args.guidance,
                        teacher_solver=args.teacher_solver, teacher_nfe=args.teacher_nfe,
                        speed_batch=args.speed_batch, speed_repeats=args.speed_repeats)  # fmt: skip


def run(args) -> int:
    from pathlib import Path

    from fewstep.eval.pipeline import evaluate, resolve
    from fewstep.solvers import get_solver

    settings = settings_from(args)
    settings.check()
    for s in settings.baseline_solvers:
        get_solver(s)
    subject = resolve(args.target, args.steps, args.weights)
    if subject.run_dir is None and args.out is None:
        raise FewstepError(f"{args.target} is a model, not a run directory; say where the report goes with --out DIR")
    out = Path(args.out) if args.out else subject.run_dir
    results = evaluate(subject, settings, out, progress=lambda m: print(m, flush=True))
    print(results["headline"])
    print(f"report: {out / 'report.md'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's student (or a model) against its teacher; writes report.md",
                       formatter_class=Formatter, description=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("target", metavar="RUN_OR_MODEL", help="a run directory, builtin:NAME, analytic:NAME or a model")
    p.add_argument("--out", default=None, help="report folder (default: the run directory)")
    p.add_argument("--steps", type=int_list, default=None,
                   help="student steps to measure (default: the method's own, of 1,2,4)")  # fmt: skip
    p.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="a run's student: its evaluation EMA (what the run saves) or the raw trained weights",
    )
    add_protocol_args(p)
    p.set_defaults(func=run)
