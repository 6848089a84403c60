"""Classifier-free guidance as a teacher-side wrapper (Ho & Salimans 2022, arXiv 2207.12598).

``cfg(denoiser, scale)`` returns a denoiser ``D_w = D_u + w (D_c - D_u)``, where ``D_u`` sees the
null label. ``w = 1`` is the plain conditional model and ``w = 0`` the unconditional one. Papers
that write ``(1 + w') D_c - w' D_u`` (Meng et al. 2023; LCM) use ``w' = w - 1``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import Denoiser, append_dims, as_sigma, copy_contract
from fewstep.errors import FewstepError


class CFGDenoiser(Denoiser):
    """Guided denoiser; ``scale`` is a float or a per-sample ``(B,)`` tensor."""

    def __init__(self, inner: Denoiser, scale: float | Tensor) -> None:
        super().__init__()
        if not getattr(inner, "num_classes", 0):
            raise FewstepError("guidance needs a class-conditional model (num_classes > 0)")
        self.inner = inner
        self.scale = scale
        copy_contract(self, inner)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, scale: float | Tensor | None = None) -> Tensor:
        w = self.scale if scale is None else scale
        if cond is None:
            raise FewstepError("guidance needs class labels: pass cond")
        if isinstance(w, (int, float)) and w == 1.0:
            return self.inner(x, sigma, cond)
        null = torch.full_like(cond, self.inner.num_classes)
        s = as_sigma(sigma, x)
        d = self.inner(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, null]))
        d_c, d_u = d.chunk(2)
        w = torch.as_tensor(w, dtype=x.dtype, device=x.device)
        w = append_dims(w, x.ndim) if w.ndim else w
        return d_u + w * (d_c - d_u)


def drop_labels(labels: Tensor | None, p: float, null: int) -> Tensor | None:
    """``labels`` with each replaced by the ``null`` label with probability ``p`` (the label dropout that
    trains a model's unconditional branch for guidance; Ho & Salimans 2022)."""
    if labels is None or p <= 0:
        return labels
    return torch.where(torch.rand(labels.shape[0], device=labels.device) < p, null, labels)


def cfg(denoiser: Denoiser, scale: float | Tensor) -> Denoiser:
    """Wrap ``denoiser`` with classifier-free guidance of strength ``scale`` (1 = conditional).

    A denoiser with its own ``guided(scale)`` (a text-conditioned diffusers teacher, guided with
    its unconditional embedding) provides the wrapper itself.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return denoiser
    if hasattr(denoiser, "guided"):
        return denoiser.guided(scale)
    return CFGDenoiser(denoiser, scale)
