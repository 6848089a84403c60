"""Building blocks shared by the consistency-style trajectory methods (CD/LCM and CTM); a helper,
not a method.

- :func:`distance`: the per-sample distances the papers use (L2 / L1 as ``mean_flat`` in
  openai/consistency_models; LCM's elementwise pseudo-Huber ``sqrt(d^2 + c^2) - c``).
- :func:`sampling_sigmas`: the default noise levels of few-step consistency / flow-map sampling.
- :func:`directional_derivative`: a network's derivative along a direction (forward-mode JVP or a
  central finite difference), the time derivative of continuous-time consistency and MeanFlow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.schedules import karras_sigmas

DISTANCES = ("l2", "l1", "huber")


def distance(a: Tensor, b: Tensor, kind: str = "l2", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance ``(B,)``, averaged over pixels."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "huber":  # LCM / diffusers: mean(sqrt(d^2 + c^2) - c), elementwise
        return ((diff.pow(2) + huber_c**2).sqrt() - huber_c).mean(1)
    raise FewstepError(
        f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)} (LPIPS needs ImageNet weights, "
        "which fewstep does not download)"
    )


def sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, given: tuple[float, ...] = ()) -> list[float]:
    """The ``steps`` noise levels a few-step sampler evaluates at, from ``sigma_max`` down.

    ``given`` lists the intermediate levels of the ``len(given) + 1``-step sampler explicitly (the
    CM paper tunes them, e.g. 0.821 for 2-step CIFAR-10); every other step count, and the default,
    uses the inner points of a ``steps + 1``-point Karras grid (rho = 7): 2 steps evaluate at
    ``sigma_max`` and ~2.5 (for sigma in [0.002, 80]).
    """
    if steps < 1:
        raise FewstepError(f"steps must be >= 1, got {steps}")
    if given and len(given) == steps - 1:
        mids = [float(s) for s in given]
        if any(not sigma_min <= s < sigma_max for s in mids) or mids != sorted(mids, reverse=True):
            raise FewstepError(f"intermediate sigmas must decrease within [{sigma_min}, {sigma_max}), got {mids}")
        return [float(sigma_max), *mids]
    grid = karras_sigmas(steps + 1, sigma_min, sigma_max)
    return [float(s) for s in grid[:steps]]


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FewstepError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


def expand_like(v: float | Tensor, x: Tensor) -> Tensor:
    """A ``(B,)`` tensor on ``x``'s device and dtype."""
    return torch.as_tensor(v, device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()


TANGENTS = ("jvp", "fd")


def directional_derivative(
    fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], mode: str = "jvp",
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(fn(*primals), d/dh fn(*(primals + h * tangents)) at h = 0)`` without gradients.

    ``mode = "jvp"``: forward-mode automatic differentiation (:func:`torch.func.jvp`, one pass that
    carries the tangent); ``"fd"``: the central difference ``(fn(p + eps v) - fn(p - eps v)) / 2 eps``
    (two more passes, second-order accurate), for networks or attention kernels without forward-mode
    support. Used for sCM's time derivative of the consistency function and MeanFlow's ``du/dt``.
    """
    check_option("tangent", mode, TANGENTS)
    with torch.no_grad():
        if mode == "jvp":
            return torch.func.jvp(fn, primals, tangents)
        out = fn(*primals)
        hi = fn(*(p + eps * v for p, v in zip(primals, tangents, strict=True)))
        lo = fn(*(p - eps * v for p, v in zip(primals, tangents, strict=True)))
        return out, (hi - lo) / (2 * eps)
