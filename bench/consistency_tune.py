"""Tuning runs for CD / LCM / CTM on digits (not a test; run under the heavy lock).

Distils with a wall-clock budget (or loads a finished run with ``--run``), then measures FID
(classifier features) of the student at each step count and each sampling variant — the
intermediate noise levels of 2-step sampling, CTM's gamma — against the teacher with Heun at
35 NFE on the same seeds, and appends one JSON line per run to ``--log``. Sampling variants cost no
training, so one distillation scores several. Example::

    flock /tmp/fewstep-heavy.lock .venv/bin/python bench/consistency_tune.py --method cd \\
        --minutes 3 --set lr=1e-4 --set target_decay=0.95 --mids 0.8,2.5 --n 2000
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tune_common import teacher_row, tune_parser

from fewstep.eval.evaluate import EvalSettings, Evaluator
from fewstep.eval.sampling import student_sampler
from fewstep.runs import load_run
from fewstep.teachers import load_teacher
from fewstep.train import distill
from fewstep.train.config import parse_sets


def main() -> None:
    ap = tune_parser("bench/consistency_tune.jsonl", method="cd", threads=2)
    ap.add_argument("--run", default=None, help="evaluate this finished run instead of training")
    ap.add_argument("--mids", default="", help="comma list of intermediate sigmas to try for 2-step sampling")
    ap.add_argument("--gammas", default="", help="CTM: comma list of gamma values to try for multistep sampling")
    ap.add_argument("--fidelity", action="store_true", help="also RMSE to the teacher's ODE answers (slow)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    options = parse_sets(a.set)
    t0 = time.time()
    if a.run:
        method, out = load_run(a.run), Path(a.run)
        method.summary = {"step": method.run["step"]}
        teacher = method.teacher
    else:
        teacher = load_teacher(a.teacher)
        out = Path(a.out or f"/tmp/tune-{a.method}-{int(time.time())}")
        method = distill(
            a.teacher, a.method, max_steps=a.max_steps, out=out, data=a.data, minutes=a.minutes, batch=a.batch,
            ema_decay=a.ema_decay, sample_n=0, checkpoint_every=10**9, log_every=100, options=options,
        )  # fmt: skip
    minutes = (time.time() - t0) / 60
    ev = Evaluator(teacher, EvalSettings(n=a.n, repeats=a.repeats, fidelity_n=min(500, a.n)))
    t_row = teacher_row(ev, teacher, "trajectory-tune", a.fidelity)
    rows = {"teacher_heun35": {"fid": t_row.fid, "fidelity": t_row.fidelity}}

    variants: list[tuple[int, dict]] = []
    for k in [int(s) for s in a.steps.split(",")]:
        variants.append((k, {}))
        if k == 2:
            variants += [(2, {"sample_sigmas": (float(m),)}) for m in a.mids.split(",") if m]
        if k > 1:
            variants += [(k, {"gamma": float(g)}) for g in a.gammas.split(",") if g]
    default = {key: getattr(method.config, key) for _, v in variants for key in v}
    for k, change in variants:
        for key, value in {**default, **change}.items():
            setattr(method.config, key, value)
        r = ev.measure(student_sampler(method, k), fidelity=a.fidelity)
        name = f"student_{k}" + "".join(f"_{key}={v}" for key, v in change.items())
        rows[name] = {"fid": r.fid, "ratio": r.fid / t_row.fid, "fidelity": r.fidelity, "precision": r.precision,
                      "recall": r.recall}  # fmt: skip
        print(name, rows[name], flush=True)
    record = {"method": a.method, "options": options, "minutes": round(minutes, 2), "steps": method.summary["step"],
              "batch": a.batch, "ema_decay": a.ema_decay, "n": a.n, "rows": rows, "out": str(out)}  # fmt: skip
    print(json.dumps(record))
    with open(a.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
