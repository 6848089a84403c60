"""The shared fake-score block: a trainable teacher copy fitted by EDM-weighted DSM."""

import torch

from fewstep.methods._fake_score import KarrasSigmaSampler, dsm_loss, edm_weight, make_fake_score
from fewstep.teachers.analytic import GaussianMixture
from fewstep.teachers.native import build_model


def tiny_edm(num_classes=0):
    net = {"dim": 2, "hidden": 32, "depth": 1, "num_classes": num_classes}
    den = {"sample_shape": [2], "num_classes": num_classes, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    return build_model("mlp", net, den).eval().requires_grad_(False)


def test_copy_of_edm_teacher_is_equal_and_trainable_teacher_untouched():
    teacher = tiny_edm()
    fake = make_fake_score(teacher)
    x, s = torch.randn(5, 2), torch.full((5,), 0.7)
    assert torch.equal(fake(x, s), teacher(x, s))
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    dsm_loss(fake, torch.randn(5, 2), None, s).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_dsm_loss_is_the_edm_weighted_formula():
    teacher = GaussianMixture(torch.tensor([[1.0, -1.0]], dtype=torch.float64), 0.3)
    fake = make_fake_score(teacher)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    d = fake(x0 + sigma[:, None] * eps, sigma)
    want = ((sigma**2 + fake.sigma_data**2) / (sigma * fake.sigma_data) ** 2 * (d - x0).pow(2).mean(1)).mean()
    assert torch.allclose(dsm_loss(fake, x0, None, sigma, noise=eps), want)
    assert torch.allclose(edm_weight(torch.tensor(0.5), 0.5), torch.tensor(8.0))


def test_dsm_moves_the_mixture_fake_score_onto_the_generator_samples():
    torch.manual_seed(0)
    teacher = GaussianMixture(torch.zeros(1, 2), 0.2)
    fake = make_fake_score(teacher)
    gen_mean = torch.tensor([1.0, -0.5])
    opt = torch.optim.Adam(fake.parameters(), lr=0.05)
    sampler = KarrasSigmaSampler.of(teacher)
    for _ in range(150):
        x0 = gen_mean + 0.2 * torch.randn(256, 2)
        loss = dsm_loss(fake, x0, None, sampler(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(fake.means.detach()[0], gen_mean, atol=0.05)
    assert torch.equal(teacher.means, torch.zeros(1, 2))  # the copy is independent


def test_karras_sampler_range():
    teacher = tiny_edm()
    full = KarrasSigmaSampler.of(teacher)
    assert torch.isclose(full.sigmas[0], torch.tensor(0.002)) and torch.isclose(full.sigmas[-1], torch.tensor(80.0))
    assert (full.sigmas[1:] > full.sigmas[:-1]).all()
    dm = KarrasSigmaSampler.of(teacher, lo=0.02, hi=0.98)
    assert (dm.lo, dm.hi) == (20, 980)
    s = dm(4000)
    assert s.min() >= full.sigmas[20] and s.max() <= full.sigmas[980]
