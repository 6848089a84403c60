"""DSNO, the diffusion sampling neural operator (Zheng, Nie, Vahdat, Azizzadenesheli & Anandkumar
2022, "Fast sampling of diffusion models via operator learning", arXiv 2211.13449).

One forward pass maps the starting noise to the teacher's whole ODE trajectory at ``M`` levels
``sigma_1 > ... > sigma_M = 0``; the last is the sample. The network is the teacher's UNet run on
the ``M`` levels side by side (a batch of ``B M``), each with its own time embedding, and
*temporal convolution* layers after the residual blocks mix the ``M`` copies along time: a Fourier
layer over the time axis (the reference's ``SpectralConv1d`` + ``TimeConv``),

    h <- h + LeakyReLU( iFFT_M( W_k FFT_M(h)_k  for the lowest ``modes`` frequencies k ) ),

with ``W_k`` a complex channel-mixing matrix per frequency (:class:`TimeConv`). The student is a
:class:`~fewstep.students.FlowMapStudent` of the teacher (``G(x_T, T, sigma_i)`` predicts the ODE
state at ``sigma_i`` from ``x_T = sigma_max z``) wrapped by :class:`TrajectoryOperator`, so before
training each time point is the teacher's one DDIM step from ``x_T`` to ``sigma_i``. The loss is the
per-level distance to the teacher's trajectory weighted by ``sqrt(SNR)`` clamped to [1, 1e4]
(``1 / sigma_i``; the sample's term dominates):

    L = mean_i  w_i  E || X_theta(z)_i - x_teacher(sigma_i; sigma_max z) ||_1,   w_i = clamp(1 / sigma_i, 1, 1e4)

Teacher trajectories are generated once (Heun on the teacher's Karras grid with the ``M`` levels
inserted; cached like ``fewstep pairs``).

Defaults checked against the reference code (devzhk/DSNO-pytorch: ``models/tddpmm.py``,
``models/layers.py``, ``utils/loss.py``, ``train_imagenet.py``/``configs``): ``M = 4`` levels at
VP-cosine times (0.75, 0.5, 0.25, 0) — ImageNet's uniform schedule — i.e. ``sigma = tan(pi t / 2)``
= (2.414, 1, 0.414, 0); a time-conv layer after every residual block of the down and up paths and
one in the middle (after the attention block, none after the second middle block); ``modes = 2``
frequencies; weights ``U[0, 1/(C_in C_out))`` for real and imaginary parts, no bias; LeakyReLU
(slope 0.01); the FFT in float32; L1 per level (ImageNet; CIFAR-10 uses a VGG feature distance)
with the ``sqrt(exp(logsnr)).clamp(1, 1e4)`` weights; Adam lr 2e-4, betas (0.9, 0.999), a linear
warm-up from 0.001x over 10,000 iterations (``warmup``); EMA 0.9999 for sampling (the engine's
ramped evaluation EMA); the network initialised from the teacher with the time-conv layers new.

Cost: one pass whose batch is ``M`` times the sample batch, so ~``M`` UNet evaluations of compute
run in parallel (the paper's "one model forward pass"); ``fewstep eval`` counts it as 1 NFE and its
measured sampling time shows the rest.

Deviations: the levels' time embedding is the flow map's zero-initialised target-level input
(the reference embeds each time point's logSNR in the teacher's own embedding, as its teacher is a
DDPM++ that the student replaces); the top of the trajectory is ``sigma_max z`` (the reference's
``t = 1`` of a VP model); 10,000 trajectories by default (``num_trajectories``; the reference
uses its whole trajectory database).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.denoiser import Denoiser, copy_contract
from fewstep.errors import FewstepError
from fewstep.io import cache_dir, load_tensors, save_tensors
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.unet import UNet
from fewstep.schedules import karras_sigmas
from fewstep.solvers import heun
from fewstep.students import FlowMapStudent, copy_teacher, set_dropout


class TimeConv(nn.Module):
    """``h + LeakyReLU(SpectralConv1d_time(h))`` on features ``(B M, C, H, W)`` of ``M`` time points."""

    def __init__(self, channels: int, modes: int = 2) -> None:
        super().__init__()
        self.modes = modes
        scale = 1.0 / (channels * channels)
        self.weight = nn.Parameter(scale * torch.rand(channels, channels, modes, 2))

    def forward(self, h: Tensor, m: int) -> Tensor:
        bm, c, hh, ww = h.shape
        x = h.reshape(bm // m, m, c, hh, ww).float()
        xf = torch.fft.rfft(x, dim=1)  # (B, M // 2 + 1, C, H, W)
        k = min(self.modes, xf.shape[1])
        w = torch.view_as_complex(self.weight[:, :, :k].float().contiguous())  # (C, C, k)
        mixed = torch.einsum("bmihw,iom->bmohw", xf[:, :k], w)
        out = torch.cat([mixed, xf.new_zeros(xf.shape[0], xf.shape[1] - k, c, hh, ww)], 1)
        y = torch.fft.irfft(out, n=m, dim=1).reshape(bm, c, hh, ww).to(h.dtype)
        return h + F.leaky_relu(y)


class TrajectoryOperator(nn.Module):
    """``z -> (B, M, *shape)``: the ODE states at ``levels`` from ``sigma_max z`` in one pass of a
    flow-map student whose UNet carries a :class:`TimeConv` after its residual blocks."""

    def __init__(self, flow_map: FlowMapStudent, levels: tuple[float, ...], modes: int = 2) -> None:
        super().__init__()
        net = getattr(flow_map.net, "net", flow_map.net)
        if not isinstance(net, UNet):
            raise FewstepError(f"dsno inserts temporal layers into a fewstep UNet; this teacher's network is a "
                               f"{type(net).__name__} (use a UNet teacher)")  # fmt: skip
        self.flow_map = flow_map
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
        chans = net.block_channels()
        n_down = sum(1 for b in net.down if not isinstance(b, nn.AvgPool2d))
        skip = n_down + 1  # the second middle block has none (reference)
        self.time_convs = nn.ModuleDict({str(k): TimeConv(ch, modes) for k, ch in enumerate(chans) if k != skip})
        copy_contract(self, flow_map)

    def forward(self, z: Tensor, cond: Any = None) -> Tensor:
        b, m = z.shape[0], len(self.levels)
        x = (self.sigma_max * z).repeat_interleave(m, 0)  # (B M, ...): sample-major
        t = torch.full((b * m,), self.sigma_max, device=z.device, dtype=z.dtype)
        s = self.levels.to(z).repeat(b)
        cond = cond.repeat_interleave(m, 0) if isinstance(cond, Tensor) else cond

        def mix(k: int, h: Tensor) -> Tensor:
            conv = self.time_convs[str(k)] if str(k) in self.time_convs else None
            return h if conv is None else conv(h, m)

        return self.flow_map(x, t, s, cond, after_block=mix).reshape(b, m, *z.shape[1:])  # G(x_T, T, s_i)


def vp_cosine_levels(times: tuple[float, ...]) -> tuple[float, ...]:
    """Sigma-space levels of VP-cosine times ``t`` (``sigma = tan(pi t / 2)``), the reference's time points."""
    return tuple(math.tan(math.pi * t / 2) for t in times)


@dataclass
class DSNOConfig:
    times: tuple[float, ...] = (0.75, 0.5, 0.25, 0.0)  # VP-cosine times of the M levels (ImageNet: uniform)
    modes: int = 2
    num_trajectories: int = 10000
    solver_steps: int = 18  # Heun steps of the teacher's Karras grid (the levels are inserted)
    guidance: float = 1.0
    loss: str = "l1"  # l1 (ImageNet) | l2
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 10000  # linear warm-up from 0.001 x lr
    grad_clip: float | None = None
    dropout: float | None = None  # None keeps the teacher's


@register
class DSNO(Method):
    name = "dsno"
    family = "trajectory"
    paper = "2211.13449"
    title = "DSNO: a neural operator that predicts the teacher's trajectory in one pass (temporal Fourier layers)"
    needs_data = False
    chains = False  # its student is a trajectory operator, not a denoiser another run can hand over
    Config = DSNOConfig
    default_steps = (1,)

    def __init__(self, teacher: Denoiser, config: Any = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.loss not in ("l1", "l2") or not c.times or c.times[-1] != 0.0 or list(c.times) != sorted(c.times)[::-1]:
            raise FewstepError(f"dsno needs decreasing times ending at 0 and loss l1|l2; got {c.times}, {c.loss!r}")
        flow_map = FlowMapStudent(copy_teacher(teacher, extra_dims=1))
        set_dropout(flow_map, c.dropout)
        self.student = TrajectoryOperator(flow_map, vp_cosine_levels(c.times), c.modes)
        self._trajectories: tuple[Tensor, Tensor, Tensor | None] | None = None

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c, warm = self.config, max(self.config.warmup, 1)
        schedule = lambda k: min(1.0, 0.001 + (1 - 0.001) * k / warm)  # noqa: E731  (LinearLR from 0.001)
        return {"student": OptimizerSpec(["student"], c.lr, c.betas, grad_clip=c.grad_clip, lr_schedule=schedule)}

    def weights(self) -> Tensor:
        """``sqrt(SNR) = 1 / sigma`` per level, clamped to [1, 1e4]."""
        lv = self.student.levels
        return torch.where(lv > 0, 1 / lv.clamp_min(1e-12), torch.full_like(lv, 1e4)).clamp(1.0, 1e4)

    def grid_with_levels(self) -> list[float]:
        """The teacher's Karras grid of ``solver_steps`` Heun steps with the levels inserted, descending."""
        t, levels = self.teacher, [float(v) for v in self.student.levels]
        grid = karras_sigmas(self.config.solver_steps, t.sigma_min, t.sigma_max).tolist()
        return sorted({*grid, *levels}, reverse=True)

    @torch.no_grad()
    def teacher_trajectory(self, z: Tensor, cond: Any = None) -> Tensor:
        """The teacher's Heun ODE from ``sigma_max z`` read at the levels: ``(B, M, *shape)``."""
        from fewstep.guidance import cfg

        t, c = self.teacher, self.config
        levels = [float(v) for v in self.student.levels]
        grid = self.grid_with_levels()
        den = cfg(t, c.guidance)  # the teacher itself at scale 1
        states, x = {}, z * t.sigma_max

        def keep(i: int, x_next: Tensor, x0: Tensor, s: float) -> None:
            states[grid[i + 1]] = x_next

        heun(den, x, torch.tensor(grid, dtype=torch.float64), cond, callback=keep)
        return torch.stack([states[v] for v in levels], 1)

    def trajectories(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(noise, states, labels)`` of ``num_trajectories`` teacher trajectories, generated once into
        the cache (``$FEWSTEP_CACHE``) and read from it afterwards."""
        if self._trajectories is None:
            from fewstep.pairs import teacher_fingerprint
            from fewstep.seeding import seeded_labels, seeded_noise

            t, c = self.teacher, self.config
            root = cache_dir() / "trajectories"
            key = (
                f"{teacher_fingerprint(t)[:16]}-heun{c.solver_steps}-w{c.guidance:g}-n{c.num_trajectories}-"
                + "_".join(f"{v:.4g}" for v in self.student.levels.tolist())
            )
            path = root / f"{key}.safetensors"
            if path.is_file():
                d = load_tensors(path)
            else:
                from tqdm.auto import tqdm

                zs, xs, ys = [], [], []
                for lo in tqdm(range(0, c.num_trajectories, 256), desc="dsno: teacher trajectories", unit="batch"):
                    seeds = list(range(lo, min(lo + 256, c.num_trajectories)))
                    z = seeded_noise(seeds, t.sample_shape).to(device)
                    y = seeded_labels(seeds, t.num_classes)
                    y = None if y is None else y.to(device)
                    xs.append(self.teacher_trajectory(z, y).cpu())
                    zs.append(z.cpu())
                    ys.append(y.cpu() if y is not None else None)
                d = {"noise": torch.cat(zs), "states": torch.cat(xs)}
                if t.num_classes:
                    d["labels"] = torch.cat(ys)
                save_tensors(path, d)
            self._trajectories = (d["noise"], d["states"], d.get("labels"))
        return self._trajectories

    def loss_on(self, pred: Tensor, states: Tensor) -> Tensor:
        """The weighted per-level distance between predicted and teacher trajectories ``(B, M, ...)``."""
        diff = (pred - states).flatten(2)
        per_level = (diff.abs() if self.config.loss == "l1" else diff.pow(2)).mean(2).mean(0)  # (M,)
        return (per_level * self.weights().to(per_level)).mean()

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        device = self.student.levels.device
        noise, states, labels = self.trajectories(device)
        idx = torch.randint(len(noise), (batch.size,))
        cond = None if labels is None else labels[idx].to(device)
        return {"student": self.loss_on(self.student(noise[idx].to(device), cond), states[idx].to(device))}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"dsno predicts the trajectory in one pass; sample with steps=1 (got {steps})")
        return self.student(noise, cond)[:, -1]
