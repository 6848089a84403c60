"""The one contract every model in fewstep speaks: a sigma-space denoiser.

``denoise(x, sigma, cond) -> x0_hat`` with ``x = x0 + sigma * eps`` (the variance-exploding form of
Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv
2206.00364). Teachers, students, fake-score networks and wrapped third-party models all implement
it, so every solver and method works on every model. Other formulations (VP, flow matching,
TrigFlow) convert into it in :mod:`fewstep.conversions`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample tensor ``(B,)`` so it broadcasts against a ``(B, ...)`` tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return ``sigma`` as a ``(B,)`` tensor on ``x``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


CONTRACT = ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes")  # Denoiser's attributes


def copy_contract(module: nn.Module, source: Any) -> None:
    """Give ``module`` (a wrapper or student around ``source``) the :class:`Denoiser` attributes of
    ``source``: its noise range, data scale, sample shape and class count."""
    for name in CONTRACT:
        setattr(module, name, getattr(source, name))


class Denoiser(nn.Module):
    """Base class of the sigma-space denoiser contract.

    Attributes:
        sigma_min: smallest noise level the model was trained on.
        sigma_max: largest noise level (sampling starts from ``sigma_max * z``).
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        sample_shape: shape of one sample, e.g. ``(1, 8, 8)`` or ``(2,)``.
        num_classes: number of class labels (0 when unconditional). Label ``num_classes`` is the
            null label used for classifier-free guidance.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sample_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def null_label(self) -> int:
        return self.num_classes

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Standard normal noise of ``n`` samples of ``sample_shape``."""
        return torch.randn((n, *self.sample_shape), generator=generator, device=device)


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): ``(c_skip, c_out, c_in, c_noise)``."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMDenoiser(Denoiser):
    """Wrap a raw network ``F(c_in * x, c_noise, labels, extra)`` with EDM preconditioning.

    ``D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)`` (Karras et al. 2022, Eq. 7).
    ``extra`` carries additional scalar conditions (a guidance scale, a target time) that the
    network embeds like its noise level; students use it, teachers leave it ``None``.
    """

    def __init__(
        self,
        net: nn.Module,
        sample_shape: tuple[int, ...],
        num_classes: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        self.net = net
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def raw(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None, **net_kw: Any) -> Tensor:
        """The network output ``F`` before the skip connection (used by consistency students);
        ``net_kw`` goes to the network (a UNet's ``after_block``, DSNO's temporal layers)."""
        sigma = as_sigma(sigma, x)
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        return self.net(append_dims(c_in, x.ndim) * x, c_noise, cond, extra, **net_kw)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None, **net_kw: Any) -> Tensor:
        sigma = as_sigma(sigma, x)
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        F_x = self.raw(x, sigma, cond, extra, **net_kw)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * F_x


class CallCounter:
    """Counts the forward calls of a module — its network evaluations, one per batched call — with a
    forward pre-hook, so it also counts a network held inside another object (a method's student).
    A context manager: the hook is removed on exit (``calls`` stays readable)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *_: Any) -> None:
        self.handle.remove()
