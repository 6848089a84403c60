"""Tuning runs for the distribution-matching methods (Diff-Instruct, DMD2, SiD) on digits.

Not a test. Runs over ~2 minutes go under the heavy lock. Distils with a step and/or wall-clock
budget, then measures the student's FID (shipped digits classifier features) at the given steps and
the teacher's (Heun, 35 NFE) on the same seeds, and appends one JSON line per run to ``--log``::

    flock /tmp/fewstep-heavy.lock .venv/bin/python bench/dm_tune.py --method sid --minutes 3 \\
        --set lr=1e-4 --set fake_lr=1e-4 --set dropout=0
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
    ap = tune_parser("/tmp/dm_tune.jsonl", minutes=None, batch=32, steps="1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve", type=int, default=0, help="also evaluate every N-th iteration's checkpoint")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    teacher = load_teacher(a.teacher)
    options = parse_sets(a.set)
    out = Path(a.out or f"/tmp/dm-tune-{a.method}-{int(time.time())}")
    t0 = time.time()
    method = distill(
        a.teacher, a.method, max_steps=a.max_steps, out=out, data=a.data, minutes=a.minutes, batch=a.batch,
        seed=a.seed, ema_decay=a.ema_decay, sample_n=0, checkpoint_every=a.curve or 10**9, log_every=100,
        keep_checkpoints=10**6, options=options,
    )  # fmt: skip
    minutes = (time.time() - t0) / 60
    ev = Evaluator(teacher, EvalSettings(n=a.n, repeats=a.repeats))
    t_row = teacher_row(ev, teacher, "dm-tune")
    rows = {"teacher_heun35": {"fid": t_row.fid, "fid_std": t_row.fid_std}}
    for k in [int(s) for s in a.steps.split(",")]:
        r = ev.measure(student_sampler(method, k), fidelity=False)
        rows[f"student_{k}"] = {"fid": r.fid, "fid_std": r.fid_std, "ratio": r.fid / t_row.fid,
                                "precision": r.precision, "recall": r.recall}  # fmt: skip
        print(k, rows[f"student_{k}"], flush=True)
    if a.curve:  # FID of the raw and the EMA student along the run (first listed step only)
        from fewstep.runs import load_run

        k = int(a.steps.split(",")[0])
        curve = rows["curve"] = []
        for ckpt in sorted((out / "checkpoints").glob("step-*")):
            point = {"step": int(ckpt.name.split("-")[1])}
            for ema in (False, True):
                m = load_run(out, ema=ema, checkpoint=ckpt)
                point["ema" if ema else "raw"] = ev.measure(student_sampler(m, k), fidelity=False).fid
            curve.append(point)
            print(point, flush=True)
    record = {"method": a.method, "options": options, "minutes": round(minutes, 2), "steps": method.summary["step"],
              "batch": a.batch, "seed": a.seed, "ema_decay": a.ema_decay, "n": a.n, "repeats": a.repeats,
              "rows": rows, "out": str(out)}  # fmt: skip
    print(json.dumps(record))
    with open(a.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
