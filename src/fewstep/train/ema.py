"""Exponential moving averages of network weights: ``ema <- ema + w (source - ema)``, ``w = 1 - decay``.

Updates run as one fused ``torch._foreach_lerp_`` over all floating-point parameters; ``w`` may be
a tensor on the device (the engine passes ``(1 - decay) * step_ok`` so that a skipped step leaves
the EMA untouched without a host synchronisation). Buffers are copied from the source.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """An EMA ``target`` of ``source`` (both modules of identical structure)."""

    def __init__(self, target: nn.Module, source: nn.Module) -> None:
        tp, sp = list(target.parameters()), list(source.parameters())
        if len(tp) != len(sp) or any(a.shape != b.shape for a, b in zip(tp, sp, strict=True)):
            raise ValueError("an EMA copy must have the same parameters as its source")
        floats = [(a, b) for a, b in zip(tp, sp, strict=True) if a.is_floating_point()]
        self.target_params = [a for a, _ in floats]
        self.source_params = [b for _, b in floats]
        self.target_buffers = list(target.buffers())
        self.source_buffers = list(source.buffers())
        self.target, self.source = target, source
        # FSDP2 (DTensor): a copy sharded like its source updates shard by shard, locally; a whole
        # copy of a sharded source gathers the source at each update
        self.local = all(hasattr(p, "to_local") for p in self.target_params + self.source_params)
        self.gather = not self.local and any(hasattr(p, "full_tensor") for p in self.source_params)

    @classmethod
    def copy_of(cls, source: nn.Module) -> EMA:
        """A frozen deep copy of ``source`` and its EMA tracker."""
        target = copy.deepcopy(source).requires_grad_(False)
        return cls(target, source)

    @torch.no_grad()
    def update(self, weight: Tensor | float) -> None:
        """``target <- target + weight * (source - target)`` for parameters; buffers copied."""
        if self.target_params and self.local:
            target, source = [p.to_local() for p in self.target_params], [p.to_local() for p in self.source_params]
            torch._foreach_lerp_(target, source, weight)
        elif self.target_params:
            source = [p.full_tensor() for p in self.source_params] if self.gather else self.source_params
            torch._foreach_lerp_(self.target_params, source, weight)
        for a, b in zip(self.target_buffers, self.source_buffers, strict=True):
            a.copy_(b)


@torch.no_grad()
def swap_weights(a: nn.Module, b: nn.Module) -> None:
    """Exchange the parameter and buffer values of two modules of identical structure, in place
    (module identities, and anything holding them, are unchanged)."""
    for x, y in zip(list(a.parameters()) + list(a.buffers()), list(b.parameters()) + list(b.buffers()), strict=True):
        tmp = x.detach().clone()
        x.copy_(y)
        y.copy_(tmp)
