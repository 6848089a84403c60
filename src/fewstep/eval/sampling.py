"""Samplers under evaluation, seeded generation, and teacher fidelity.

A :class:`Sampler` is anything that turns unit noise (and labels) into samples with a known number
of network evaluations: the teacher with a training-free solver (:func:`teacher_sampler`), or a
distilled student (:func:`student_sampler`). :func:`generate` draws sample ``i`` from seed ``i``
only (noise and label, :mod:`fewstep.seeding`), so a sample is the same whatever the batch size or
the way seeds are split across processes (:func:`shard`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import CallCounter, Denoiser
from fewstep.errors import FewstepError
from fewstep.seeding import batches, seeded_labels, seeded_noise

SampleFn = Callable[[Tensor, Any], Tensor]

# The teacher's "exact" ODE answer for fidelity: Heun on a fine Karras grid. RK45 at rtol 1e-6
# (fewstep.solvers.reference) agrees with it to well under the error of any sampler measured here
# (see docs/benchmarks.md) at a fraction of the cost.
REFERENCE_SOLVER, REFERENCE_STEPS = "heun", 128


@dataclass
class Sampler:
    """``fn(noise, labels) -> samples`` from unit Gaussian ``noise``; ``nfe`` network evaluations
    per sample; ``kind`` is ``teacher`` (a solver) or ``student``."""

    name: str
    nfe: int
    fn: SampleFn
    kind: str = "teacher"
    solver: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} @ {self.nfe} NFE"


def teacher_sampler(model: Denoiser, solver: str, nfe: int, guidance: float = 1.0) -> Sampler:
    """The teacher with ``solver`` on a Karras grid using at most ``nfe`` evaluations (the actual
    count is recorded: Heun spends ``2 * steps - 1``)."""
    from fewstep.guidance import cfg
    from fewstep.solvers import nfe as solver_nfe
    from fewstep.solvers import sample, steps_for_nfe

    steps = steps_for_nfe(solver, nfe)
    den = cfg(model, guidance) if (model.num_classes and guidance != 1.0) else model
    return Sampler(solver, solver_nfe(solver, steps), lambda z, y: sample(den, z, solver, steps, y)[0], "teacher",
                   solver)  # fmt: skip


def student_sampler(method: Any, steps: int, name: str | None = None) -> Sampler:
    """A distilled student through its method's ``sample(noise, steps, cond)``. The NFE is counted
    (forward calls of ``method.student`` on one sample, and of the method's EMA copies, which a
    sampler may also run — TCM's frozen stage 1 below its truncation level) rather than assumed to
    equal ``steps``."""
    student = getattr(method, "student", None)
    fn = lambda z, y: method.sample(z, steps, y)
    nfe = steps
    if isinstance(student, nn.Module):
        shape = tuple(getattr(method.teacher, "sample_shape", ()))
        classes = getattr(method.teacher, "num_classes", 0)
        emas = method.emas() if hasattr(method, "emas") else {}
        nets = [student, *(m for m in (getattr(method, k, None) for k in emas) if isinstance(m, nn.Module))]
        counters = [CallCounter(m) for m in nets]
        try:
            with torch.no_grad():
                fn(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long) if classes else None)
        finally:
            for c in counters:
                c.handle.remove()
        nfe = sum(c.calls for c in counters) or steps
    return Sampler(name or getattr(method, "name", "student"), nfe, fn, "student")


def shard(seeds: Sequence[int], rank: int, world: int) -> list[int]:
    """The seeds process ``rank`` of ``world`` generates (strided, as EDM's generate.py)."""
    if not 0 <= rank < world:
        raise FewstepError(f"rank {rank} is outside [0, {world})")
    return list(seeds)[rank::world]


@torch.no_grad()
def generate(
    sampler: Sampler | SampleFn,
    seeds: Sequence[int],
    sample_shape: tuple[int, ...],
    num_classes: int = 0,
    batch: int = 500,
    labels: Tensor | None = None,
    desc: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Samples for ``seeds``: noise and uniform labels of sample ``i`` come from seed ``i`` alone.

    ``labels`` overrides the seeded labels (one per seed). ``desc`` shows a progress bar (samples,
    rate, ETA) on a terminal. Returns ``(samples, labels)``.
    """
    import sys

    from tqdm.auto import tqdm

    fn = sampler.fn if isinstance(sampler, Sampler) else sampler
    seeds = list(seeds)
    if labels is None:
        labels = seeded_labels(seeds, num_classes)
    xs = []
    bar = tqdm(total=len(seeds), desc=desc, unit="sample", leave=False, dynamic_ncols=True,
               disable=desc is None or not sys.stderr.isatty())  # fmt: skip
    for i, chunk in enumerate(batches(seeds, batch)):
        z = seeded_noise(chunk, tuple(sample_shape))
        y = None if labels is None else labels[i * batch : i * batch + len(chunk)]
        xs.append(fn(z, y))
        bar.update(len(chunk))
    bar.close()
    x = torch.cat(xs) if xs else torch.zeros(0, *sample_shape)
    return x, labels


def rmse(x: Tensor, y: Tensor) -> float:
    """Root mean squared difference over all samples and coordinates."""
    return float((x.double() - y.double()).pow(2).mean().sqrt())


def reference_answers(model: Denoiser, seeds: Sequence[int], batch: int = 500) -> Tensor:
    """The teacher's high-accuracy ODE answers for ``seeds`` (fine Heun, see ``REFERENCE_STEPS``)."""
    from fewstep.solvers import sample

    fn = lambda z, y: sample(model, z, REFERENCE_SOLVER, REFERENCE_STEPS, y)[0]
    return generate(fn, seeds, model.sample_shape, model.num_classes, batch)[0]


def fidelity(sampler: Sampler, reference: Tensor, seeds: Sequence[int], model: Denoiser, batch: int = 500) -> float:
    """Teacher fidelity: RMSE between ``sampler``'s samples and the teacher's ODE answers
    ``reference`` for the same seeds (same noise, same labels)."""
    x, _ = generate(sampler, seeds, model.sample_shape, model.num_classes, batch)
    return rmse(x, reference)
