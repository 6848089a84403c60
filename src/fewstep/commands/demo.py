"""``fewstep demo``: the whole product in about ten minutes on 2 CPU cores.

Distills the shipped digits teacher (``builtin:digits``) with the best method available, evaluates
the student at 1/2/4 steps against the teacher (Heun, 35 NFE) and the training-free solvers, and
prints the headline (FID ratio at 1 NFE, speed-up) and the path of the report.

The budget: ``--minutes`` of distillation (default 6), then a quick evaluation — 2,000 samples,
one seed range, baselines at 1/2/4/8 NFE, fidelity on 200 seeds (the benchmark protocol uses
10,000 × 3 and NFE up to 35; ``fewstep eval RUN`` re-measures with it).
The teacher's baseline rows are cached, so a second demo spends its time on the student only.

``--tier 2`` runs the same path on the shipped latent text-to-image teacher ``builtin:mnist-sd``
(a stock diffusers StableDiffusionPipeline: VAE, CLIP text encoder, UNet with cross-attention):
an LCM student (the full UNet with LCM's guidance input, the tier-2 benchmark's ``lcm`` row: the best
1- and 2-step method measured there) distilled from the teacher guided at ``TIER2["guidance"]``, scored
against that guided teacher with DPM-Solver++(2M) at 25 NFE (what SD users run) as the reference,
the VAE-decoded samples in the shipped MNIST classifier's features, label accuracy against the prompt;
1,000 samples and fidelity on 100 seeds unless ``--n``/``--fidelity-n`` say otherwise (the guided
25-step teacher costs 50 UNet calls per sample), so that a first run, teacher rows included, fits in
15 minutes.
"""

from __future__ import annotations

import time
from pathlib import Path

from fewstep.commands.eval import add_protocol_args
from fewstep.errors import FewstepError

# Best first; the first one that is registered runs. Evidence (builtin:digits, the full protocol:
# 10,000 samples x 3 seeds, 12-minute budget, default options, 2 CPU cores, 2026-11-29): cd FID
# ratio 1.29 at 1 NFE (1.18 at 2 NFE), kd 1.56, tract 1.88, progressive 2.62, sid 3.91 ("Methods
# on digits" in docs/benchmarks.md ranks them all). "denoise" (not a distillation) keeps the demo
# alive on a bare install.
PREFERENCE = ("cd", "kd", "tract", "progressive", "sid", "ctm", "dmd2", "denoise")
# tier 2 (docs/benchmarks.md, "Tier 2"): the guided setting's scale and the lcm row of bench/tier2_methods.sh
TIER2 = {
    "teacher": "builtin:mnist-sd", "method": "lcm", "data": "mnist", "guidance": 1.25, "batch": 32,
    "options": {"lr": 1e-4}, "n": 1000, "fidelity_n": 100,
}  # fmt: skip


def pick_method(name: str | None) -> str:
    from fewstep.methods import available, get_method

    if name:
        return get_method(name).name
    methods = available()
    for m in PREFERENCE:
        if m in methods:
            return m
    raise FewstepError("no distillation method is installed; `fewstep methods` lists what is available")


def run(args) -> int:
    from fewstep.commands.eval import settings_from
    from fewstep.eval.pipeline import evaluate, resolve
    from fewstep.train import distill

    tier2 = args.tier == 2
    method = TIER2["method"] if tier2 and not args.method else pick_method(args.method)
    teacher = TIER2["teacher"] if tier2 and args.teacher is None else (args.teacher or "builtin:digits")
    out = Path(args.out or f"runs/demo{'-t2' if tier2 else ''}-{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    defaults = TIER2 if tier2 else {"n": 2000, "fidelity_n": 200}
    args.n = args.n if args.n is not None else defaults["n"]
    args.fidelity_n = args.fidelity_n if args.fidelity_n is not None else defaults["fidelity_n"]
    settings = settings_from(args)
    settings.speed_repeats = 3
    kw: dict = {}
    if tier2:
        w = TIER2["guidance"]
        settings.guidance, settings.teacher_solver, settings.teacher_nfe = w, "dpmpp_2m", 25
        settings.baseline_solvers, settings.baseline_nfe = ("euler", "dpmpp_2m"), (1, 2, 4)
        options = {**TIER2["options"], "guidance": (w, w), "sample_guidance": w}
        kw = {"data": TIER2["data"], "batch": TIER2["batch"], "options": options}
    settings.check()
    t0 = time.time()
    print(f"fewstep demo: distilling {teacher} with {method} for {args.minutes} min into {out}", flush=True)
    distill(teacher, method, max_steps=None, out=out, minutes=args.minutes, seed=args.seed, sample_n=0, **kw)
    print(f"evaluating {n_text(settings)} against the teacher and fast samplers", flush=True)
    results = evaluate(resolve(out), settings, out, progress=lambda m: print(f"  {m}", flush=True))
    print()
    print(results["headline"])
    print(f"total {((time.time() - t0) / 60):.1f} min; report: {out / 'report.md'}")
    return 0


def n_text(s) -> str:
    return f"{s.n} samples × {s.repeats} seed range(s)"


def register(sub) -> None:
    p = sub.add_parser("demo", help="distill the shipped digits teacher and report (about 10 minutes on 2 CPUs)")
    p.add_argument("--method", default=None, help=f"method to run (default: the first available of {PREFERENCE})")
    p.add_argument("--teacher", default=None, help="default: builtin:digits (tier 2: builtin:mnist-sd)")
    p.add_argument(
        "--tier",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: the latent text-to-image teacher builtin:mnist-sd, guided, with an LCM student "
        "(1,000 samples, fidelity on 100 seeds unless --n/--fidelity-n are given)",
    )
    p.add_argument("--minutes", type=float, default=6.0, help="distillation budget (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default runs/demo-METHOD-TIMESTAMP)")
    add_protocol_args(p, n_default=2000, seeds_default=1)
    # the teacher row is Heun at 35 NFE (tier 2: DPM-Solver++ at 25); n and fidelity_n depend on the tier
    p.set_defaults(func=run, n=None, fidelity_n=None, baseline_nfe=(1, 2, 4, 8))
