"""Discriminators for adversarial distillation: trainable heads on a frozen feature network.

The discriminator building block (shared block 8 of the project's method reference), reused by
ADD, LADD, UFOGen, SDXL-Lightning, DMD2 and CTM.

- **Feature networks** map ``(x, sigma, labels)`` to a list of feature tensors:
  :class:`TeacherFeatures` reads the teacher's own network at noise level ``sigma`` (LADD,
  Sauer et al. 2024, arXiv 2403.12015, Sec. 3; DMD2's and SDXL-Lightning's encoder discriminator),
  :class:`ImageFeatures` wraps any frozen image network on clean images (ADD's DINOv2, Sauer et al.
  2023, arXiv 2311.17042, Sec. 3.2; fewstep's digits classifier). Both are frozen by default:
  gradients flow *through* them to the input, never *into* them.
- **Heads** (:class:`Head`) turn each feature tensor into per-location logits, optionally
  class-conditioned by projection (Miyato & Koyama 2018, arXiv 1802.05637, Eq. 3):
  ``logit = w^T phi + e_y^T phi / sqrt(dim)``.
- **Losses**: non-saturating (Goodfellow et al. 2014) and hinge (Lim & Ye 2017; used by ADD),
  R1 (Mescheder et al. 2018, arXiv 1801.04406, Eq. 9) and approximate R1 (Lin et al. 2025, APT,
  arXiv 2501.08316, Sec. 3.3: ``||D(x) - D(x + s n)||^2``, which equals ``s^2 ||grad D||^2`` in
  expectation for a locally linear ``D``).

A discriminator returns logits of shape ``(B, K)``: every location of every head is one logit and
the losses average over all of them. A frozen feature network is *not* a registered submodule of
:class:`Discriminator` (its weights stay out of the discriminator's optimizer and checkpoint); a
method lists it in ``Method.frozen()`` instead.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fewstep.denoiser import EDMDenoiser, append_dims, as_sigma, edm_scalings
from fewstep.errors import FewstepError
from fewstep.networks.mlp import MLP
from fewstep.networks.unet import ResBlock, UNet

LossKind = Literal["hinge", "nonsaturating"]

# --- losses --------------------------------------------------------------------------------------


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: LossKind = "hinge") -> Tensor:
    """Discriminator loss, averaged over every logit.

    hinge: ``E[relu(1 - D(real))] + E[relu(1 + D(fake))]``;
    non-saturating: ``E[softplus(-D(real))] + E[softplus(D(fake))]`` (= ``-log s(D_r) - log(1 - s(D_f))``).
    """
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise FewstepError(f"unknown GAN loss {kind!r}; use 'hinge' or 'nonsaturating'")


def g_loss(fake_logits: Tensor, kind: LossKind = "hinge") -> Tensor:
    """Generator loss: hinge ``-E[D(fake)]``; non-saturating ``E[softplus(-D(fake))]``."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise FewstepError(f"unknown GAN loss {kind!r}; use 'hinge' or 'nonsaturating'")


def r1_penalty(logits: Tensor, inputs: Tensor) -> Tensor:
    """R1: ``E_b ||grad_{x_b} mean_k D_k(x_b)||^2`` on real inputs (multiply by ``gamma / 2``).

    ``inputs`` must require grad and ``logits`` (``(B, K)``) must be computed from them; the graph is
    kept so the penalty can be back-propagated into the discriminator.
    """
    (grad,) = torch.autograd.grad(logits.mean(1).sum(), inputs, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def approx_r1_penalty(logits: Tensor, logits_perturbed: Tensor) -> Tensor:
    """Approximate R1 (APT): ``E_b mean_k (D_k(x_b) - D_k(x_b + s n_b))^2``; no double backward."""
    return (logits - logits_perturbed).pow(2).mean()


@contextmanager
def no_param_grad(*modules: nn.Module) -> Iterator[None]:
    """Build a graph in which ``modules``' parameters are constants (gradients still flow through
    them to their inputs); their ``requires_grad`` flags are restored on exit. Used for the
    generator loss so the discriminator's weights receive no gradient from it."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


# --- feature networks ----------------------------------------------------------------------------


class FeatureNetwork(nn.Module):
    """``forward(x, sigma, labels) -> list[Tensor]`` of ``(B, C, H, W)`` or ``(B, C)`` features."""

    def forward(self, x: Tensor, sigma: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover


def _unet_features(net: UNet, x: Tensor, c_noise: Tensor, labels: Tensor | None, multi: bool) -> list[Tensor]:
    """Features of a fewstep :class:`UNet`: the output of each encoder level (multi) and the middle."""
    emb = net.embed(c_noise, labels, None)
    h = net.conv_in(x)
    feats = []
    for layer in net.down:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        else:  # a downsampling layer closes an encoder level
            feats.append(h)
            h = layer(h)
    for layer in net.mid:
        h = layer(h, emb)
    return [*feats, h] if multi else [h]


def _mlp_features(net: MLP, x: Tensor, c_noise: Tensor, labels: Tensor | None, multi: bool) -> list[Tensor]:
    e = net.embed(c_noise, labels, None)
    h = net.inp(x)
    feats = []
    for block in net.blocks:
        h = h + block(h + e)
        feats.append(h)
    return feats if multi else feats[-1:]


class TeacherFeatures(FeatureNetwork):
    """The teacher's own network read at noise level ``sigma`` (LADD's "teacher as discriminator
    backbone"). ``levels="bottleneck"`` returns the middle features, ``"multi"`` every encoder level
    as well. With ``trainable=True`` the backbone is a trainable copy (UFOGen, SDXL-Lightning
    initialise their discriminator from the teacher's encoder); otherwise it shares the frozen
    teacher's weights. ``labels`` condition the backbone (``None`` = the null label). A teacher
    without a network (an analytic mixture) lends its ``stand_in``: the network its students were
    warmed up into, which approximates its denoiser (:mod:`fewstep.train.warmup`)."""

    def __init__(
        self, teacher: EDMDenoiser, levels: Literal["bottleneck", "multi"] = "multi", trainable: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(teacher, EDMDenoiser) and isinstance(getattr(teacher, "stand_in", None), EDMDenoiser):
            teacher = teacher.stand_in
        net = getattr(teacher, "net", None)
        if not isinstance(teacher, EDMDenoiser) or not isinstance(net, (UNet, MLP)):
            raise FewstepError(
                f"teacher features need a fewstep UNet/MLP teacher, not {type(teacher).__name__}; "
                "pass a feature network (ImageFeatures), or let the run warm a student network up first"
            )
        if levels not in ("bottleneck", "multi"):
            raise FewstepError(f"levels must be 'bottleneck' or 'multi', got {levels!r}")
        self.net = copy.deepcopy(net).train().requires_grad_(True) if trainable else net
        self.trainable, self.multi = trainable, levels == "multi"
        self.sigma_data, self.sigma_min = teacher.sigma_data, teacher.sigma_min
        self.num_classes = teacher.num_classes

    def forward(self, x: Tensor, sigma: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        if sigma is None:
            raise FewstepError("teacher features need the noise level sigma of x")
        sigma = as_sigma(sigma, x).clamp_min(self.sigma_min)
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        if labels is not None and self.num_classes == 0:
            labels = None
        fn = _unet_features if isinstance(self.net, UNet) else _mlp_features
        return fn(self.net, append_dims(c_in, x.ndim) * x, c_noise, labels, self.multi)


class _Stop(Exception):
    """Ends a diffusers UNet's forward pass once its middle block has run."""


class DiffusersFeatures(FeatureNetwork):
    """A diffusers teacher's ``UNet2DConditionModel``/``UNet2DModel`` read at noise level ``sigma``:
    the output of each down block (multi) and of the middle block, caught by forward hooks (the
    decoder never runs). The teacher's own input scaling, timestep and conditioning (its prompt
    table's labels; ``None`` = the unconditional embedding) are used. ``trainable=True`` reads a
    trainable copy of the network (UFOGen, SDXL-Lightning)."""

    def __init__(self, teacher: Any, levels: str = "multi", trainable: bool = False) -> None:
        super().__init__()
        if levels not in ("bottleneck", "multi"):
            raise FewstepError(f"levels must be 'bottleneck' or 'multi', got {levels!r}")
        if not hasattr(teacher.model, "mid_block"):
            raise FewstepError(f"{type(teacher.model).__name__} has no UNet encoder to read features from")
        self.den = teacher.trainable_copy().train().requires_grad_(True) if trainable else teacher
        self.trainable, self.multi = trainable, levels == "multi"
        self.sigma_min, self.num_classes = teacher.sigma_min, teacher.num_classes

    def forward(self, x: Tensor, sigma: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        if sigma is None:
            raise FewstepError("teacher features need the noise level sigma of x")
        den, model, feats = self.den, self.den.model, []
        sigma = as_sigma(sigma, x).clamp_min(self.sigma_min)
        cond = den._check_cond(labels, x.shape[0], x)
        a, _, t = den.formulation.native(sigma)

        def keep(_m, _i, out):
            feats.append(out[0] if isinstance(out, tuple) else out)

        def stop(m, i, out):
            keep(m, i, out)
            raise _Stop

        hooks = [b.register_forward_hook(keep) for b in model.down_blocks] if self.multi else []
        hooks.append(model.mid_block.register_forward_hook(stop))
        try:
            den.network(x * append_dims(a, x.ndim), t, cond)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return [f.to(x.dtype) for f in feats]


def teacher_features(teacher: Any, levels: str = "multi", trainable: bool = False) -> FeatureNetwork:
    """The features of a denoiser's own network: :class:`DiffusersFeatures` for a diffusers teacher,
    else :class:`TeacherFeatures`."""
    if type(teacher).__name__ == "DiffusersDenoiser":
        return DiffusersFeatures(teacher, levels, trainable)
    return TeacherFeatures(teacher, levels, trainable)


class ImageFeatures(FeatureNetwork):
    """Any frozen image network ``f(x) -> Tensor | list[Tensor]`` on clean samples; ``sigma`` and
    ``labels`` are ignored (ADD's DINOv2 role). ``f`` is frozen in place."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise FewstepError(f"a feature network must be a torch nn.Module, got {type(module).__name__}")
        self.module = module.eval().requires_grad_(False)
        self.trainable = False

    def forward(self, x: Tensor, sigma: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        out = self.module(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]


# --- heads and the discriminator -----------------------------------------------------------------


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 32) if c >= 8 else 1, c)


class Head(nn.Module):
    """Per-location logits from one feature tensor, optionally class-projected.

    Maps ``(B, C, H, W)`` through conv3x3 -> GroupNorm -> LeakyReLU(0.2) to ``phi`` ``(B, D, H, W)``
    (a linear/LayerNorm stack for ``(B, C)``), then ``logit = conv1x1(phi) + <e_y, phi> / sqrt(D)``.
    """

    def __init__(self, channels: int, spatial: bool, hidden: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), _norm(hidden), nn.LeakyReLU(0.2))
            self.out = nn.Conv2d(hidden, 1, 1)
        else:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2))
            self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.num_classes, self.hidden = num_classes, hidden

    def forward(self, f: Tensor, labels: Tensor | None = None) -> Tensor:
        phi = self.body(f)  # (B, D, H, W) or (B, D)
        logit = self.out(phi)  # (B, 1, H, W) or (B, 1)
        if self.embed is not None:
            if labels is None:
                labels = torch.full((f.shape[0],), self.num_classes, device=f.device, dtype=torch.long)
            e = append_dims(self.embed(labels.long()), phi.ndim)  # (B, D[, 1, 1])
            logit = logit + (e * phi).sum(1, keepdim=True) / math.sqrt(self.hidden)
        return logit.flatten(1)  # (B, H*W) or (B, 1)


class Discriminator(nn.Module):
    """Trainable heads on a feature network: ``D(x, sigma, labels) -> (B, K)`` logits.

    Args:
        features: a :class:`FeatureNetwork`; frozen ones stay unregistered (see module docstring).
        sample_shape: shape of one sample, used once to probe the feature shapes.
        num_classes: class-conditional heads by projection when > 0 (label ``num_classes`` = null).
        hidden: width of each head.
        paired: heads see the features of ``x`` concatenated with those of a ``context`` sample
            (SDXL-Lightning's conditional discriminator ``D(x_t, x_{t-ns})``, arXiv 2402.13929, Sec. 3.3).
    """

    def __init__(
        self,
        features: FeatureNetwork,
        sample_shape: tuple[int, ...],
        num_classes: int = 0,
        hidden: int = 64,
        paired: bool = False,
    ) -> None:
        super().__init__()
        if getattr(features, "trainable", False):
            self.backbone = features
        else:
            self.backbone = None
            object.__setattr__(self, "_frozen_features", features)  # not a submodule: no params, no state
        self.paired = paired
        ref = next(itertools.chain(features.parameters(), features.buffers()), torch.empty(0))
        with torch.no_grad():  # probe the feature shapes once
            probe = features(torch.zeros(2, *sample_shape, dtype=ref.dtype, device=ref.device), torch.ones(2), None)
        mult = 2 if paired else 1
        heads = (Head(mult * f.shape[1], f.ndim == 4, hidden, num_classes) for f in probe)
        self.heads = nn.ModuleList(heads).to(dtype=ref.dtype, device=ref.device)

    @property
    def features(self) -> FeatureNetwork:
        return self.backbone if self.backbone is not None else self._frozen_features

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | None = None,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_sigma: Tensor | None = None,
    ) -> Tensor:
        feats = self.features(x, sigma, labels)
        if self.paired:
            if context is None:
                raise FewstepError("a paired discriminator needs the context sample (x_t) as well")
            ctx = self.features(context, context_sigma, labels)
            feats = [torch.cat([f, c], 1) for f, c in zip(feats, ctx, strict=True)]
        return torch.cat([head(f, labels) for head, f in zip(self.heads, feats, strict=True)], 1)


def r1_on(disc: Callable[[Tensor], Tensor], x_real: Tensor) -> Tensor:
    """R1 of ``disc`` at ``x_real``: runs ``disc`` on a grad-requiring copy of the inputs."""
    x = x_real.detach().requires_grad_(True)
    return r1_penalty(disc(x), x)


__all__ = [
    "Discriminator",
    "FeatureNetwork",
    "Head",
    "ImageFeatures",
    "TeacherFeatures",
    "DiffusersFeatures",
    "teacher_features",
    "approx_r1_penalty",
    "d_loss",
    "g_loss",
    "no_param_grad",
    "r1_on",
    "r1_penalty",
]
