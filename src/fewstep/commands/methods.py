"""``fewstep methods``: list the distillation methods with family, paper and data needs."""

from __future__ import annotations


def run(args) -> int:
    from fewstep.methods import available, describe

    rows = [describe(cls) for cls in available().values()]
    if not rows:
        print("no methods registered")
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"{'method':<{w}}  {'family':<11}  {'paper':<11}  data")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['family']:<11}  {r['paper']:<11}  {r['data']}  {r['title']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the distillation methods")
    p.set_defaults(func=run)
