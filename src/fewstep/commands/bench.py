"""``fewstep bench``: distill several methods with one budget and rank them.

    fewstep bench --teacher builtin:digits --methods cd,ctm,sid --minutes 15 --out bench/digits
    fewstep bench --teacher builtin:digits --methods cd,kd --minutes 2 --n 2000 --seeds 1   # a quick look

Writes OUT/leaderboard.md, OUT/leaderboard.csv, OUT/quality_vs_nfe.png and one run directory
(with its report.md) per method under OUT/runs/.
"""

from __future__ import annotations

import shlex
import sys

from fewstep.commands.eval import add_protocol_args, settings_from, str_list
from fewstep.errors import FewstepError


def run(args) -> int:
    from fewstep.eval.bench import bench

    if args.minutes is None and args.max_steps is None:
        raise FewstepError("give every method the same budget: --minutes M (and/or --max-steps N)")
    if not args.methods:
        raise FewstepError("name the methods to compare: --methods a,b,c (`fewstep methods` lists them)")
    engine = {"seed": args.seed, "batch": args.batch, "sample_n": 0}
    line = "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows, path = bench(args.teacher, list(args.methods), args.out, settings_from(args), args.minutes, args.max_steps,
                       engine, line, progress=lambda m: print(m, flush=True))  # fmt: skip
    for i, r in enumerate(rows, 1):
        if "error" in r:
            print(f"{i}. {r['method']}: failed ({r['error']})")
        else:
            ratio = r.get("ratio@1")
            print(f"{i}. {r['method']}: FID ratio at 1 NFE {ratio:.2f}" if ratio is not None else f"{i}. {r['method']}")
    print(f"leaderboard: {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="distill several methods with one budget; leaderboard + plot")
    p.add_argument(
        "--teacher", default="builtin:digits", help="the teacher all methods distill (default builtin:digits)"
    )
    p.add_argument("--methods", type=str_list, required=True, help="comma-separated method names")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget per method")
    p.add_argument("--max-steps", type=int, default=None, help="iteration budget per method")
    p.add_argument("--out", default="bench", help="output folder (default ./bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="global batch per iteration (default 64)")
    add_protocol_args(p, n_default=10000, seeds_default=3)
    p.set_defaults(func=run)
