"""Train a teacher from scratch with the EDM loss (Karras et al. 2022, arXiv 2206.00364, Sec. 5).

    sigma ~ LogNormal(P_mean, P_std),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
    L = E[ lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2 ]          (EDM Eq. 2 and Table 1)

Class labels are replaced by the null label with probability ``label_dropout`` so the model also
learns the unconditional denoiser, which classifier-free guidance needs (Ho & Salimans 2022).
An EMA of the weights (``ema_halflife_kimg`` as in EDM) is what gets saved.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fewstep.data import Dataset
from fewstep.denoiser import EDMDenoiser, append_dims
from fewstep.teachers.native import build_model, save_model


@dataclass
class TeacherConfig:
    """Options of ``fewstep teacher train``."""

    arch: str = "unet"
    net: dict = field(default_factory=dict)
    batch: int = 256
    lr: float = 2e-3
    max_steps: int = 10000
    minutes: float | None = None
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    label_dropout: float = 0.1
    ema_halflife_kimg: float = 50.0
    warmup_steps: int = 200
    seed: int = 0


def edm_loss(model: EDMDenoiser, x0: torch.Tensor, labels, cfg: TeacherConfig, g: torch.Generator) -> torch.Tensor:
    """EDM's weighted denoising loss, averaged over the batch."""
    sigma = (torch.randn(x0.shape[0], generator=g) * cfg.p_std + cfg.p_mean).exp()
    n = torch.randn(x0.shape, generator=g)
    weight = (sigma**2 + cfg.sigma_data**2) / (sigma * cfg.sigma_data) ** 2
    D = model(x0 + append_dims(sigma, x0.ndim) * n, sigma, labels)
    return (append_dims(weight, x0.ndim) * (D - x0) ** 2).flatten(1).mean(1).mean()


def train_teacher(data: Dataset, cfg: TeacherConfig, out: str | Path, log=print) -> EDMDenoiser:
    """Train an EDM teacher on ``data`` and save its EMA weights to ``out``."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = dict(cfg.net)
    if cfg.arch == "unet":
        net.setdefault("resolution", data.sample_shape[-1])
        net.setdefault("in_channels", data.sample_shape[0])
    else:
        net.setdefault("dim", data.sample_shape[0])
    net["num_classes"] = data.num_classes
    model = build_model(
        cfg.arch,
        net,
        {"sample_shape": list(data.sample_shape), "num_classes": data.num_classes, "sigma_data": cfg.sigma_data},
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    beta = 0.5 ** (cfg.batch / max(cfg.ema_halflife_kimg * 1000, 1e-8))
    deadline = time.monotonic() + cfg.minutes * 60 if cfg.minutes else None
    t0, step = time.monotonic(), 0
    bar = tqdm(total=cfg.max_steps, desc="teacher", dynamic_ncols=True)
    loss_avg = None
    while step < cfg.max_steps and (deadline is None or time.monotonic() < deadline):
        idx = torch.randint(0, len(data), (cfg.batch,), generator=g)
        x0 = data.x[idx]
        labels = None
        if data.labels is not None:
            labels = data.labels[idx].clone()
            labels[torch.rand(cfg.batch, generator=g) < cfg.label_dropout] = data.num_classes
        # linear warm-up, then cosine decay to 5% over the budget (steps or minutes, whichever ends first)
        progress = step / cfg.max_steps
        if deadline is not None:
            progress = max(progress, (time.monotonic() - t0) / (cfg.minutes * 60))
        lr_scale = min(1.0, (step + 1) / cfg.warmup_steps) * (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        )
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        loss = edm_loss(model, x0, labels, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - beta)
        step += 1
        if step % 25 == 0:
            lv = loss.item()
            loss_avg = lv if loss_avg is None else 0.9 * loss_avg + 0.1 * lv
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            bar.update(25)
    bar.close()
    minutes = (time.monotonic() - t0) / 60
    info = {
        "trained_on": data.name,
        "steps": step,
        "minutes": round(minutes, 2),
        "config": asdict(cfg),
        "final_loss": loss_avg,
        "params": sum(p.numel() for p in model.parameters()),
    }
    save_model(ema, out, info)
    log(f"saved teacher to {out} after {step} steps ({minutes:.1f} min)")
    return ema.eval()
