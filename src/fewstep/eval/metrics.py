"""Sample-quality metrics over features: FID, KID, precision/recall, sliced Wasserstein, and exact
metrics for the analytic Gaussian-mixture teacher.

- FID (Heusel et al. 2017, arXiv 1706.08500) and KID (Binkowski et al. 2018, arXiv 1801.01401) are
  torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, fed with features we
  already extracted (an identity feature module), so the maths is theirs and reference statistics
  can be cached: FID's state is exactly :class:`FeatureStats` (count, sum, sum of outer products).
- Precision/recall with k-NN manifolds (Kynkäänniemi et al. 2019, arXiv 1904.06991, k = 3).
- Sliced Wasserstein-1 distance for 2-D samples (random directions, scipy's exact 1-D W1).
- For :class:`~fewstep.teachers.analytic.GaussianMixture`: mean log-likelihood under the true
  mixture, and the mass each mode receives.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError

MIN_FID_SAMPLES = 500  # below this FID's bias and spread swamp differences between samplers


class _Identity(nn.Module):
    """A 'feature extractor' for torchmetrics that passes precomputed features through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, f: Tensor) -> Tensor:
        return f


@dataclass
class FeatureStats:
    """Sufficient statistics of a feature set for FID: ``n``, ``sum`` (D,), ``outer`` = sum f f^T (D, D)."""

    n: int
    sum: Tensor
    outer: Tensor

    @classmethod
    def of(cls, f: Tensor) -> FeatureStats:
        f = f.double()
        return cls(f.shape[0], f.sum(0), f.T @ f)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def to_tensors(self) -> dict[str, Tensor]:
        return {"n": torch.tensor([self.n]), "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> FeatureStats:
        return cls(int(t["n"][0]), t["sum"].double(), t["outer"].double())


def _check_count(n: int, what: str, minimum: int) -> None:
    if n < minimum:
        raise FewstepError(
            f"{what}: {n} samples are too few for a stable FID (minimum {minimum}; the protocol uses 10,000); raise --n"
        )


def fid(real: Tensor | FeatureStats, fake: Tensor | FeatureStats, min_samples: int = MIN_FID_SAMPLES) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (or their cached stats)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = real if isinstance(real, FeatureStats) else FeatureStats.of(real)
    fake = fake if isinstance(fake, FeatureStats) else FeatureStats.of(fake)
    if real.dim != fake.dim:
        raise FewstepError(f"feature sizes differ ({real.dim} vs {fake.dim}); use the same extractor for both sets")
    _check_count(fake.n, "generated set", min_samples)
    _check_count(real.n, "reference set", min_samples)
    metric = FrechetInceptionDistance(feature=_Identity(real.dim))
    for prefix, s in (("real", real), ("fake", fake)):
        setattr(metric, f"{prefix}_features_sum", s.sum.clone())
        setattr(metric, f"{prefix}_features_cov_sum", s.outer.clone())
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(s.n))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # states were set directly, not through update()
        warnings.simplefilter("ignore", UserWarning)
        return float(metric.compute().clamp_min(0))


def kid(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel): ``(mean, std)`` over
    random subsets of ``min(subset_size, n_real, n_fake)`` samples, seeded."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise FewstepError("KID needs at least 2 samples in each set")
    with warnings.catch_warnings():  # torchmetrics warns that KID keeps all features: we pass them in
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_radius(f: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Distance of each point to its k-th nearest other point in the same set."""
    out = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], f)  # (c, N); the point itself sits at distance 0
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside(query: Tensor, support: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    """Whether each query falls in some hypersphere ``||q - support_i|| <= radii_i``."""
    out = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], support)  # (c, M)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-2): the fraction of fake
    samples inside the real k-NN manifold, and of real samples inside the fake one."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise FewstepError(f"precision/recall with k={k} needs more than {k} samples in each set")
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _kth_radius(real, k)).double().mean()
    recall = _inside(real, fake, _kth_radius(fake, k)).double().mean()
    return float(precision), float(recall)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1: the mean over random unit directions of the exact 1-D W1 distance
    between the projected samples (scipy), with seeded directions."""
    from scipy.stats import wasserstein_distance

    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise FewstepError(f"sliced Wasserstein takes two (N, D) sets of one D, got {tuple(x.shape)}, {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(projections, x.shape[1], generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    px, py = (x.double() @ theta.T).numpy(), (y.double() @ theta.T).numpy()
    return float(sum(wasserstein_distance(px[:, j], py[:, j]) for j in range(projections)) / projections)


def mixture_metrics(mixture, x: Tensor, labels: Tensor | None = None, min_mass: float = 0.25) -> dict:
    """Exact metrics of samples ``x`` against an analytic Gaussian mixture.

    Returns ``loglik`` (mean log-density under the true clean mixture, per dimension too),
    ``mode_mass`` (fraction of samples nearest each component), ``modes_covered`` (components that
    get at least ``min_mass`` times their true weight), ``mass_tv`` (total variation between the
    mode masses and the true weights) and, given labels, ``label_agreement`` (the fraction of samples
    whose component has the requested class).
    """
    x = x.to(mixture.means.dtype)
    ll = mixture.log_prob(x)
    comp = mixture.component(x)
    K = mixture.means.shape[0]
    mass = torch.bincount(comp, minlength=K).double() / x.shape[0]
    weights = mixture.log_weights.double().exp()
    out = {
        "loglik": float(ll.mean()),
        "loglik_per_dim": float(ll.mean()) / mixture.dim,
        "mode_mass": mass.tolist(),
        "modes_covered": int((mass >= min_mass * weights).sum()),
        "modes": K,
        "mass_tv": float(0.5 * (mass - weights).abs().sum()),
    }
    if labels is not None and mixture.num_classes:
        ok = mixture.labels[comp] == labels.to(mixture.labels.device)
        real_labels = labels < mixture.num_classes
        out["label_agreement"] = float(ok[real_labels].double().mean()) if real_labels.any() else math.nan
    return out


def gaussian_entropy(dim: int, std: float) -> float:
    """Differential entropy of ``N(mu, std^2 I_dim)``: ``dim/2 (1 + ln(2 pi std^2))`` — the negative
    of the expected log-likelihood of exact samples of a one-component mixture."""
    return 0.5 * dim * (1 + math.log(2 * math.pi * std**2))
