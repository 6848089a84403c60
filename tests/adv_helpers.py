"""Small shared pieces of the adversarial-method tests: 2-D networks and a minimal training loop
that follows the engine's contract (optimizers due by ``OptimizerSpec.due``, losses keyed by
optimizer, EMA copies updated after their source's optimizer steps)."""

from __future__ import annotations

import torch
from torch import nn

from fewstep.denoiser import EDMDenoiser
from fewstep.methods.base import Batch, Method
from fewstep.networks.mlp import MLP, MLPConfig


def mlp_denoiser(hidden: int = 32, depth: int = 2, num_classes: int = 0, sigma_max: float = 80.0) -> EDMDenoiser:
    net = MLP(MLPConfig(dim=2, hidden=hidden, depth=depth, num_classes=num_classes))
    return EDMDenoiser(net, (2,), num_classes, sigma_max=sigma_max)


class PointFeatures(nn.Module):
    """A frozen random feature map of 2-D points that keeps the coordinates (a stand-in for
    DINOv2 on toy data)."""

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(2, dim, generator=g) * 2)

    def forward(self, x):
        return torch.cat([x, torch.sin(x @ self.w)], 1)


def run(
    method: Method, data_x, data_y, steps: int, batch: int = 64, counts: dict | None = None, start: int = 0
) -> dict:
    """Train ``method`` for iterations ``start .. start + steps - 1``; returns how often each
    optimizer stepped."""
    specs = method.optimizers()
    opts = {}
    for name, spec in specs.items():
        params = [p for n in spec.networks for p in getattr(method, n).parameters() if p.requires_grad]
        opts[name] = torch.optim.Adam(params, lr=spec.lr, betas=spec.betas)
    counts = counts if counts is not None else {name: 0 for name in specs}
    emas = method.emas()
    for i in range(start, start + steps):
        due = {n for n, s in specs.items() if s.due(i)}
        x = y = None
        if data_x is not None:
            idx = torch.randint(len(data_x), (batch,))
            x = data_x[idx]
            y = None if data_y is None else data_y[idx]
        losses = method.losses(Batch(batch, x, y), i, due)
        assert set(losses) <= due
        for name in losses:
            opts[name].zero_grad(set_to_none=True)
        for loss in losses.values():
            loss.backward()
        for name in losses:
            opts[name].step()
            counts[name] += 1
        stepped = {n for name in losses for n in specs[name].networks}
        for ema_name, spec in emas.items():
            if spec.source in stepped:
                d = spec.value(i)
                with torch.no_grad():
                    for pe, ps in zip(
                        getattr(method, ema_name).parameters(), getattr(method, spec.source).parameters(), strict=True
                    ):
                        pe.lerp_(ps, 1 - d)
    return counts


def nearest_mode_distance(x, means) -> float:
    """Mean distance of samples to the nearest mixture mean."""
    return float(torch.cdist(x.double(), means.double()).min(1).values.mean())


class AnalyticNet(nn.Module):
    """A raw EDM network ``F`` whose preconditioned output is a mixture's exact denoiser, plus a
    zero-initialised MLP correction (so a copy starts exact and can be trained)."""

    def __init__(self, mixture, sigma_data: float, hidden: int = 32) -> None:
        super().__init__()
        self.mixture, self.sigma_data = mixture, sigma_data
        self.correction = MLP(MLPConfig(dim=mixture.dim, hidden=hidden, depth=2, num_classes=mixture.num_classes))
        self.config = self.correction.config

    def forward(self, x_in, c_noise, labels=None, extra=None):
        sigma = (4 * c_noise).exp()
        sd2 = self.sigma_data**2
        x = x_in * (sd2 + sigma**2).sqrt()[:, None]
        c_skip = (sd2 / (sigma**2 + sd2))[:, None]
        c_out = (sigma * self.sigma_data / (sigma**2 + sd2).sqrt())[:, None]
        exact = (self.mixture(x, sigma, labels) - c_skip * x) / c_out
        return exact + self.correction(x_in, c_noise, labels)


def analytic_edm_teacher(mixture) -> EDMDenoiser:
    """The mixture as a frozen EDM-preconditioned fewstep network (students can copy it)."""
    sd = mixture.sigma_data
    net = AnalyticNet(mixture, sd)
    teacher = EDMDenoiser(net, mixture.sample_shape, mixture.num_classes, mixture.sigma_min, mixture.sigma_max, sd)
    return teacher.eval().requires_grad_(False)
