"""Pieces shared by the adversarial methods (ADD, LADD, UFOGen); a helper, not a method.

- Noise levels "analogous" to the papers' timesteps: a level of a unit-variance latent model
  (Stable Diffusion's scaled-linear DDPM schedule; SD3's rectified-flow time) is mapped to the
  level of equal signal-to-noise ratio for data of standard deviation ``sigma_data``,
  ``sigma = sigma_data * sigma_latent`` (capped at the teacher's ``sigma_max``). SD's timestep 999
  becomes ``7.3`` for ``sigma_data = 0.5``; as SD does at t = 999, sampling starts there from pure
  noise (``x = 7.3 z``), ignoring the tiny signal such a level still carries in training.
- :func:`few_step_levels`: the trained levels a ``steps``-step sampler visits; the sampler of ADD
  (Sauer et al. 2023, arXiv 2311.17042, Sec. 3.1), LADD and UFOGen's multi-step mode is
  :func:`fewstep.solvers.renoise_sample` — denoise to ``x0_hat`` at one level, re-noise it with fresh
  noise to the next level, repeat.
- :func:`feature_network`: resolve a discriminator backbone by name ("teacher", "teacher-bottleneck",
  "classifier" = fewstep's shipped digits CNN, or on a latent teacher whose VAE decodes to 1x32x32 the
  shipped MNIST CNN behind that decoder) or take a user's ``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.conversions import flow_t_to_sigma, vp_sigmas
from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.networks.discriminator import FeatureNetwork, ImageFeatures, teacher_features

FEATURES = ("teacher", "teacher-bottleneck", "classifier")


def sd_sigmas() -> Tensor:
    """The 1000 noise levels of Stable Diffusion's scaled-linear schedule (betas from 0.00085 to
    0.012, linear in sqrt), in sigma-space of unit-variance latents (float64)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return vp_sigmas((1 - betas).cumprod(0))


def sd_levels(timesteps: tuple[int, ...], sigma_data: float, sigma_max: float) -> tuple[float, ...]:
    """Levels of SD timesteps at equal SNR for this data (at most ``sigma_max``)."""
    s = sd_sigmas()
    return tuple(min(float(s[t]) * sigma_data, float(sigma_max)) for t in timesteps)


def rf_levels(times: tuple[float, ...], sigma_data: float, sigma_max: float) -> tuple[float, ...]:
    """Levels of rectified-flow times ``t`` (``sigma = t/(1-t)``) at equal SNR; ``t = 1`` -> ``sigma_max``."""
    as_sigma = lambda t: sigma_data * float(flow_t_to_sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    return tuple(float(sigma_max) if t >= 1 else min(as_sigma(t), sigma_max) for t in times)


def check_levels(levels: tuple[float, ...], teacher: Denoiser) -> tuple[float, ...]:
    levels = tuple(float(s) for s in levels)
    if not levels or list(levels) != sorted(levels, reverse=True) or levels[-1] <= 0:
        raise FewstepError(f"student levels must be positive and decreasing, got {list(levels)}")
    if levels[0] > teacher.sigma_max * (1 + 1e-6):
        raise FewstepError(f"the first student level {levels[0]} exceeds the teacher's sigma_max {teacher.sigma_max}")
    return levels


def few_step_levels(levels: tuple[float, ...], steps: int) -> list[float]:
    """The ``steps`` of the trained ``levels`` a sampler visits: evenly spaced indices from the first
    (4 levels: 1 step -> [0], 2 -> [0, 2], 4 -> all, as SDXL-Turbo's 999 / 999,499 / 999..249)."""
    n = len(levels)
    if not 1 <= steps <= n:
        raise FewstepError(f"this student was trained at {n} noise levels; sample with 1..{n} steps, not {steps}")
    return [levels[(i * n) // steps] for i in range(steps)]


def noised(x0: Tensor, sigma: Tensor, noise: Tensor | None = None) -> Tensor:
    """``x0 + sigma eps`` with per-sample ``sigma`` (B,)."""
    return x0 + append_dims(sigma, x0.ndim) * (torch.randn_like(x0) if noise is None else noise)


def pick(levels: tuple[float, ...], n: int, device, dtype=torch.float32) -> Tensor:
    """``n`` levels drawn uniformly from ``levels`` (global RNG)."""
    table = torch.tensor(levels, device=device, dtype=dtype)
    return table[torch.randint(len(levels), (n,), device=device)]


class ClassifierBackbone(nn.Module):
    """The shipped digits CNN as a discriminator backbone: its last conv map and its penultimate
    vector (as ADD reads several DINOv2 layers)."""

    def __init__(self, cnn: nn.Module) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.cnn.conv(x)  # (B, 2c, 2, 2)
        return [h, torch.relu(self.cnn.fc(h.flatten(1)))]  # and (B, feature_dim)


def decoded_shape(teacher: Denoiser) -> tuple[int, ...] | None:
    """The image shape a latent teacher's VAE decodes its samples to (``None``: a pixel-space teacher)."""
    if getattr(teacher, "vae", None) is None or not callable(getattr(teacher, "decode", None)):
        return None
    ref = next(teacher.vae.parameters())
    with torch.no_grad():
        return tuple(
            teacher.decode(torch.zeros(1, *teacher.sample_shape, dtype=ref.dtype, device=ref.device)).shape[1:]
        )


class DecodedFeatures(FeatureNetwork):
    """A pixel-space backbone behind a latent teacher's frozen VAE decoder, ``f(decode(x))``: ADD reads
    DINOv2 on decoded images. Gradients reach ``x`` through the decoder; neither part trains."""

    def __init__(self, teacher: Denoiser, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: the teacher is frozen elsewhere
        self.trainable = False

    def forward(self, x: Tensor, sigma: Tensor | None = None, labels: Tensor | None = None) -> list[Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the decoder's attention in plain ops: R1 differentiates twice
            out = self.module(self._teacher.decode(x, grad=True))
        return list(out) if isinstance(out, (list, tuple)) else [out]


def feature_network(spec: str | nn.Module, teacher: Denoiser, trainable: bool = False) -> FeatureNetwork:
    """A discriminator backbone from a name or a user module (see module docstring)."""
    if isinstance(spec, FeatureNetwork):
        return spec
    if isinstance(spec, nn.Module):
        return ImageFeatures(spec)
    if spec in ("teacher", "teacher-bottleneck"):
        return teacher_features(teacher, "multi" if spec == "teacher" else "bottleneck", trainable)
    if spec == "classifier":
        from fewstep.networks.classifier import load_classifier

        if tuple(teacher.sample_shape) == (1, 8, 8):
            return ImageFeatures(ClassifierBackbone(load_classifier()))
        if decoded_shape(teacher) == (1, 32, 32):
            from fewstep.teachers import builtin_path

            return DecodedFeatures(teacher, ClassifierBackbone(load_classifier(builtin_path("mnist-classifier"))))
        raise FewstepError(
            "the shipped classifiers read 1x8x8 digits or (through a latent teacher's VAE) 1x32x32 MNIST; use "
            "features=teacher for this teacher"
        )
    raise FewstepError(f"unknown discriminator features {spec!r}; use one of {', '.join(FEATURES)} or pass a module")
