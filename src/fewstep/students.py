"""Student parameterisations (DESIGN.md §3). Each wraps an :class:`EDMDenoiser` initialised from
the teacher, so a student starts as a copy of the teacher's network.

- :class:`ConsistencyStudent` — x0 predictor with the consistency boundary condition
  ``f(x, sigma_min) = x`` (Song et al. 2023, arXiv 2303.01469, Eq. 8 / Appendix C).
- :class:`FlowMapStudent` — ``G(x, t, s)`` jumping from noise level ``t`` to ``s <= t``, CTM's
  parameterisation ``G = (s/t) x + (1 - s/t) g(x, t, s)`` (Kim et al. 2023, arXiv 2310.02279, Eq. 5);
  ``s`` enters the network as an extra scalar condition.
- :class:`OneStepGenerator` — ``G(z) = D(sigma_init z, sigma_init)``, the generator of KD, DMD,
  SiD and Diff-Instruct (SiD feeds ``sigma_init = 2.5``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, EDMDenoiser, append_dims, as_sigma
from fewstep.errors import FewstepError


def copy_teacher(teacher: Denoiser, extra_dims: int = 0) -> EDMDenoiser:
    """A trainable copy of an EDM-preconditioned teacher, optionally with ``extra_dims`` new scalar
    inputs whose embeddings start at zero, so the copy initially equals the teacher.

    A teacher that defines ``trainable_copy(extra_dims)`` (a diffusers teacher) makes its own copy.
    """
    if hasattr(teacher, "trainable_copy"):
        return teacher.trainable_copy(extra_dims)
    if not isinstance(teacher, EDMDenoiser):
        raise FewstepError(
            f"cannot initialise a student from a {type(teacher).__name__}; students copy an EDM-preconditioned "
            "fewstep network (native or wrapped) — build the student network yourself for other teachers"
        )
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    if extra_dims:
        from fewstep.networks.embed import CondEmbedding

        old = student.net.embed
        base = old.pos.dim
        emb = old.noise_mlp[-1].out_features
        ref = next(old.parameters())  # the new embedding lives on the teacher's device and dtype
        new = CondEmbedding(base, emb, old.num_classes, old.extra_dims + extra_dims).to(ref.device, ref.dtype)
        new.load_state_dict(old.state_dict(), strict=False)
        for mlp in list(new.extra_mlps)[old.extra_dims :]:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        student.net.embed = new
        student.net.config.extra_dims = new.extra_dims
    return student


def set_dropout(module: nn.Module, p: float | None) -> None:
    """Set the dropout rate of every layer inside a student or fake score (``None`` keeps what the
    teacher copy has): ``nn.Dropout`` layers (diffusers networks), fewstep blocks with a float
    ``dropout`` attribute, and fewstep network configs (so a saved student records it)."""
    if p is None:
        return
    if not 0.0 <= p < 1.0:
        raise FewstepError(f"dropout must lie in [0, 1), got {p}")
    import dataclasses

    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = p
        config = getattr(m, "config", None)
        if dataclasses.is_dataclass(config) and isinstance(getattr(config, "dropout", None), float):
            config.dropout = p


def consistency_student(teacher: Denoiser, extra_dims: int = 0) -> nn.Module:
    """The consistency student of ``teacher``: :class:`ConsistencyStudent` over a teacher copy, or
    the teacher's own ``consistency_student(extra_dims)`` (a diffusers teacher's LCM student,
    which stock diffusers schedulers can sample)."""
    if hasattr(teacher, "consistency_student"):
        return teacher.consistency_student(extra_dims)
    return ConsistencyStudent(copy_teacher(teacher, extra_dims))


class ConsistencyStudent(nn.Module):
    """``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise)`` with the consistency
    scalings ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
    ``c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2)``, so ``f(x, sigma_min) = x`` exactly.
    ``extra`` (e.g. LCM's guidance scale) is passed through to the network."""

    def __init__(self, net: EDMDenoiser) -> None:
        super().__init__()
        self.net = net
        for k in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes"):
            setattr(self, k, getattr(net, k))

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None) -> Tensor:
        sigma = as_sigma(sigma, x)
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = sd * (sigma - smin) / (sigma**2 + sd**2).sqrt()
        F_x = self.net.raw(x, sigma, cond, extra)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F_x


class FlowMapStudent(nn.Module):
    """CTM's ``G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)`` with ``g`` an EDM denoiser that
    receives ``c_noise(s) = ln(s)/4`` as an extra input (``s = 0`` is clamped to ``sigma_min``
    for the embedding only). ``G(x, t, t) = x`` and ``G(x, t, 0) = g(x, t, 0)``."""

    def __init__(self, net: EDMDenoiser) -> None:
        super().__init__()
        self.net = net
        for k in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes"):
            setattr(self, k, getattr(net, k))

    def g(self, x: Tensor, t: Tensor, s: Tensor, cond: Any = None) -> Tensor:
        t, s = as_sigma(t, x), as_sigma(s, x)
        s_emb = s.clamp_min(self.sigma_min).log() / 4
        return self.net(x, t, cond, extra=s_emb[:, None])

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Any = None) -> Tensor:
        t, s = as_sigma(t, x), as_sigma(s, x)
        ratio = append_dims(s / t, x.ndim)
        return ratio * x + (1 - ratio) * self.g(x, t, s, cond)


class OneStepGenerator(nn.Module):
    """``G(z, c) = D(sigma_init z, sigma_init, c)``: a one-step generator initialised from the
    teacher's denoiser at noise level ``sigma_init``."""

    def __init__(self, net: EDMDenoiser, sigma_init: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)
        for k in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes"):
            setattr(self, k, getattr(net, k))

    def forward(self, z: Tensor, cond: Any = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=z.dtype)
        return self.net(self.sigma_init * z, sigma, cond)


# --- a student's parameterisation, as data (a chain records it so that reloading rebuilds it) ---
def layout(student: nn.Module) -> list[str] | None:
    """A student's parameterisation, outermost first (``["generator:80", "consistency"]``), or
    ``None`` for a network fewstep cannot rebuild from the teacher."""
    if isinstance(student, OneStepGenerator):
        inner = layout(student.net)
        return None if inner is None else [f"generator:{student.sigma_init!r}", *inner]
    if isinstance(student, ConsistencyStudent) and _plain(student.net):
        return ["consistency"]
    if isinstance(student, FlowMapStudent):
        return ["flowmap"]
    if _plain(student):
        return ["denoiser"]
    return None


def _plain(net: nn.Module) -> bool:
    """A teacher-shaped EDM denoiser without extra scalar inputs."""
    config = getattr(getattr(net, "net", None), "config", None)
    return type(net) is EDMDenoiser and not getattr(config, "extra_dims", 0)


def build_layout(spec: list[str], teacher: Denoiser) -> nn.Module:
    """A student of parameterisation ``spec`` around fresh teacher copies (weights come later)."""
    head, rest = spec[0], spec[1:]
    if head.startswith("generator:"):
        return OneStepGenerator(build_layout(rest, teacher), float(head.split(":", 1)[1]))
    if head == "consistency":
        return ConsistencyStudent(copy_teacher(teacher))
    if head == "flowmap":
        return FlowMapStudent(copy_teacher(teacher, extra_dims=1))
    if head == "denoiser":
        return copy_teacher(teacher)
    raise FewstepError(f"unknown student layout {spec!r} in the run's config.json")
