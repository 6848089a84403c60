"""Measure samplers of one teacher on one protocol: quality, fidelity and speed, in one run.

:class:`Evaluator` holds what every sampler is compared against — the reference features of the
real data (cached), the teacher's high-accuracy ODE answers for the fidelity seeds, the feature
extractor — and :meth:`Evaluator.measure` gives one table row per sampler. Repeat ``r`` of
``repeats`` uses seeds ``[r n, (r + 1) n)``; quality numbers are mean and std over repeats.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.eval.features import ClassifierFeatures, RawFeatures, get_extractor
from fewstep.eval.metrics import (
    MIN_FID_SAMPLES,
    FeatureStats,
    fid,
    kid,
    mixture_metrics,
    precision_recall,
    sliced_wasserstein,
)
from fewstep.eval.reference import cache_dir, reference_features
from fewstep.eval.sampling import Sampler, generate, reference_answers, rmse, teacher_sampler
from fewstep.eval.speed import measure_speed
from fewstep.teachers.analytic import GaussianMixture

BASELINE_SOLVERS = ("euler", "heun", "dpmpp_2m")
BASELINE_NFE = (1, 2, 4, 8, 16, 35)


@dataclass
class EvalSettings:
    """The protocol (docs/benchmarks.md): defaults are BENCHMARK.md's."""

    n: int = 10000
    repeats: int = 3
    features: str = "auto"
    feature_weights: str | None = None
    data: Any = None  # reference data (text spec or DataSpec); default: the run's, else the teacher's
    fidelity_n: int = 1000
    teacher_solver: str = "heun"
    teacher_nfe: int = 35
    baseline_solvers: tuple[str, ...] = BASELINE_SOLVERS
    baseline_nfe: tuple[int, ...] = BASELINE_NFE
    batch: int = 500
    kid_subsets: int = 100
    speed_batch: int = 256
    speed_repeats: int = 5
    min_samples: int = MIN_FID_SAMPLES
    cache: bool = True
    guidance: float = 1.0  # the teacher's (reference and baselines) classifier-free guidance scale

    def check(self) -> None:
        if self.n < self.min_samples:
            raise FewstepError(
                f"--n {self.n} is too few samples for a stable FID (minimum {self.min_samples}; "
                "the protocol uses 10000); raise --n"
            )
        if self.repeats < 1:
            raise FewstepError(f"--seeds must be >= 1, got {self.repeats}")
        if self.fidelity_n < 1:
            raise FewstepError(f"--fidelity-n must be >= 1, got {self.fidelity_n}")


@dataclass
class Row:
    """One sampler's measurements; ``None`` where a metric does not apply."""

    name: str
    kind: str
    nfe: int
    fid: float | None = None
    fid_std: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    fidelity: float | None = None
    label_acc: float | None = None
    swd: float | None = None
    extra: dict = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def model_digest(model: Denoiser) -> str:
    """A short hash of a model's weights and buffers (keys cached teacher rows). A LoRA teacher
    (which registers no weights of its own) is its base network without the adapters: the same
    digest as the plain teacher, whatever its student's adapters hold."""
    base = getattr(model, "base", None)
    state = (base if base is not None and hasattr(model, "accepts_extra_inputs") else model).state_dict()
    h = hashlib.sha256()
    for k, v in sorted((k.replace(".base_layer", ""), v) for k, v in state.items() if "lora_" not in k):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Evaluator:
    """Everything samplers of ``teacher`` are compared against, built once per run."""

    def __init__(self, teacher: Denoiser, settings: EvalSettings, data: Any = None, progress=print) -> None:
        from fewstep.data import Dataset, data_of, parse_data

        settings.check()
        self.teacher, self.s, self.progress = teacher, settings, progress
        self.shape, self.classes = tuple(teacher.sample_shape), teacher.num_classes
        self.analytic = isinstance(teacher, GaussianMixture)
        # the reference data: --data, else what the run trained on, else what the teacher did
        if settings.data is not None:
            data = parse_data(settings.data)
        elif data is None:
            data = data_of(teacher)
        self.dataset = data if isinstance(data, Dataset) else None  # data kept inside a run
        self.data = data.spec if self.dataset is not None else data
        if self.data is None and self.dataset is None and not self.analytic:
            raise FewstepError("cannot tell which data this teacher learned; pass --data (e.g. digits:train)")
        # a latent teacher's samples are scored as the images its VAE decodes them to
        self.image_shape = tuple(self.images(torch.zeros(1, *self.shape)).shape[1:])
        classes = getattr(teacher, "prompt_classes", None)
        self.label_classes = torch.tensor(classes) if classes else None
        if self.dataset is not None and tuple(self.dataset.sample_shape) != self.image_shape:
            raise FewstepError(f"the run's data has samples of shape {list(self.dataset.sample_shape)}, the teacher "
                               f"makes {list(self.shape)}; pass the teacher's data with --data")  # fmt: skip
        self.extractor = get_extractor(
            settings.features, self.image_shape, settings.feature_weights, self.data, progress
        )
        self.ref_x = self._reference_samples()
        if self.ref_x is not None:
            self.ref = self.extractor.features(self.ref_x)
        else:
            self.ref = reference_features(self.extractor, self.data, cache=settings.cache)
        self.ref_stats = FeatureStats.of(self.ref)
        self.fidelity_seeds = list(range(min(settings.fidelity_n, settings.n)))
        self._answers: Tensor | None = None
        where = self.data if self.data is not None else (self.dataset.name if self.dataset is not None else None)
        self.key = f"{model_digest(teacher)}-{self.extractor.name}-{where}-n{settings.n}x{settings.repeats}"
        for name in ("fidelity_n", "kid_subsets", "min_samples", "guidance"):  # suffixes only where not default
            if getattr(settings, name) != getattr(EvalSettings, name):
                self.key += f"-{name}{getattr(settings, name)}"

    def images(self, x: Tensor, batch: int = 500) -> Tensor:
        """Samples as images: a latent teacher's VAE decodes them (in batches), others pass."""
        from fewstep.viz import as_images

        return as_images(self.teacher, x, batch)

    def _reference_samples(self) -> Tensor | None:
        """Real samples when they are not a cached data set: exact mixture samples, 2-D data, data
        kept inside a run."""
        if self.analytic and self.data is None and self.dataset is None:
            g = torch.Generator().manual_seed(1 << 30)  # a stream apart from the generation seeds
            return self.teacher.sample(max(self.s.n, 2 * self.s.min_samples), generator=g).float()
        if self.dataset is not None:
            return self.dataset.x
        if isinstance(self.extractor, RawFeatures):
            from fewstep.data import load_dataset

            return load_dataset(self.data).x
        return None

    def answers(self) -> Tensor:
        """The teacher's high-accuracy ODE answers on the fidelity seeds (computed once)."""
        if self._answers is None:
            from fewstep.guidance import cfg

            guided = cfg(self.teacher, self.s.guidance)
            self._answers = self.images(reference_answers(guided, self.fidelity_seeds, self.s.batch))
        return self._answers

    def measure(self, sampler: Sampler, fidelity: bool = True) -> Row:
        """Quality of ``sampler`` over ``repeats`` disjoint seed ranges, plus its fidelity."""
        s = self.s
        fids, kids, precs, recs, accs, swds, extras = [], [], [], [], [], [], []
        row = Row(sampler.name, sampler.kind, sampler.nfe)
        for r in range(s.repeats):
            t0 = time.monotonic()
            x, y = generate(sampler, range(r * s.n, (r + 1) * s.n), self.shape, self.classes, s.batch,
                            desc=f"{sampler.label}, seed range {r + 1}/{s.repeats}")  # fmt: skip
            took = time.monotonic() - t0
            if r == 0 and s.repeats > 1 and took > 20:
                self.progress(f"  {sampler.label}: {s.n} samples in {took:.0f} s; the row takes about "
                              f"{took * s.repeats / 60:.1f} min (a quicker look: --n 2000 --seeds 1)")  # fmt: skip
            x = self.images(x)
            f = self.extractor.features(x)
            fids.append(fid(self.ref_stats, f, s.min_samples))
            kids.append(kid(self.ref, f, subsets=s.kid_subsets, seed=r)[0])
            p, rc = precision_recall(self.ref, f)
            precs.append(p)
            recs.append(rc)
            if isinstance(self.extractor, ClassifierFeatures) and self.extractor.predicts_labels and y is not None:
                want = self.label_classes.to(y.device)[y] if self.label_classes is not None else y
                accs.append(float((self.extractor.predict(x) == want).double().mean()))
            if self.ref_x is not None and len(self.shape) == 1:
                swds.append(sliced_wasserstein(x, self.ref_x, seed=r))
            if self.analytic:
                extras.append(mixture_metrics(self.teacher, x, y))
            if r == 0 and fidelity:
                row.fidelity = rmse(x[: len(self.fidelity_seeds)], self.answers())
        row.fid, row.fid_std = _mean_std(fids)
        row.kid, row.kid_std = _mean_std(kids)
        row.precision, row.recall = statistics.fmean(precs), statistics.fmean(recs)
        row.label_acc = statistics.fmean(accs) if accs else None
        row.swd = statistics.fmean(swds) if swds else None
        if extras:
            row.extra = {k: statistics.fmean(e[k] for e in extras) for k in ("loglik", "modes_covered", "mass_tv")}
            row.extra["modes"] = extras[0]["modes"]
        return row

    # --- teacher rows, cached across runs (generation is deterministic given the seeds) --------
    def _cache_path(self) -> Path:
        safe = hashlib.sha256(self.key.encode()).hexdigest()[:20]
        return cache_dir() / "teacher-rows" / f"{safe}.json"

    def _probe(self, sampler: Sampler) -> Tensor:
        """A few samples from fixed seeds: samplers that agree on them compute the same thing."""
        return generate(sampler, range(8), self.shape, self.classes)[0]

    def teacher_rows(self, solvers: tuple[tuple[str, int], ...], progress=print) -> list[Row]:
        """Rows of the teacher with ``(solver, nfe)`` pairs, read from the cache when this exact
        protocol was measured before (the cache is re-read before each row, so several processes
        can share the work). A solver that reproduces an already measured one (Heun, Euler and
        DPM-Solver++ are all one Euler step at 1 NFE) reuses its row."""
        from fewstep.io import atomic_write_json, read_json

        path = self._cache_path()
        rows, seen, probes = [], set(), []
        for solver, nfe in solvers:
            sampler = teacher_sampler(self.teacher, solver, nfe, self.s.guidance)
            if (solver, sampler.nfe) in seen:
                continue
            seen.add((solver, sampler.nfe))
            k = f"{solver}@{sampler.nfe}"
            cached = read_json(path) if (self.s.cache and path.is_file()) else {}
            probe = self._probe(sampler)
            twin = next((r for r, p in probes if (p - probe).abs().max() < 1e-4), None)
            if k in cached:
                row = Row(**cached[k])
                row.cached = True
                progress(f"teacher {sampler.label}: row reused from the cache of an identical measurement")
            elif twin is not None:
                row = Row(**{**twin.to_dict(), "name": solver, "nfe": sampler.nfe})
                progress(f"teacher {sampler.label} reproduces {twin.name} @ {twin.nfe} NFE: row reused")
            else:
                progress(f"measuring teacher {sampler.label}")
                row = self.measure(sampler)
            if k not in cached and self.s.cache:
                cached = read_json(path) if path.is_file() else {}
                cached[k] = {**row.to_dict(), "cached": False}
                atomic_write_json(path, cached)
            probes.append((row, probe))
            rows.append(row)
        return rows

    def speed(self, sampler: Sampler) -> dict:
        sp = measure_speed(sampler, self.shape, self.classes, self.s.speed_batch, self.s.speed_repeats)
        return {"name": sampler.name, "kind": sampler.kind, **sp.to_dict()}

    def floor(self, teacher: Sampler | None = None, holdout: Any = None) -> dict | None:
        """FID of held-out real data against the reference — what a perfect model scores with that
        many samples (``digits:test`` for ``digits:train``, a folder's test split for its training
        split). FID is biased upward at few samples, so ``teacher`` (its reference sampler) is also
        scored on the same number of seeds."""
        from fewstep.data import parse_data

        holdout = parse_data(holdout) if holdout is not None else (self.data.held_out() if self.data else None)
        if holdout is None:
            return None
        f = reference_features(self.extractor, holdout, cache=self.s.cache)
        n, least = f.shape[0], min(100, f.shape[0])
        p, r = precision_recall(self.ref, f)
        out = {"data": str(holdout), "n": n, "fid": fid(self.ref_stats, f, min_samples=least),
               "kid": kid(self.ref, f, subsets=self.s.kid_subsets)[0], "precision": p, "recall": r}  # fmt: skip
        if teacher is not None:
            x, _ = generate(teacher, range(n), self.shape, self.classes, self.s.batch)
            out["teacher_fid_same_n"] = fid(self.ref_stats, self.extractor.features(self.images(x)), min_samples=least)
        return out

    def describe(self) -> dict:
        ref = str(self.data) if self.data is not None else (self.dataset.name if self.dataset is not None else "exact")
        d = {**asdict(self.s), "data": ref, "features": self.extractor.name, "feature_dim": self.extractor.dim,
             "reference": ref, "reference_n": self.ref_stats.n}  # fmt: skip
        rec = getattr(self.extractor, "record", None)
        if rec:
            d["classifier_test_accuracy"] = rec.get("test_accuracy")
            d["classifier_task"] = rec.get("task", "labels")
            d["classifier_test_split"] = rec.get("test_split")
        return json.loads(json.dumps(d, default=str))
