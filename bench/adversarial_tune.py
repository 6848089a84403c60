"""Tuning runs for the adversarial methods (ADD, LADD, UFOGen, lightning) on digits.

Not a test: run it under the heavy-job lock. It distils with a wall-clock budget, then measures
FID, precision and recall (shipped-classifier features) of the student at 1/2/4 steps and of the
teacher with Heun at 35 NFE on the same seeds, and appends one JSON line per run to ``--log``::

    OMP_NUM_THREADS=1 flock /tmp/fewstep-heavy.lock .venv/bin/python bench/adversarial_tune.py \\
        --method add --minutes 3 --set lr=2e-5 --n 2000
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tune_common import teacher_row, tune_parser

from fewstep.eval.evaluate import EvalSettings, Evaluator
from fewstep.eval.sampling import student_sampler
from fewstep.runs.folder import read_metrics
from fewstep.teachers import load_teacher
from fewstep.train import distill
from fewstep.train.config import parse_sets


def main() -> None:
    ap = tune_parser("bench/adversarial_tune.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    teacher = load_teacher(a.teacher)
    options = parse_sets(a.set)
    out = Path(a.out or f"/tmp/adv-tune-{a.method}-{int(time.time())}")
    t0 = time.time()
    method = distill(
        a.teacher, a.method, max_steps=a.max_steps, out=out, data=a.data, minutes=a.minutes, batch=a.batch,
        ema_decay=a.ema_decay, sample_n=0, checkpoint_every=10**9, log_every=100, options=options,
    )  # fmt: skip
    minutes = (time.time() - t0) / 60
    ev = Evaluator(teacher, EvalSettings(n=a.n, repeats=a.repeats, fidelity_n=min(500, a.n)))
    t_row = teacher_row(ev, teacher, "adversarial-tune")
    rows = {"teacher_heun35": {"fid": t_row.fid, "precision": t_row.precision, "recall": t_row.recall}}
    for k in [int(s) for s in a.steps.split(",")]:
        r = ev.measure(student_sampler(method, k), fidelity=False)
        rows[f"student_{k}"] = {"fid": round(r.fid, 3), "ratio": round(r.fid / t_row.fid, 3),
                                "precision": round(r.precision, 3), "recall": round(r.recall, 3),
                                "label_acc": r.label_acc}  # fmt: skip
        print(k, rows[f"student_{k}"], flush=True)
    tail = [m["loss/discriminator"] for m in read_metrics(out)[-10:] if "loss/discriminator" in m]
    record = {"method": a.method, "options": options, "minutes": round(minutes, 2), "steps": method.summary["step"],
              "batch": a.batch, "ema_decay": a.ema_decay, "n": a.n, "rows": rows, "out": str(out),
              # chance level: 2 ln 2 = 1.386 (non-saturating), 2.0 (hinge)
              "d_loss_last": round(sum(tail) / len(tail), 3) if tail else None}  # fmt: skip
    print(json.dumps(record))
    with open(a.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
