"""Test support for the trajectory methods (progressive, TRACT, guided): tiny EDM teachers and a
minimal training loop that follows the Method contract (optimizer ratios, EMA updates after each
step) without the engine."""

from __future__ import annotations

import torch
from torch import nn

from fewstep.methods.base import Batch, Method
from fewstep.teachers.native import build_model


def tiny_teacher(dim: int = 2, num_classes: int = 3, dtype=torch.float64, seed: int = 0, sigma_max: float = 10.0):
    """An EDM-preconditioned MLP with a random (non-zero) output layer, frozen."""
    torch.manual_seed(seed)
    t = build_model(
        "mlp",
        {"dim": dim, "hidden": 32, "depth": 2, "num_classes": num_classes},
        {"sample_shape": [dim], "num_classes": num_classes, "sigma_max": sigma_max},
    )
    nn.init.normal_(t.net.out.weight, std=0.3)
    return t.to(dtype).eval().requires_grad_(False)


def batch(n: int = 16, dim: int = 2, num_classes: int = 3, dtype=torch.float64, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype) * 0.5
    return Batch(size=n, x=x, labels=torch.randint(0, num_classes, (n,), generator=g))


@torch.no_grad()
def ema_update(method: Method, iteration: int) -> None:
    for name, spec in method.emas().items():
        ema, src = getattr(method, name), getattr(method, spec.source)
        d = spec.value(iteration)
        for pe, ps in zip(ema.parameters(), src.parameters(), strict=True):
            pe.lerp_(ps, 1.0 - d)


def train(method: Method, make_batch, iterations: range, lr: float | None = None) -> list[float]:
    """Step every due optimizer on each iteration, then update the EMAs; return the losses."""
    specs = method.optimizers()
    nets = method.networks()
    opts = {
        n: torch.optim.Adam([p for k in s.networks for p in nets[k].parameters()], lr=lr or s.lr)
        for n, s in specs.items()
    }
    out = []
    for i in iterations:
        due = {n for n, s in specs.items() if s.due(i)}
        losses = method.losses(make_batch(i), i, due)
        for n, loss in losses.items():
            opts[n].zero_grad()
            loss.backward()
            opts[n].step()
            out.append(float(loss.detach()))
        ema_update(method, i)
    return out


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def tiny_data(n: int = 256, dim: int = 2, num_classes: int = 3, seed: int = 0):
    from fewstep.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * 0.5
    return Dataset(x, torch.randint(num_classes, (n,), generator=g), num_classes, "tiny")


def engine_resume_matches(tmp_path, method: str, steps: int, split: int, **options) -> Method:
    """Run ``method`` through the engine for ``steps`` iterations straight and as ``split`` +
    resume; assert the two runs end with identical networks and EMA copies; return the first."""
    from fewstep.train import distill

    common = dict(data=tiny_data(), batch=8, sample_n=0, cpu=True, log_every=1, checkpoint_every=split)
    teacher = tiny_teacher(dtype=torch.float32)
    straight = distill(teacher, method, max_steps=steps, out=tmp_path / "a", **common, **options)
    distill(teacher, method, max_steps=split, out=tmp_path / "b", **common, **options)
    resumed = distill(teacher, method, max_steps=steps, out=tmp_path / "b", resume=True, **common, **options)
    names = ["student", *straight.emas()]
    for name in names:
        assert same(getattr(straight, name), getattr(resumed, name)), name
    return straight
