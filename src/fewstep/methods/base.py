"""The contract between a distillation method and the engine (DESIGN.md §4).

A method is maths over a few networks. It declares them, the optimizers that update them, any
EMA copies its loss needs (a consistency target, a TRACT self-teacher), and computes losses; the
engine (:mod:`fewstep.train`) owns devices, optimizer steps, EMA updates, checkpoints, logging.

Conventions the engine relies on:
- every entry of :meth:`Method.networks`, :meth:`Method.frozen` and :meth:`Method.emas` is an
  attribute of the method under the same name (the engine may replace a trainable one with its
  DDP-wrapped version via ``setattr``);
- randomness comes from torch's global RNG (the engine seeds it per process and restores it on
  resume), never from a private generator;
- :meth:`Method.losses` computes only the losses of the optimizers in ``due`` and returns them
  keyed by optimizer name; the engine back-propagates each and steps only that optimizer;
- nothing in the hot path calls ``.item()`` or ``.cpu()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser

Family = Literal["output", "trajectory", "adversarial"]


@dataclass
class Batch:
    """One training batch. ``x`` is real (or teacher-generated) data when the method needs data,
    else ``None``; ``labels`` are class labels (the null label allowed) or ``None``; ``size`` is the
    per-process batch size; ``extra`` carries anything a data source adds (e.g. stored noise).
    Methods draw noise on their student's device when ``x`` is ``None``."""

    size: int
    x: Tensor | None = None
    labels: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    """An optimizer over some of the method's networks.

    ``every``/``offset``: the optimizer steps on iterations ``i`` with ``i % every == offset``
    (DMD2's 5:1 two-time-scale rule is ``every=5`` on the generator); ``offset`` may be a tuple of
    offsets (SiD's fake score steps on iterations 0..k-1 of each cycle of k + 1, its generator on the
    last, so the generator sees the fake score after its update). ``kind`` is ``adam``,
    ``adamw`` or ``radam``; ``grad_clip`` is a max global norm or ``None``. ``lr_schedule`` (optional)
    maps the optimizer's own step count ``k`` (0, 1, ...) to a multiplier of ``lr`` (e.g. a warm-up);
    it must be a pure function of ``k`` so that resuming a run reproduces it exactly.
    """

    networks: list[str]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    kind: str = "adam"
    every: int = 1
    offset: int | tuple[int, ...] = 0
    grad_clip: float | None = None
    lr_schedule: Callable[[int], float] | None = None

    @property
    def offsets(self) -> tuple[int, ...]:
        return (self.offset,) if isinstance(self.offset, int) else tuple(self.offset)

    def due(self, iteration: int) -> bool:
        return iteration % self.every in self.offsets

    def steps_before(self, iteration: int) -> int:
        """How many times this optimizer stepped before ``iteration`` (its lr schedule's input)."""
        return sum(0 if iteration <= o else (iteration - o - 1) // self.every + 1 for o in self.offsets)


@dataclass
class EMASpec:
    """An EMA copy the method's loss reads: ``ema <- decay * ema + (1 - decay) * source``,
    updated by the engine after each step of the optimizer that owns ``source``. ``decay`` may be a
    function of the training iteration (e.g. an adaptive consistency schedule)."""

    source: str
    decay: float | Callable[[int], float]

    def value(self, iteration: int) -> float:
        return self.decay(iteration) if callable(self.decay) else float(self.decay)


class Method:
    """Base class of every distillation method.

    Class attributes: ``name`` (registry key), ``family``, ``paper`` (arXiv id), ``needs_data``
    (real data in :class:`Batch`), ``starts_at_teacher``, ``Config`` (a dataclass of options with the paper's defaults).
    """

    name: ClassVar[str] = ""
    family: ClassVar[Family] = "output"
    paper: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    # whether the student must start where the teacher is (a copy, or a smaller network first
    # warmed up by ``compress``); False where the loss trains any network from its own start (KD)
    starts_at_teacher: ClassVar[bool] = True
    # whether a run can start from another run's student (``--init``); methods that rebuild their
    # student round by round from the teacher, and ``denoise``, cannot
    chains: ClassVar[bool] = True
    # whether the method is a second stage that only makes sense from another run (``--init``), e.g. TCM
    needs_init: ClassVar[bool] = False
    # whether a chain (``--init``) carries the earlier run's fake score over when shapes match
    carries_fake_score: ClassVar[bool] = True
    Config: ClassVar[type] = object
    default_steps: ClassVar[tuple[int, ...]] = (1, 2, 4)
    # engine options of the method's reference (e.g. its evaluation EMA), used by new runs where the
    # user gives none of the same group (``{"ema_decay": 0.0}``: the reference scores raw weights)
    engine_defaults: ClassVar[dict[str, Any]] = {}
    # whether ``sample(..., guidance=w)`` picks the scale at sampling time (a student with a w input)
    guidance_input: bool = False

    def __init__(self, teacher: Denoiser, config: Any = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config if config is not None else self.Config()

    # --- what the engine manages ---------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by attribute name; the one users sample from is ``student``."""
        raise NotImplementedError

    def frozen(self) -> dict[str, nn.Module]:
        """Networks that must never receive gradients (the teacher, feature extractors)."""
        return {"teacher": self.teacher}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        raise NotImplementedError

    def emas(self) -> dict[str, EMASpec]:
        """EMA copies that the loss reads (attribute name -> spec); none by default."""
        return {}

    # --- maths ---------------------------------------------------------------------------------
    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        """Scalar losses of the optimizers in ``due``, keyed by optimizer name."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """Generate from unit Gaussian ``noise`` with ``steps`` student evaluations."""
        raise NotImplementedError

    # --- optional: Python-side state that must survive a resume ---------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable state outside the networks (a round counter, a curriculum position) that
        the engine saves in every checkpoint; empty by default. Tensors belong in networks/EMAs."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (called on resume and by ``load_run``)."""


def describe(cls: type[Method]) -> dict[str, str]:
    return {
        "name": cls.name,
        "family": cls.family,
        "paper": cls.paper,
        "title": cls.title,
        "data": "real data" if cls.needs_data else "data-free",
    }
