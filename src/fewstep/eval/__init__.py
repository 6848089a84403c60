"""Evaluation (DESIGN.md §6): seeded generation, FID/KID/precision/recall over pluggable features,
exact metrics for analytic teachers, teacher fidelity, speed, reports, benchmarks.

- :mod:`fewstep.eval.features` — extractors (shipped digits CNN, local Inception-v3, raw coordinates);
- :mod:`fewstep.eval.metrics` — FID/KID (torchmetrics), precision/recall, sliced Wasserstein, mixtures;
- :mod:`fewstep.eval.sampling` — samplers, seeded generation, teacher fidelity;
- :mod:`fewstep.eval.speed` — latency, throughput, peak memory, distillation cost;
- :mod:`fewstep.eval.evaluate` — the protocol over many samplers; :mod:`fewstep.eval.pipeline` —
  ``fewstep eval``; :mod:`fewstep.eval.bench` — ``fewstep bench``; :mod:`fewstep.eval.report` — pictures.

Imports are lazy: the engine looks up :func:`training_hook` here on every run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

_HOOK_EVALUATORS: dict[str, Any] = {}


def training_hook(method: Any, step: int, run_dir: str | Path) -> dict | None:
    """The engine's periodic evaluation (``--set eval_every=N``): FID, precision and recall of the
    student at its fewest steps, 1,000 samples, one seed range, against the teacher's data. Returns
    ``None`` when the teacher does not say what data it learned (nothing to compare with)."""
    from fewstep.errors import FewstepError
    from fewstep.eval.evaluate import EvalSettings, Evaluator
    from fewstep.eval.sampling import student_sampler

    key = str(run_dir)
    try:
        if key not in _HOOK_EVALUATORS:
            settings = EvalSettings(n=1000, repeats=1, kid_subsets=10, fidelity_n=1)
            _HOOK_EVALUATORS[key] = Evaluator(method.teacher, settings)
        ev = _HOOK_EVALUATORS[key]
    except FewstepError:
        return None
    k = min(getattr(method, "default_steps", (1,)))
    try:
        row = ev.measure(student_sampler(method, k), fidelity=False)
    except Exception as e:  # monitoring must never cost a run its final student
        warnings.warn(f"evaluation at step {step} failed: {type(e).__name__}: {e}", stacklevel=1)
        return None
    return {f"fid@{k}": row.fid, f"precision@{k}": row.precision, f"recall@{k}": row.recall}
