"""A residual MLP for low-dimensional data (2-D toys, analytic mixtures)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.networks.embed import CondEmbedding


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    num_classes: int = 0
    extra_dims: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MLPConfig:
        return cls(**d)


class MLP(nn.Module):
    """``F(x, c_noise, labels, extra)`` for ``x`` of shape ``(B, dim)``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = CondEmbedding(64, c.hidden, c.num_classes, c.extra_dims)
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden)
            )
            for _ in range(c.depth)
        )
        self.out = nn.Linear(c.hidden, c.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        e = self.embed(c_noise, labels, extra)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + e)
        return self.out(F.silu(h))
