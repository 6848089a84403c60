"""Seeded generation: sample ``i`` depends on its own seed only (as EDM's ``generate.py``).

Noise and class labels of sample index ``i`` come from a generator seeded with ``i``, so sample
``i`` is identical whatever the batch size or the number of processes it was produced with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype=torch.float32) -> Tensor:
    """``(len(seeds), *shape)`` standard normal noise, one generator per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    )


def seeded_labels(seeds: Sequence[int], num_classes: int) -> Tensor | None:
    """Uniform class labels, one per seed (a stream independent of the noise); ``None`` if
    unconditional."""
    if not num_classes:
        return None
    return torch.tensor(
        [
            int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(s) + (1 << 40))))
            for s in seeds
        ]
    )


def batches(seeds: Sequence[int], batch_size: int):
    """Split a seed list into consecutive chunks of at most ``batch_size``."""
    seeds = list(seeds)
    for i in range(0, len(seeds), batch_size):
        yield seeds[i : i + batch_size]
