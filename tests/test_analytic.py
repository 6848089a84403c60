import math

import torch

from fewstep.guidance import cfg
from fewstep.teachers.analytic import GaussianMixture, image_mixture, ring2d


def test_denoiser_equals_monte_carlo_posterior_mean(mixture64):
    """E[x0 | x] by importance weighting exact prior samples with the Gaussian likelihood."""
    g = torch.Generator().manual_seed(0)
    x0 = mixture64.sample(400_000, g)
    for sigma in (0.2, 0.7, 2.0):
        x = torch.tensor([[0.4, 0.2], [-0.5, -0.3]], dtype=torch.float64)
        logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # (2, M)
        w = (logw - logw.logsumexp(1, keepdim=True)).exp()
        mc = w @ x0
        exact = mixture64(x, torch.full((2,), sigma, dtype=torch.float64))
        assert torch.allclose(exact, mc, atol=0.02), (sigma, exact, mc)


def test_log_prob_integrates_to_one_and_matches_closed_form():
    gm = GaussianMixture(
        torch.tensor([[0.0], [2.0]], dtype=torch.float64),
        torch.tensor([0.5, 0.3], dtype=torch.float64),
        weights=torch.tensor([0.25, 0.75], dtype=torch.float64),
    )
    xs = torch.linspace(-6, 8, 20001, dtype=torch.float64)[:, None]
    for sigma in (0.0, 1.0):
        p = gm.log_prob(xs, sigma).exp()
        assert abs(float(torch.trapezoid(p, xs[:, 0])) - 1) < 1e-6
    x = torch.tensor([[0.7]], dtype=torch.float64)
    manual = 0.25 * math.exp(-(0.7**2) / (2 * 0.25)) / math.sqrt(2 * math.pi * 0.25) + 0.75 * math.exp(
        -(1.3**2) / (2 * 0.09)
    ) / math.sqrt(2 * math.pi * 0.09)
    assert abs(float(gm.log_prob(x)) - math.log(manual)) < 1e-12


def test_conditioning_restricts_components(mixture64):
    x = torch.zeros(2, 2, dtype=torch.float64)
    sig = torch.full((2,), 1e-3, dtype=torch.float64)
    # tiny sigma: the posterior mean collapses onto the nearest allowed component's mean
    cond0 = mixture64(x + torch.tensor([1.0, 0.5], dtype=torch.float64), sig, torch.tensor([0, 0]))
    assert torch.allclose(cond0, torch.tensor([[1.0, 0.5]] * 2, dtype=torch.float64), atol=1e-4)
    s = mixture64.sample(2000, torch.Generator().manual_seed(1), cond=torch.ones(2000, dtype=torch.long))
    assert (mixture64.component(s) > 0).float().mean() > 0.99


def test_guidance_scale_one_is_conditional_and_formula(mixture64):
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.full((5,), 0.8, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(cfg(mixture64, 1.0)(x, sigma, y), mixture64(x, sigma, y))
    d_c, d_u = mixture64(x, sigma, y), mixture64(x, sigma, torch.full_like(y, 2))
    assert torch.allclose(cfg(mixture64, 3.0)(x, sigma, y), d_u + 3.0 * (d_c - d_u), atol=1e-12)
    assert torch.allclose(cfg(mixture64, 0.0)(x, sigma, y), d_u, atol=1e-12)
    w = torch.tensor([1.0, 2.0, 0.0, 1.5, 3.0], dtype=torch.float64)
    assert torch.allclose(cfg(mixture64, w)(x, sigma, y), d_u + w[:, None] * (d_c - d_u), atol=1e-12)


def test_image_shaped_mixture_and_ring():
    gm = image_mixture(k=3, shape=(1, 4, 4))
    x = gm.sample(5)
    assert x.shape == (5, 1, 4, 4)
    assert gm(x * 0 + 10.0, torch.full((5,), 1e4)).shape == (5, 1, 4, 4)
    ring = ring2d()
    assert ring.num_classes == 8 and ring.sample_shape == (2,)


def test_a_mixture_saves_itself_and_load_teacher_reads_it_back(tmp_path):
    from fewstep.teachers import load_teacher
    from fewstep.teachers.analytic import ring2d

    g = ring2d()
    g.save(tmp_path / "m")
    back = load_teacher(tmp_path / "m")
    x, s = torch.randn(5, 2), torch.full((5,), 0.7)
    labels = torch.zeros(5, dtype=torch.long) if g.num_classes else None
    assert type(back) is type(g) and back.num_classes == g.num_classes and back.sigma_max == g.sigma_max
    torch.testing.assert_close(back(x, s, labels), g(x, s, labels))
