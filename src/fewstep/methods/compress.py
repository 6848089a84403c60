"""Compression: a smaller denoiser learns the teacher's (BK-SDM, Kim et al. 2023, "BK-SDM:
Architecturally Compressed Stable Diffusion for Efficient Text-to-Image Generation",
arXiv 2305.15798, Sec. 3.2).

The student is a denoiser of its own architecture (``--student-net half``, ``quarter`` or a
network config). Per sample, with ``x_sigma = x0 + sigma n`` (x0 real data, EDM's lognormal
training levels):

    L = lambda_task  * lambda(sigma) || D_s(x_sigma, sigma) - x0 ||^2                (the denoising task)
      + lambda_out   * lambda(sigma) || D_s(x_sigma, sigma) - D_t(x_sigma, sigma) ||^2   (output-level KD)
      + lambda_feat  * sum_b || P_b(h_s,b) - h_t,b ||^2                              (feature-level KD)

with ``lambda(sigma)`` EDM's weight, ``h_b`` the output of residual block ``b`` (UNet: every
``ResBlock`` of the down path, the middle and the up path; MLP: every residual block) and ``P_b``
a learned 1x1 projection from the student's width to the teacher's (FitNets' "hint" regressor,
Romero et al. 2015) where the widths differ, the identity where they agree (BK-SDM's case).
Feature KD needs the same block structure in both networks (a width-scaled preset has it);
otherwise, and for a teacher without a network (an analytic mixture), only the first two terms
apply.

It is both a method (a small multi-step student: sample it with Heun like the teacher) and the
warm-up of every method whose student must start where the teacher is (``fewstep distill
--student-net quarter --method cd`` trains this first, :mod:`fewstep.train.warmup`).

Checked against BK-SDM's reference (Nota-NetsPresso/BK-SDM ``src/kd_train_text_to_image.py``):
the three terms with weights 1, 1, 1 (``--lambda_sd``, ``--lambda_kd_output``,
``--lambda_kd_feat``); the feature loss summed over the hooked blocks (down, mid, up blocks) as
per-block MSEs; the teacher frozen in eval mode, its features without gradient; the student in
train mode; noise levels drawn as in the teacher's own training; no EMA in the loss.

Deviations: x0-prediction with EDM's weight instead of SD's epsilon-MSE (the same objective up to
each level's weight, EDM's parameterisation); the student here starts from fresh weights (its
widths differ from the teacher's, BK-SDM keeps the pruned teacher's weights), so the optimizer is
fewstep's from-scratch recipe (``fewstep teacher train``: lr 2e-3, betas (0.9, 0.99), 200-step
linear warm-up) rather than BK-SDM's 5e-5 fine-tuning rate; class labels are dropped to the null
label with probability 0.1 so the student keeps the teacher's unconditional mode (guidance).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.denoiser import Denoiser, EDMDenoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import drop_labels
from fewstep.losses import edm_weight
from fewstep.methods import register
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.schedules import linear_warmup, sample_lognormal
from fewstep.students import copy_teacher, set_dropout


@dataclass
class CompressConfig:
    lambda_task: float = 1.0  # BK-SDM --lambda_sd
    lambda_out: float = 1.0  # --lambda_kd_output
    lambda_feat: float = 1.0  # --lambda_kd_feat (0: output KD only)
    lr: float = 2e-3  # from-scratch rate (fewstep teacher train); BK-SDM: 5e-5 on a pruned copy
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    grad_clip: float | None = None
    p_mean: float = -1.2  # EDM Table 1 (the teacher's training levels)
    p_std: float = 1.2
    label_dropout: float = 0.1
    dropout: float | None = 0.0  # the student's dropout
    solver: str = "heun"  # sampler of the student (the teacher's)


def blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The residual blocks whose outputs feature KD matches (UNet: down, middle, up; MLP: all)."""
    from fewstep.networks.unet import ResBlock

    net = getattr(denoiser, "net", None)
    if net is None:
        return []
    if hasattr(net, "blocks"):  # MLP
        return list(net.blocks)
    return [m for part in ("down", "mid", "up") for m in getattr(net, part, []) if isinstance(m, ResBlock)]


def _width(block: nn.Module) -> int:
    if isinstance(block, nn.Sequential):  # an MLP block: Linear(h, h) last
        return block[-1].out_features
    return block.conv1.out_channels


@contextmanager
def recording(modules: list[nn.Module]):
    """Collect the outputs of ``modules`` (in order) while the context is open."""
    outs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in modules]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


@register
class Compress(Method):
    name = "compress"
    family = "output"
    paper = "2305.15798"
    title = "BK-SDM: output- and feature-level distillation into a smaller denoiser"
    needs_data = True
    starts_at_teacher = False
    Config = CompressConfig
    default_steps = (4, 8, 18)

    def __init__(self, teacher: Denoiser, config: CompressConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        if c.solver not in ("euler", "heun"):
            raise FewstepError(f"compress samples with euler or heun, got solver {c.solver!r}")
        self.student = student if student is not None else copy_teacher(teacher)
        if not isinstance(self.student, EDMDenoiser):
            raise FewstepError(f"compress trains a denoiser; got a {type(self.student).__name__} student")
        set_dropout(self.student, c.dropout)
        s_blocks, t_blocks = blocks(self.student), blocks(teacher) if isinstance(teacher, EDMDenoiser) else []
        self.matched = c.lambda_feat > 0 and len(s_blocks) == len(t_blocks) > 0
        projections = []
        if self.matched:
            for sb, tb in zip(s_blocks, t_blocks, strict=True):
                ws, wt = _width(sb), _width(tb)
                flat = isinstance(sb, nn.Sequential)
                projections.append(nn.Identity() if ws == wt else (nn.Linear(ws, wt) if flat else nn.Conv2d(ws, wt, 1)))
        self.projections = nn.ModuleList(projections)

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "projections": self.projections}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        warmup = partial(linear_warmup, steps=c.warmup_steps) if c.warmup_steps > 0 else None
        return {
            "student": OptimizerSpec(
                ["student", "projections"], lr=c.lr, betas=c.betas, grad_clip=c.grad_clip, lr_schedule=warmup
            )  # fmt: skip
        }

    def loss_terms(self, x0: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """The three terms (unweighted, batch means) at given data, labels, levels and noise."""
        x = x0 + append_dims(sigma, x0.ndim) * noise
        w = edm_weight(sigma, self.student.sigma_data)
        with recording(blocks(self.student) if self.matched else []) as hs:
            d_s = self.student(x, sigma, labels)
        with torch.no_grad(), recording(blocks(self.teacher) if self.matched else []) as ht:
            d_t = self.teacher(x, sigma, labels)
        terms = {
            "task": (w * (d_s - x0).pow(2).flatten(1).mean(1)).mean(),
            "out": (w * (d_s - d_t).pow(2).flatten(1).mean(1)).mean(),
        }
        if self.matched:
            terms["feat"] = sum(F.mse_loss(p(h), t) for p, h, t in zip(self.projections, hs, ht, strict=True))
        return terms

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        if batch.x is None:
            raise FewstepError("compress needs real data in the batch; pass --data")
        c, x0, labels = self.config, batch.x, batch.labels
        sigma = sample_lognormal(x0.shape[0], c.p_mean, c.p_std).to(x0.device, x0.dtype)
        labels = drop_labels(labels, c.label_dropout, self.teacher.num_classes)
        t = self.loss_terms(x0, labels, sigma, torch.randn_like(x0))
        loss = c.lambda_task * t["task"] + c.lambda_out * t["out"]
        if "feat" in t:
            loss = loss + c.lambda_feat * t["feat"]
        return {"student": loss}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        from fewstep.solvers import sample, steps_for_nfe

        solver = self.config.solver  # at most ``steps`` network evaluations
        return sample(self.student, noise, solver, steps_for_nfe(solver, steps), cond)[0]
