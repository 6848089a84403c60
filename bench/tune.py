"""One tuning harness for every method: a short distillation, then the student's FID ratio at a few
step counts on the tuning protocol (fewer samples than the benchmark's 10,000 x 3), one JSON line
per run appended to ``--log``. Not a test; one heavy job at a time on 2 cores::

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune.py --method ladd --minutes 4 \\
        --set lr=3e-5 --set d_lr=1e-3 --set disc_m=-1
    .venv/bin/python bench/tune.py --method sid --minutes 3 --curve 1,2    # + raw/EMA FID at minute marks
    .venv/bin/python bench/tune.py --run /tmp/tune-cd-123 --steps 2 --sample sample_sigmas=0.5   # re-score a run

Each record has the options, the budget actually used, the teacher row (Heun, 35 NFE) and one row
per step count (FID, ratio, precision, recall, label accuracy), the mean of each logged loss over
the last ten logging points (a discriminator at chance reads 2 ln 2 = 1.386 non-saturating, 2.0
hinge), and with ``--curve`` the raw and EMA FID at each minute mark. ``--sample KEY=VALUE`` changes
a sampling option of the method's config (e.g. ``sample_sigmas``) before scoring; ``--guidance``
samples a guided student at that scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.eval.evaluate import EvalSettings, Evaluator
from fewstep.eval.sampling import student_sampler
from fewstep.options import coerce, field_types
from fewstep.runs import checkpoints as runck
from fewstep.runs import load_run, read_metrics
from fewstep.train import distill
from fewstep.train.config import parse_sets


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", help="the method to distil (or --run)")
    ap.add_argument("--run", help="score this finished run instead of training one")
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--data", default=None, help="data for methods that need it (default: the teacher's)")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema-decay", type=float, default=None, help="evaluation EMA (default: the method's)")
    ap.add_argument("--set", action="append", default=[], help="a method option KEY=VALUE (repeatable)")
    ap.add_argument("--sample", action="append", default=[], help="a sampling option KEY=VALUE before scoring")
    ap.add_argument("--guidance", type=float, default=None, help="sample a guided student at this scale")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema")
    ap.add_argument("--curve", default=None, help="minute marks M,M,... to score (raw and EMA) after training")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", default=None, help="step counts to score (default: the method's, up to 4)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--log", default="/tmp/fewstep-tune.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def score(method, ev: Evaluator, teacher_fid: float, k: int, guidance: float | None) -> dict:
    sampler = student_sampler(method, k)
    if guidance is not None:
        sampler.fn = lambda z, y: method.sample(z, k, y, guidance=guidance)
    r = ev.measure(sampler, fidelity=False)
    return {"fid": round(r.fid, 4), "ratio": round(r.fid / teacher_fid, 3), "precision": round(r.precision, 3),
            "recall": round(r.recall, 3), "label_acc": r.label_acc}  # fmt: skip


def main() -> None:
    a = parser().parse_args()
    if not (a.method or a.run):
        raise SystemExit("give --method to train, or --run to score a finished run")
    torch.set_num_threads(a.threads)
    options, t0 = parse_sets(a.set), time.time()
    if a.run:
        out = Path(a.run)
    else:
        out = Path(a.out or f"/tmp/tune-{a.method}-{int(time.time())}")
        engine = {"ema_decay": a.ema_decay} if a.ema_decay is not None else {}
        marks = tuple(float(m) for m in a.curve.split(",")) if a.curve else ()
        distill(a.teacher, a.method, max_steps=a.max_steps, out=out, data=a.data, minutes=a.minutes, batch=a.batch,
                seed=a.seed, sample_n=0, checkpoint_every=10**9, log_every=100, snapshot_minutes=marks,
                options=options, **engine)  # fmt: skip
    minutes = (time.time() - t0) / 60
    method = load_run(out, ema=a.weights == "ema")
    types_ = field_types(type(method.config))
    for key, value in parse_sets(a.sample).items():
        setattr(method.config, key, coerce(value, types_[key], key))
    ev = Evaluator(method.teacher, EvalSettings(n=a.n, repeats=a.repeats))
    (t_row,) = ev.teacher_rows((("heun", 35),), progress=lambda *_: None)
    rows = {"teacher_heun35": {"fid": round(t_row.fid, 4)}}
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [k for k in method.default_steps if k <= 4]
    for k in steps:
        rows[f"student_{k}"] = score(method, ev, t_row.fid, k, a.guidance)
        print(k, rows[f"student_{k}"], flush=True)
    curve = []
    for snap in runck.snapshots(out / "checkpoints"):
        point = {"minutes": round(snap.meta["elapsed_minutes"], 2), "step": snap.step}
        for w in ("raw", "ema"):
            m = load_run(out, ema=w == "ema", checkpoint=snap.path.name)
            point[w] = score(m, ev, t_row.fid, steps[0], a.guidance)["ratio"]
        curve.append(point)
        print(point, flush=True)
    tail = read_metrics(out)[-10:]
    losses = {k: round(sum(r[k] for r in tail if k in r) / sum(k in r for r in tail), 4)
              for k in sorted({k for r in tail for k in r if k.startswith("loss/")})}  # fmt: skip
    record = {"method": method.name, "options": options, "sample": a.sample, "guidance": a.guidance,
              "minutes": round(minutes, 2), "steps": method.run.step, "batch": a.batch, "seed": a.seed,
              "weights": a.weights, "n": a.n, "repeats": a.repeats, "rows": rows, "losses_last": losses,
              "curve": curve, "out": str(out)}  # fmt: skip
    print(json.dumps(record))
    with open(a.log, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
