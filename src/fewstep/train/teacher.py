"""Train a teacher from scratch on the engine: ``fewstep teacher train`` and :func:`train_teacher`.

A teacher run is an ordinary run folder of the ``denoise`` method (EDM's loss, Karras et al. 2022,
arXiv 2206.00364, Sec. 5) started from a freshly initialised network, so it has everything a
distillation run has — atomic checkpoints with bit-exact ``--resume``, ``metrics.jsonl``, sample
grids, a progress bar whose total and ETA follow the budget — and its ``student/`` folder is the
trained teacher. ``--teacher RUN`` (``load_teacher``) loads it from there.

The recipe (the shipped teachers'): Adam lr 2e-3, betas (0.9, 0.99), a 200-step linear warm-up,
label dropout 0.1 (classifier-free guidance needs the unconditional model), and EDM's evaluation
EMA — a 500 kimg half-life that never exceeds 5 % of the images seen (``ema_rampup`` 0.05), so a
short run's saved weights hold no trace of the random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fewstep.data import Dataset
from fewstep.errors import FewstepError


@dataclass
class TeacherOptions:
    """Options of ``fewstep teacher train`` (``None``: the preset for the data's shape)."""

    arch: str | None = None
    net: dict = field(default_factory=dict)
    batch: int | None = None
    lr: float = 2e-3
    max_steps: int | None = None
    minutes: float | None = None
    label_dropout: float = 0.1
    ema_halflife_kimg: float = 500.0
    ema_rampup: float = 0.05
    warmup_steps: int = 200
    checkpoint_every: int = 200
    seed: int = 0


def train_teacher(
    data: Dataset | None,
    out: str | Path,
    options: TeacherOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
):
    """Train a teacher on ``data`` into the run folder ``out``; return the trained teacher (eval mode).

    ``resume=True`` continues ``out`` from its newest checkpoint (``data`` may be ``None``: the run
    reloads what it recorded). Progress shows as a bar (or a line every 30 s in a log)."""
    from fewstep.teachers import load_teacher
    from fewstep.teachers.train import new_model, preset
    from fewstep.train.api import distill

    o = options or TeacherOptions()
    if o.max_steps is None and o.minutes is None and not resume:
        raise FewstepError("give a budget: --minutes M and/or --steps N")
    if resume:
        distill(None, out=out, resume=True, max_steps=o.max_steps, minutes=o.minutes)
        return load_teacher(out)
    if data is None:
        raise FewstepError("give the data to train on (--data)")
    if o.lr <= 0 or not 0 <= o.label_dropout < 1:
        raise FewstepError(f"--lr must be > 0 and --label-dropout in [0, 1), got {o.lr} and {o.label_dropout}")
    model = new_model(data.sample_shape, data.num_classes, o.arch, o.net)
    batch = o.batch or preset(data.sample_shape)[2]
    model.info = {"initial_weights": True, "params": sum(p.numel() for p in model.parameters())}
    distill(
        model, "denoise", o.max_steps, out, data=data, overwrite=overwrite, seed=o.seed, batch=batch,
        minutes=o.minutes, ema_halflife_kimg=o.ema_halflife_kimg, ema_rampup=o.ema_rampup,
        checkpoint_every=o.checkpoint_every, sample_every=o.checkpoint_every, sample_n=64, log_every=10,
        lr=o.lr, betas=(0.9, 0.99), label_dropout=o.label_dropout, warmup_steps=o.warmup_steps,
        solver="heun", grid_steps=(35,),
    )  # fmt: skip
    return load_teacher(out)
