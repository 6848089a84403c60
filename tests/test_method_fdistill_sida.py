"""f-distill and SiDA: each is a named change to DMD2 / SiD, so each is checked against them."""

import pytest
import torch

from dm_helpers import tiny_images, tiny_teacher
from fewstep.methods import Batch, get_method
from fewstep.methods.fdistill import WEIGHTS, density_ratio, f_weight

DMD2, FDistill, SiD, SiDA = (get_method(n) for n in ("dmd2", "fdistill", "sid", "sida"))


def moved(module, scale=0.02, seed=1):
    """``module`` with its weights nudged (so a fake score no longer equals the teacher)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# --- f-distill ---------------------------------------------------------------------------------------
def test_f_distill_with_the_reverse_kl_is_dmd2s_gradient():
    teacher = tiny_teacher("unet", num_classes=2)
    f = FDistill(teacher, FDistill.Config(f="rkl"))
    d = DMD2(teacher, DMD2.Config(gan=False))
    moved(f.fake_score)
    d.fake_score.load_state_dict(f.fake_score.state_dict())
    base = torch.randn(6, 1, 8, 8) * 0.5
    cond = torch.tensor([0, 1, 0, 1, 0, 1])
    grads = []
    for loss_of in (lambda x: f.weighted_dm_loss(x, cond)[0], lambda x: d.dm_loss(x, cond)):
        x = base.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss_of(x).backward()
        grads.append(x.grad)
    assert grads[1].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-9)  # h = 1 / (1 + 1e-6)


def test_f_distill_weights_are_f_second_derivative_times_r_squared_and_average_one():
    r = torch.tensor([0.25, 1.0, 4.0])
    # h(r) = f''(r) r^2: reverse KL f = -log r -> 1; forward KL f = r log r -> r; Jensen-Shannon -> r / (1 + r)
    want = {"rkl": torch.ones(3), "kl": r, "js": r / (1 + r), "sh": r.sqrt(), "neyman": 1 / r}
    for f, h in want.items():
        assert torch.allclose(f_weight(r, f), h / h.mean(), atol=1e-5)
    assert set(WEIGHTS) == {"rkl", "kl", "js", "sf", "sh", "jf", "neyman"}


def test_density_ratio_is_exp_logit_clipped_and_normalised_per_noise_bin():
    c = FDistill.Config()
    sigma = torch.tensor([0.01, 0.01, 50.0, 50.0])
    r = density_ratio(torch.log(torch.tensor([1.0, 3.0, 2.0, 2.0])), sigma, 0.002, 80.0, c)
    assert torch.allclose(r, torch.tensor([0.5, 1.5, 1.0, 1.0]))  # each over its bin's mean
    raw = density_ratio(torch.tensor([-20.0, 0.0, 20.0]), torch.ones(3), 0.002, 80.0, FDistill.Config(ratio_bins=0))
    assert torch.allclose(raw, torch.tensor([0.1, 1.0, 20.0]))  # logit clamp +-10, then r in [0.1, 20]


def test_f_distill_gradient_is_zero_when_the_fake_score_equals_the_teacher():
    teacher = tiny_teacher("unet", num_classes=2)
    f = FDistill(teacher, FDistill.Config(f="kl"))
    x = (torch.randn(4, 1, 8, 8) * 0.5).requires_grad_(True)
    dm, gan = f.weighted_dm_loss(x, torch.tensor([0, 1, 0, 1]))
    dm.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    gan.backward()  # the GAN term reaches x but never the frozen fake score, head or teacher
    assert x.grad.abs().max() > 0
    nets = (f.fake_score, f.classifier, teacher)
    assert all(p.grad is None for n in nets for p in n.parameters())


def test_f_distill_trains_through_the_engine_and_reloads(tmp_path):
    from fewstep.train import distill, load_run

    teacher = tiny_teacher("unet", num_classes=2)
    m = distill(teacher, "fdistill", max_steps=6, out=tmp_path / "f", batch=4, cpu=True, sample_n=0,
                data=tiny_images(), fake_updates=2)  # fmt: skip
    assert m.config.gan_features == "teacher"
    noise = torch.randn(2, 1, 8, 8)
    assert torch.allclose(load_run(tmp_path / "f", teacher=teacher).sample(noise, 1, torch.tensor([0, 1])),
                          m.sample(noise, 1, torch.tensor([0, 1])))  # fmt: skip


# --- SiDA --------------------------------------------------------------------------------------------
def sid_pair(**sida):
    teacher = tiny_teacher("unet", num_classes=2)
    a = SiDA(teacher, SiDA.Config(**{"alpha": 1.2, "gan_start_kimg": 0.0, **sida}))
    s = SiD(teacher, SiD.Config(alpha=1.2))
    moved(a.fake_score)
    moved(a.student, 0.01, seed=2)
    s.fake_score.load_state_dict(a.fake_score.state_dict())
    s.student.load_state_dict(a.student.state_dict())
    return teacher, a, s


def test_sida_without_the_adversarial_terms_is_sid():
    _, a, s = sid_pair(lsg=2.0, lsg_gan=0.0, lsd=0.0, ls=1.0)
    batch = Batch(4, torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    out = []
    for m in (a, s):
        torch.manual_seed(0)
        out.append(m.losses(batch, 0, {"fake_score"})["fake_score"])
        torch.manual_seed(1)
        out.append(m.losses(batch, 0, {"student"})["student"])
    dim = 64
    assert torch.allclose(out[0], dim * out[2])  # psi: ls x the pixel *sum* of SiD's DSM
    assert torch.allclose(out[1], out[3])  # G: 1/2 lsg L_SiD with lsg = 2
    assert out[3].abs() > 0


def test_sidas_discriminator_is_the_fake_scores_encoder_and_costs_no_parameters():
    teacher, a, _ = sid_pair(ls=0.0, lsd=1.0)
    assert set(a.networks()) == {"student", "fake_score"}
    batch = Batch(4, torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    a.losses(batch, 0, {"fake_score"})["fake_score"].backward()  # the discriminator loss alone
    enc = [p.grad for n, p in a.fake_score.named_parameters() if ".down." in n]
    dec = [p.grad for n, p in a.fake_score.named_parameters() if ".up." in n or ".out" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    assert all(g is None or g.abs().sum() == 0 for g in dec)  # only the encoder classifies
    a.fake_score.zero_grad(set_to_none=True)
    a.losses(batch, 0, {"student"})["student"].backward()  # G's GAN term: psi is a fixed function
    assert all(p.grad is None for p in a.fake_score.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    logits = a.logits(torch.zeros(2, 1, 8, 8), torch.ones(2), None)
    assert logits.ndim == 3  # a per-location map


def test_sidas_gan_starts_after_the_given_generator_images():
    _, a, _ = sid_pair(gan_start_kimg=1.0)
    assert not a.gan_on(31, 32) and a.gan_on(32, 32)


def test_sid2a_starts_the_generator_from_a_sid_run_and_psi_from_the_teacher(tmp_path):
    from fewstep.train import distill
    from fewstep.train.warmstart import warm_start

    teacher = tiny_teacher("unet", num_classes=2)
    common = dict(batch=4, cpu=True, sample_n=0, data=tiny_images(), fake_lr=1e-2, lr=1e-3)
    sid = distill(teacher, "sid", max_steps=4, out=tmp_path / "sid", **common)
    m, record = warm_start(SiDA, teacher, SiDA.Config(), tmp_path / "sid")
    assert record["carried"] == ["student"] and m.config.alpha == 1.0
    noise, cond = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    assert torch.allclose(m.sample(noise, 1, cond), sid.sample(noise, 1, cond), atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(sid.fake_score.parameters(), teacher.parameters(), strict=True))
    assert all(torch.equal(p, q) for p, q in zip(m.fake_score.parameters(), teacher.parameters(), strict=True))


@pytest.mark.parametrize("bad", [{"f": "tv"}, {"gan": False}])
def test_f_distill_refuses_what_it_cannot_do(bad):
    from fewstep.errors import FewstepError

    with pytest.raises(FewstepError):
        FDistill(tiny_teacher("unet"), FDistill.Config(**bad))
