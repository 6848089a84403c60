"""Batches for the engine: real data for methods that need it, class labels for all.

Every process draws the same *global* batch (indices into the data, or uniform class labels) from a
sampler generator seeded identically on all processes, and keeps its own contiguous slice. So
``P`` processes with per-process batch ``b`` see exactly the data of one process with batch
``P * b`` (or of ``P`` accumulation steps); only the method's own randomness (torch's global RNG,
seeded per process) differs.
Data are drawn uniformly with replacement, which makes the stream a pure function of the
generator state (saved in checkpoints).
"""

from __future__ import annotations

import torch

from fewstep.data import Dataset
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.methods.base import Batch


def check_data(data: Dataset, teacher: Denoiser) -> None:
    """One-line error if ``data`` cannot train a student of ``teacher``."""
    shapes = [tuple(teacher.sample_shape)]
    vae = getattr(teacher, "vae", None)
    if vae is not None:  # a latent teacher also takes images, which its VAE encodes (teacher_data)
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        shapes.append((vae.config.in_channels, *(s * down for s in teacher.sample_shape[1:])))
    if tuple(data.sample_shape) not in shapes:
        raise FewstepError(
            f"data {data.name} has samples of shape {list(data.sample_shape)} but the teacher makes "
            f"{list(teacher.sample_shape)}; pass data of the teacher's resolution and channels (--data)"
        )
    classes = getattr(teacher, "prompt_classes", None)
    num_classes = len(set(classes)) if classes else teacher.num_classes
    if data.labels is not None and teacher.num_classes and data.num_classes not in (num_classes, teacher.num_classes):
        raise FewstepError(
            f"data {data.name} has {data.num_classes} classes but the teacher has {num_classes}; "
            "pass data with the teacher's labels"
        )


@torch.no_grad()
def teacher_data(data: Dataset, teacher: Denoiser, batch: int = 256) -> Dataset:
    """``data`` as ``teacher`` sees it. For a latent teacher given images (its VAE's input shape),
    the images are encoded once (the posterior mean, scaled as the pipeline scales latents). For a
    teacher whose labels stand for prompts (a prompt table of ``T`` templates x ``C`` classes), each
    image appears once per template with the label of that prompt, so a uniform draw is a uniform
    image with a uniform template. Other data are returned as they are."""
    import dataclasses

    x, labels = data.x, data.labels
    if hasattr(teacher, "decode") and tuple(data.sample_shape) != tuple(teacher.sample_shape):
        encoded = [teacher.encode(x[i : i + batch]) for i in range(0, len(x), batch)]
        x = torch.cat(encoded)
    classes = getattr(teacher, "prompt_classes", None)
    if classes and labels is not None and data.num_classes and len(classes) != data.num_classes:
        prompts = torch.tensor(classes)
        per_class = [torch.nonzero(prompts == c).flatten() for c in range(data.num_classes)]
        if any(len(p) != len(per_class[0]) for p in per_class) or len(per_class[0]) == 0:
            raise FewstepError(
                f"the teacher's {len(classes)} prompts do not cover the data's {data.num_classes} classes equally; "
                "give every class the same number of prompts (fewstep_prompts.json)"
            )
        table = torch.stack(per_class)  # (C, T): the prompt labels of each class
        x = x.repeat(table.shape[1], *([1] * (x.dim() - 1)))
        labels = table[labels].T.reshape(-1)
        return dataclasses.replace(data, x=x, labels=labels, num_classes=len(classes))
    return dataclasses.replace(data, x=x) if x is not data.x else data


class Feeder:
    """This process's :class:`Batch` of each micro-step.

    Each iteration draws one global batch of ``batch * world * accum`` indices (or labels); micro-
    step ``m`` of rank ``r`` takes the ``m * world + r``-th consecutive slice of ``batch``. The data
    an iteration sees is therefore the same for any split over processes and accumulation steps.

    Args:
        data: in-memory data (``None`` for data-free methods: labels only).
        num_classes: the teacher's number of classes (0: unconditional, labels are ``None``).
        batch: per-process micro-batch size.
        rank, world: this process's index and the number of processes.
        accum: micro-batches per iteration.
        seed: seeds the sampler generator (the same on every process).
        device: where batches are placed.
    """

    def __init__(
        self, data: Dataset | None, num_classes: int, batch: int, rank: int, world: int, accum: int, seed: int, device
    ) -> None:
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.x = self.labels = None
        if data is not None:
            self.x = data.x.to(self.device)
            if data.labels is not None and num_classes:
                self.labels = data.labels.to(self.device)

    def iteration(self) -> list[Batch]:
        """The ``accum`` micro-batches of one iteration for this process."""
        n = self.batch * self.world * self.accum
        if self.x is not None:
            draw = torch.randint(len(self.x), (n,), generator=self.generator)
        elif self.num_classes:
            draw = torch.randint(self.num_classes, (n,), generator=self.generator)
        else:
            return [Batch(self.batch, None, None) for _ in range(self.accum)]
        batches = []
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.batch
            mine = draw[start : start + self.batch].to(self.device)
            if self.x is None:
                batches.append(Batch(self.batch, None, mine))
            else:
                labels = self.labels[mine] if self.labels is not None else None
                batches.append(Batch(self.batch, self.x[mine], labels))
        return batches
