"""Tuning runs for the PD / TRACT / guided methods on digits (not a test; run under the heavy lock).

Distils with a wall-clock budget, then measures FID (classifier features) of the student at 1/2/4
steps against the teacher with Heun at 35 NFE on the same seeds, and appends one JSON line per run
to ``--log``. Example::

    flock /tmp/fewstep-heavy.lock .venv/bin/python bench/trajectory_tune.py --method tract \\
        --minutes 3 --set phases=40,1 --set lr=2e-4 --n 2000
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tune_common import teacher_row, tune_parser

from fewstep.eval.evaluate import EvalSettings, Evaluator
from fewstep.eval.sampling import student_sampler
from fewstep.teachers import load_teacher
from fewstep.train import distill
from fewstep.train.config import parse_sets


def main() -> None:
    ap = tune_parser("bench/trajectory_tune.jsonl", threads=2)
    ap.add_argument("--guidance", type=float, default=None, help="guided: sampling scale")
    ap.add_argument("--fidelity", action="store_true", help="also RMSE to the teacher's ODE answers (slow)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    teacher = load_teacher(a.teacher)
    options = parse_sets(a.set)
    out = Path(a.out or f"/tmp/tune-{a.method}-{int(time.time())}")
    t0 = time.time()
    method = distill(
        a.teacher, a.method, max_steps=a.max_steps, out=out, data=a.data, minutes=a.minutes, batch=a.batch,
        ema_decay=a.ema_decay, sample_n=0, checkpoint_every=10**9, log_every=100, options=options,
    )  # fmt: skip
    minutes = (time.time() - t0) / 60
    ev = Evaluator(teacher, EvalSettings(n=a.n, repeats=a.repeats, fidelity_n=min(500, a.n)))
    t_row = teacher_row(ev, teacher, "trajectory-tune", a.fidelity)
    rows = {"teacher_heun35": {"fid": t_row.fid, "fidelity": t_row.fidelity}}
    for k in [int(s) for s in a.steps.split(",")]:
        sampler = student_sampler(method, k)
        if a.guidance is not None:
            sampler.fn = lambda z, y, k=k: method.sample(z, k, y, guidance=a.guidance)
        r = ev.measure(sampler, fidelity=a.fidelity)
        rows[f"student_{k}"] = {"fid": r.fid, "ratio": r.fid / t_row.fid, "fidelity": r.fidelity,
                                "precision": r.precision, "recall": r.recall}  # fmt: skip
        print(k, rows[f"student_{k}"], flush=True)
    record = {"method": a.method, "options": options, "minutes": round(minutes, 2), "steps": method.summary["step"],
              "batch": a.batch, "ema_decay": a.ema_decay, "n": a.n, "guidance": a.guidance, "rows": rows,
              "out": str(out)}  # fmt: skip
    print(json.dumps(record))
    with open(a.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
