"""Shared conditioning embeddings: noise level, extra scalars, class labels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; as in EDM's networks)."""

    def __init__(self, dim: int, max_positions: int = 1000, scale: float = 16.0) -> None:
        super().__init__()
        self.dim, self.max_positions, self.scale = dim, max_positions, scale

    def forward(self, x: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_positions) * torch.arange(half, device=x.device, dtype=x.dtype) / half)
        # c_noise = ln(sigma)/4 spans about [-1.6, 1.1]: frequencies scale..scale/max_positions
        args = (x.reshape(-1, 1) * self.scale) * freqs[None, :]
        return torch.cat([args.cos(), args.sin()], dim=1)


class CondEmbedding(nn.Module):
    """Embed ``c_noise``, optional extra scalars and optional class labels into one vector.

    ``num_classes`` labels plus one null label (index ``num_classes``) for classifier-free
    guidance. ``extra_dims`` scalars (a guidance scale, a target noise level) each get their own
    sinusoidal embedding and MLP, added to the noise embedding.
    """

    def __init__(self, base: int, emb: int, num_classes: int = 0, extra_dims: int = 0) -> None:
        super().__init__()
        self.pos = PositionalEmbedding(base)
        self.noise_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.extra_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb)) for _ in range(extra_dims)
        )
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.num_classes, self.extra_dims = num_classes, extra_dims

    def forward(self, c_noise: Tensor, labels: Tensor | None, extra: Tensor | None) -> Tensor:
        e = self.noise_mlp(self.pos(c_noise))
        if self.extra_dims:
            if extra is None:
                raise ValueError(f"this network needs {self.extra_dims} extra condition(s); pass extra")
            extra = extra.reshape(e.shape[0], self.extra_dims).to(e.dtype)
            for j, mlp in enumerate(self.extra_mlps):
                e = e + mlp(self.pos(extra[:, j]))
        if self.label is not None:
            if labels is None:
                labels = torch.full((e.shape[0],), self.num_classes, device=e.device, dtype=torch.long)
            e = e + self.label(labels.long().reshape(-1))
        return e
