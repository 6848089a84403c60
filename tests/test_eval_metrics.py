"""Metrics prove themselves on constructed cases with known answers."""

import math

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval.metrics import (
    FeatureStats,
    fid,
    gaussian_entropy,
    kid,
    mixture_metrics,
    precision_recall,
    sliced_wasserstein,
)
from fewstep.teachers.analytic import GaussianMixture


def _gauss(n, d, seed, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_fid_of_a_set_against_itself_is_zero():
    x = _gauss(1000, 8, 0)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("shift", [0.1, 0.5, 2.0])
def test_fid_of_a_shifted_copy_is_the_squared_shift(shift):
    # Same samples moved by m: the covariances are identical, so FID = ||m||^2 exactly.
    x = _gauss(1000, 8, 0)
    m = torch.full((8,), shift, dtype=torch.float64)
    assert fid(x, x + m) == pytest.approx(8 * shift**2, rel=1e-6)


def test_fid_of_two_gaussian_samples_approaches_the_closed_form():
    # N(0, I) vs N(0, s^2 I) in D dims: FID = D (1 + s^2 - 2 s). Independent samples add an O(D^2/n) bias.
    d, s = 4, 1.5
    a, b = _gauss(20000, d, 1), _gauss(20000, d, 2, scale=s)
    exact = d * (1 + s**2 - 2 * s)
    assert fid(a, b) == pytest.approx(exact, abs=0.05)
    assert fid(a, b + 1.0) > fid(a, b) + 3.0  # grows with a shift


def test_fid_from_cached_stats_equals_fid_from_features():
    a, b = _gauss(600, 5, 3), _gauss(700, 5, 4) + 0.3
    stats = FeatureStats.from_tensors(FeatureStats.of(a).to_tensors())
    assert fid(stats, b) == pytest.approx(fid(a, b), rel=1e-10)


def test_fid_refuses_too_few_samples():
    with pytest.raises(FewstepError, match="too few for a stable FID"):
        fid(_gauss(1000, 4, 0), _gauss(100, 4, 1))
    with pytest.raises(FewstepError, match="feature sizes differ"):
        fid(_gauss(1000, 4, 0), _gauss(1000, 5, 1))


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    a, b = _gauss(1000, 8, 5), _gauss(1000, 8, 6)
    same, _ = kid(a, b, subsets=20, subset_size=500)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01
    # cubic kernel with gamma = 1/D: MMD^2 of a mean shift m is about 3 ||m||^2 / D^2 * (1 + ...) > 0.05
    assert shifted > 0.05
    assert kid(a, b, subsets=20, subset_size=500, seed=1) == kid(a, b, subsets=20, subset_size=500, seed=1)


def test_precision_recall_on_constructed_cases():
    real = _gauss(800, 2, 7)
    # the same distribution: both near 1
    p, r = precision_recall(real, _gauss(800, 2, 8))
    assert p > 0.9 and r > 0.9
    # fakes collapsed on one small region inside the data: precise, no recall
    p, r = precision_recall(real, _gauss(800, 2, 9, scale=0.05))
    assert p > 0.95 and r < 0.2
    # fakes far away: neither
    p, r = precision_recall(real, _gauss(800, 2, 10) + 20.0)
    assert p == 0.0 and r == 0.0


def test_precision_recall_exact_on_a_tiny_set():
    # On a line, real = {0, 1, 2, 3}; k=1 radii are 1 for every point. Fakes at 0.5 and 10:
    # 0.5 lies in a real ball, 10 does not -> precision 1/2. Fake radii: |10 - 0.5| = 9.5 for both,
    # so every real point lies within 9.5 of the fake at 0.5 -> recall 1.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_sliced_wasserstein_matches_the_closed_form_of_a_shift():
    # Shifting by a vector m moves each 1-D projection by <theta, m>; in 2-D the mean of |cos| over
    # directions is 2/pi, so SW1 = ||m|| * 2/pi (up to the Monte-Carlo error of the directions).
    x = _gauss(500, 2, 11)
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert sliced_wasserstein(x, x, projections=64) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(x, x + m, projections=2000) == pytest.approx(2 / math.pi, rel=0.03)


def test_mixture_loglik_of_exact_samples_matches_the_entropy():
    # One Gaussian N(mu, s^2 I_d): E[log p(x)] = -d/2 (1 + ln 2 pi s^2); standard error ~ sqrt(d/2)/sqrt(n)
    d, s, n = 6, 0.3, 20000
    gm = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), s)
    x = gm.sample(n, generator=torch.Generator().manual_seed(0))
    m = mixture_metrics(gm, x)
    assert m["loglik"] == pytest.approx(-gaussian_entropy(d, s), abs=4 * math.sqrt(d / 2 / n))


def test_mixture_mode_mass_and_coverage(mixture64):
    g = torch.Generator().manual_seed(0)
    x = mixture64.sample(20000, generator=g)
    m = mixture_metrics(mixture64, x)
    # exact samples: mode masses near the weights (0.5, 0.3, 0.2); modes overlap a little
    assert m["mode_mass"] == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    assert m["modes_covered"] == 3 and m["mass_tv"] < 0.03
    # all samples at the first mean: one mode covered, TV = 1 - 0.5
    collapsed = mixture64.means[:1].expand(100, -1)
    m = mixture_metrics(mixture64, collapsed, labels=torch.ones(100, dtype=torch.long))
    assert m["modes_covered"] == 1 and m["mass_tv"] == pytest.approx(0.5)
    assert m["label_agreement"] == 0.0  # component 0 has class 0, the labels asked for class 1
