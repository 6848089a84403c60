"""An analytic teacher: a Gaussian mixture whose denoiser is exact.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)``. Noised by ``sigma`` the density stays a mixture,
``p_sigma(x) = sum_k pi_k N(x; mu_k, (s_k^2 + sigma^2) I)``, and the posterior mean (Tweedie) is

    E[x0 | x] = sum_k r_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],

with responsibilities ``r_k(x) ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I)``. The probability-flow ODE
of this denoiser is therefore known exactly; for one component it even has a closed-form flow
(:meth:`GaussianMixture.exact_flow`), and in general :func:`fewstep.solvers.reference` integrates
it to any accuracy. Samples, log-density and mode assignment are exact too, so a student's error
can be measured against the truth.

Components can carry class labels: conditioning on label ``c`` restricts the mixture to the
components of class ``c``; the null label (``num_classes``) keeps all of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import Denoiser, append_dims, as_sigma
from fewstep.errors import FewstepError

MIXTURE_FORMAT = "fewstep-gaussian-mixture"  # config.json of a saved mixture


class GaussianMixture(Denoiser):
    """Exact denoiser of an isotropic Gaussian mixture, in any sample shape.

    Args:
        means: ``(K, *sample_shape)`` component means.
        stds: ``(K,)`` component standard deviations (isotropic).
        weights: ``(K,)`` mixture weights (normalised here); uniform when omitted.
        labels: ``(K,)`` class of each component, enabling class conditioning.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        labels: Tensor | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype).expand(K).clone()
        weights = torch.ones(K, dtype=means.dtype) if weights is None else weights.to(means.dtype)
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.sample_shape = tuple(means.shape[1:])
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        self.register_buffer("labels", labels.long() if labels is not None else torch.zeros(K, dtype=torch.long))
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.sigma_data = float((self.stds.pow(2).mean() + self.means.flatten(1).var(0, unbiased=False).mean()).sqrt())

    # --- a mixture saves itself (a run trained on a mixture object keeps a copy) -----------------
    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` (means, stds, weights, labels) and ``config.json``."""
        from fewstep.io import atomic_write_json, save_tensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"means": self.means, "stds": self.stds, "weights": self.log_weights.exp()}
        if self.num_classes:
            tensors["labels"] = self.labels
        save_tensors(folder / "model.safetensors", tensors)
        atomic_write_json(folder / "config.json", {"format": MIXTURE_FORMAT, "sigma_min": self.sigma_min,
                                                   "sigma_max": self.sigma_max})  # fmt: skip
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> GaussianMixture:
        """The mixture :meth:`save` wrote, in eval mode."""
        from fewstep.io import load_tensors, read_json

        cfg = read_json(Path(folder) / "config.json")
        t = load_tensors(Path(folder) / "model.safetensors")
        return cls(t["means"], t["stds"], t["weights"], t.get("labels"), cfg["sigma_min"], cfg["sigma_max"]).eval()

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    def _log_prior(self, cond: Tensor | None, n: int) -> Tensor:
        """``(n, K)`` log-weights, masked to the components of each sample's class."""
        lw = self.log_weights.expand(n, -1)
        if cond is None or self.num_classes == 0:
            return lw
        cond = torch.as_tensor(cond, device=lw.device).long().reshape(n)
        if (cond < 0).any() or (cond > self.num_classes).any():
            raise FewstepError(f"labels must lie in [0, {self.num_classes}] (the last is the null label)")
        keep = (self.labels[None, :] == cond[:, None]) | (cond[:, None] == self.num_classes)
        lw = lw.masked_fill(~keep, float("-inf"))
        return lw - lw.logsumexp(1, keepdim=True)

    def _log_joint(self, x: Tensor, var: Tensor, cond: Any) -> Tensor:
        """``(B, K)``: ``log pi_k + log N(x; mu_k, var_k I)`` with ``var`` of shape ``(B, K)``."""
        xf = x.flatten(1)
        d2 = torch.cdist(xf, self.means.flatten(1).to(xf.dtype)).pow(2)  # (B, K)
        log_n = -0.5 * (d2 / var + self.dim * torch.log(2 * math.pi * var))
        return self._log_prior(cond, x.shape[0]).to(x.dtype) + log_n

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        sigma = as_sigma(sigma, x)
        s2 = self.stds.to(x.dtype).pow(2)[None, :]  # (1, K)
        var = s2 + sigma[:, None] ** 2  # (B, K)
        r = self._log_joint(x, var, cond).softmax(1)  # (B, K) responsibilities
        gain = s2 / var  # (B, K) posterior shrinkage toward each mean
        mu = self.means.to(x.dtype).flatten(1)  # (K, D)
        xf = x.flatten(1)  # (B, D)
        # sum_k r_k [(1 - gain_k) mu_k + gain_k x]
        x0 = (r * (1 - gain)) @ mu + (r * gain).sum(1, keepdim=True) * xf
        return x0.reshape(x.shape)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0, cond: Any = None) -> Tensor:
        """Exact ``log p_sigma(x)`` of the (noised) mixture, per sample."""
        sigma = as_sigma(sigma, x)
        var = self.stds.to(x.dtype).pow(2)[None, :] + sigma[:, None] ** 2
        return self._log_joint(x, var, cond).logsumexp(1)

    def component(self, x: Tensor) -> Tensor:
        """Most likely component of each clean sample (for mode coverage)."""
        var = self.stds.to(x.dtype).pow(2)[None, :].expand(x.shape[0], -1)
        return self._log_joint(x, var, None).argmax(1)

    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """Exact samples of the clean data distribution (optionally of given classes)."""
        logits = self._log_prior(cond, n).float()
        k = torch.multinomial(logits.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn((n, *self.sample_shape), generator=generator, dtype=self.means.dtype)
        return self.means[k] + append_dims(self.stds[k], z.ndim) * z

    def exact_flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Closed-form probability-flow map for a single-component mixture.

        For ``N(mu, s^2 I)`` the ODE ``dx/dsigma = (x - D(x))/sigma`` has the solution
        ``x(sigma') = mu + sqrt((s^2 + sigma'^2) / (s^2 + sigma^2)) (x - mu)``.
        """
        if self.means.shape[0] != 1:
            raise FewstepError("exact_flow needs one component; use fewstep.solvers.reference otherwise")
        s2 = float(self.stds[0]) ** 2
        mu = self.means[0].to(x.dtype)
        return mu + math.sqrt((s2 + sigma_to**2) / (s2 + sigma_from**2)) * (x - mu)


def ring2d(k: int = 8, radius: float = 1.0, std: float = 0.05, dtype=torch.float32) -> GaussianMixture:
    """``k`` Gaussians on a circle, one class each (the classic ``gaussians8`` toy, exact)."""
    angle = torch.arange(k, dtype=dtype) * (2 * math.pi / k)
    means = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return GaussianMixture(means, std, labels=torch.arange(k))


def image_mixture(
    k: int = 4, shape: tuple[int, ...] = (1, 8, 8), std: float = 0.1, seed: int = 0, dtype=torch.float32
) -> GaussianMixture:
    """An image-shaped mixture of ``k`` random "prototype" images in [-1, 1], one class each."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand((k, *shape), generator=g, dtype=dtype) * 2 - 1) * 0.8
    return GaussianMixture(means, std, labels=torch.arange(k))
