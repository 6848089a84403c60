"""The shared fake-score block: a trainable teacher copy fitted by EDM-weighted DSM."""

import pytest
import torch

from fewstep.losses import edm_weight
from fewstep.methods._fake_score import KarrasSigmaSampler, dsm_loss, make_fake_score
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


def _dropout_teacher():
    from fewstep.teachers.native import build_model

    net = {"resolution": 8, "channels": 8, "channel_mult": [1, 2], "blocks": 1, "attn_resolutions": [],
           "num_classes": 2, "dropout": 0.5}  # fmt: skip
    torch.manual_seed(0)
    model = build_model("unet", net, {"sample_shape": [1, 8, 8], "num_classes": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize(
    "name, options",
    [("dmd", {"reg_weight": 0.0}), ("dmd2", {"gan": False}), ("sid", {}), ("diff_instruct", {})],
)
def test_generator_gradient_is_zero_at_initialisation_for_a_teacher_with_dropout(name, options):
    """The fake score starts equal to the teacher, so the generator's gradient must be exactly zero
    — also for a teacher trained with dropout, whose copies would add dropout noise in train mode
    (the references: DMD2 builds every network with dropout 0, SiD puts psi in eval mode, Diff-Instruct
    shares one dropout mask)."""
    from fewstep.methods import Batch, get_method

    cls = get_method(name)
    method = cls(_dropout_teacher(), cls.Config(**options))
    for net in method.networks().values():
        net.train()  # as the engine trains them
    torch.manual_seed(1)
    loss = method.losses(Batch(size=16, labels=torch.arange(16) % 2), 1, {"student"})["student"]
    grads = torch.autograd.grad(loss, [p for p in method.student.parameters() if p.requires_grad], allow_unused=True)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))
    assert norm < 1e-6, f"{name}: generator gradient {norm:.3g} at initialisation"
    assert all(not n.training for n in (method.teacher,)) and method.fake_score.training  # modes restored
