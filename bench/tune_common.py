"""What the bench/*_tune.py scripts share: their common options and the teacher's reference row on
the tuning seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.eval.evaluate import Evaluator, Row
from fewstep.eval.sampling import teacher_sampler
from fewstep.io import atomic_write_json, read_json


def teacher_row(ev: Evaluator, teacher, tag: str, fidelity: bool = False) -> Row:
    """The teacher (Heun, 35 NFE) on ``ev``'s seeds. With ``fidelity`` it is the evaluator's own
    cached teacher row; without, a cheaper row (no fidelity) cached in /tmp per ``tag`` and protocol."""
    if fidelity:
        return ev.teacher_rows((("heun", 35),), progress=lambda *_: None)[0]
    cache = Path(f"/tmp/{tag}-teacher-{ev.key.replace('/', '_')}.json")
    if cache.is_file():
        return Row(**read_json(cache))
    row = ev.measure(teacher_sampler(teacher, "heun", 35), fidelity=False)
    atomic_write_json(cache, row.to_dict())
    return row


def tune_parser(log: str, method: str | None = None, minutes: float | None = 3.0, batch: int = 64,
                steps: str = "1,2,4", threads: int = 1) -> argparse.ArgumentParser:  # fmt: skip
    """The options every tuning script takes, with that script's defaults (``method=None``: required)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=method is None, default=method)
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--minutes", type=float, default=minutes)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--ema-decay", type=float, default=0.0, help="the engine's evaluation EMA of the student")
    ap.add_argument("--set", action="append", default=[], help="a method option KEY=VALUE (repeatable)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", default=steps)
    ap.add_argument("--out", default=None)
    ap.add_argument("--log", default=log)
    ap.add_argument("--threads", type=int, default=threads)
    return ap
