"""Per-step overhead of the training engine against the same work written by hand.

The workload is the engine's reference method (``denoise``: EDM loss, Adam, evaluation EMA) on an
8x8 class-conditional UNet the size of the digits teacher, batch 64. The engine runs
``fewstep.train.train`` itself (data feeding, autocast context, per-optimizer backward, device-side
non-finite skip, loss statistics, fused Adam, EMA, logging every 50 steps). The hand-written loop
does the same forward, backward, fused Adam step and EMA update with plain PyTorch and nothing else.

Per-step time is ``(T(N2) - T(N1)) / (N2 - N1)`` for each loop, which cancels one-off costs (set-up,
the engine's final checkpoint). Engine and hand runs alternate so both see the same machine load;
the report gives the median over repeats of wall-clock and process CPU time, and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine_overhead.py [--model unet|mlp] [--repeats 7] [--n1 50] [--n2 250]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from fewstep.data import Dataset
from fewstep.denoiser import append_dims
from fewstep.methods.denoise import Denoise
from fewstep.teachers.native import build_model
from fewstep.train.config import TrainConfig
from fewstep.train.loop import train

BATCH = 64
MODELS = {  # (architecture, network, sample shape): the digits teacher's size, and a 2-D toy MLP
    "unet": (
        "unet",
        {"resolution": 8, "in_channels": 1, "channels": 32, "channel_mult": [1, 2], "blocks": 2},
        (1, 8, 8),
    ),
    "mlp": ("mlp", {"dim": 2, "hidden": 64, "depth": 2}, (2,)),
}


def teacher(model: str):
    torch.manual_seed(0)
    arch, net, shape = MODELS[model]
    den = {"sample_shape": list(shape), "num_classes": 10}
    return build_model(arch, {**net, "num_classes": 10}, den).eval().requires_grad_(False)


def data(model: str) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, *MODELS[model][2], generator=g) * 2 - 1
    return Dataset(x, torch.randint(10, (1000,), generator=g), 10, "bench")


def engine(steps: int, t, d) -> tuple[float, float]:
    cfg = TrainConfig(max_steps=steps, batch=BATCH, log_every=50, checkpoint_every=10**9, sample_n=0, cpu=True)
    method = Denoise(t)
    with tempfile.TemporaryDirectory() as out:
        w0, c0 = time.perf_counter(), time.process_time()
        train(method, cfg, out, data=d)
        return time.perf_counter() - w0, time.process_time() - c0


def by_hand(steps: int, t, d) -> tuple[float, float]:
    """The same denoising fine-tuning step as plain PyTorch: the baseline."""
    w0, c0 = time.perf_counter(), time.process_time()
    student = copy.deepcopy(t).train().requires_grad_(True)
    ema = copy.deepcopy(student).requires_grad_(False)
    params, ema_params = list(student.parameters()), list(ema.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    sd = student.sigma_data
    for _ in range(steps):
        idx = torch.randint(len(d.x), (BATCH,), generator=g)
        x0, labels = d.x[idx], d.labels[idx]
        sigma = (torch.randn(BATCH) * 1.2 - 1.2).exp()
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        D = student(x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0), sigma, labels)
        loss = (append_dims(weight, x0.ndim) * (D - x0) ** 2).flatten(1).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - 0.999)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--n1", type=int, default=50)
    p.add_argument("--n2", type=int, default=250)
    p.add_argument("--model", choices=tuple(MODELS), default="unet")
    args = p.parse_args()
    torch.set_num_threads(1)
    t, d = teacher(args.model), data(args.model)
    print(f"{args.model}: {sum(p.numel() for p in t.parameters()) / 1e6:.3f}M parameters, batch {BATCH}, 1 thread")
    engine(10, t, d), by_hand(10, t, d)  # warm-up: lazy initialisation, first-call costs
    results = {"engine": [], "hand": []}
    for r in range(args.repeats):
        for name, fn in (
            (("engine", engine), ("hand", by_hand)) if r % 2 == 0 else (("hand", by_hand), ("engine", engine))
        ):
            a, b = fn(args.n1, t, d), fn(args.n2, t, d)
            results[name].append(((b[0] - a[0]) / (args.n2 - args.n1), (b[1] - a[1]) / (args.n2 - args.n1)))
    for name, values in results.items():
        wall, cpu = (statistics.median(v[i] for v in values) * 1e3 for i in (0, 1))
        print(f"{name:>6}: {wall:.2f} ms/step wall, {cpu:.2f} ms/step CPU (median of {args.repeats})")
    for i, clock in enumerate(("wall", "CPU")):
        ratios = [e[i] / h[i] for e, h in zip(results["engine"], results["hand"], strict=True)]
        print(f"overhead ({clock}): median of paired ratios {statistics.median(ratios) - 1:+.1%}, "
              f"range {min(ratios) - 1:+.1%} .. {max(ratios) - 1:+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
