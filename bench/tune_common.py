"""What the bench/*_tune.py scripts share: the teacher's reference row on the tuning seeds."""

from __future__ import annotations

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
