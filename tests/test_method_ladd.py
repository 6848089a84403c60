"""LADD (arXiv 2403.12015): teacher-feature discriminator on re-noised samples, logit-normal
discriminator levels, teacher-generated data, no distillation loss; frozen teacher; ratio; 2-D run."""

import math

import pytest
import torch

from adv_helpers import mlp_denoiser, nearest_mode_distance, run
from fewstep.errors import FewstepError
from fewstep.methods import get_method
from fewstep.methods._adversarial import rf_levels, sd_levels
from fewstep.methods.base import Batch
from fewstep.methods.ladd import LADD, LADDConfig
from fewstep.networks.discriminator import TeacherFeatures
from fewstep.pairs import Pairs
from fewstep.teachers.analytic import ring2d


def make(teacher=None, n=1024, **kw):
    teacher = teacher if teacher is not None else ring2d()
    x0 = teacher.sample(n, torch.Generator().manual_seed(1))
    pairs = Pairs(torch.randn(n, 2), x0, None, {"sample_shape": [2]})
    backbone = mlp_denoiser(32, 2).requires_grad_(False)  # the "teacher network" whose features D reads
    return LADD(teacher, LADDConfig(**kw), student=mlp_denoiser(32, 2), features=TeacherFeatures(backbone), pairs=pairs)


def test_student_levels_add_by_default_or_sd3_turbo_times_at_equal_snr():
    assert rf_levels((1.0, 0.75, 0.5, 0.25), 0.5, 80.0) == pytest.approx((80.0, 1.5, 0.5, 0.5 / 3))
    sd = ring2d().sigma_data
    assert make(times=(1.0, 0.75, 0.5, 0.25)).levels == pytest.approx(rf_levels((1.0, 0.75, 0.5, 0.25), sd, 80.0))
    assert make().levels == pytest.approx(sd_levels((999, 749, 499, 249), sd, 80.0))


def test_discriminator_levels_are_logit_normal_and_high_noise_biased():
    m = make()
    torch.manual_seed(0)
    sigma = m.disc_sigma(20000, "cpu", torch.float64)
    t = sigma / (sigma + m.teacher.sigma_data)  # back to RF time
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(1.0, abs=0.03)  # m = 1
    assert float(logit.std()) == pytest.approx(1.0, abs=0.03)  # s = 1
    assert float((t > 0.5).double().mean()) == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=0.01)


def test_generator_loss_is_adversarial_only_on_renoised_teacher_features():
    m = make(gan_loss="hinge")
    x0 = ring2d().sample(8)
    x_hat = m.generate(x0, None)
    torch.manual_seed(5)
    loss = m.generator_loss(x_hat, None)
    torch.manual_seed(5)
    t = torch.sigmoid(torch.randn(8) + 1.0)
    t_hat = (m.teacher.sigma_data * t / (1 - t)).clamp(m.teacher.sigma_min, m.teacher.sigma_max)
    x_t = x_hat + t_hat[:, None] * torch.randn_like(x_hat)
    expect = -m.discriminator(x_t, t_hat).mean()  # hinge generator loss, nothing else
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_frozen_teacher_features_get_no_gradient():
    m = make(ar1_weight=1.0)
    x0 = ring2d().sample(16)
    m.generator_loss(m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in m.features.parameters())
    assert all(p.grad is None for p in m.discriminator.parameters())
    m.discriminator_loss(x0, m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in m.features.parameters())
    assert all(p.grad is not None for p in m.discriminator.parameters())
    assert "features" in m.frozen() and not any(k.startswith("net") for k in m.discriminator.state_dict())


def test_ratio_and_data_from_pairs():
    m = make(gen_every=2)
    counts = run(m, None, None, 6, 16)
    assert counts == {"student": 3, "discriminator": 6}
    out = m.losses(Batch(4), 1, {"student", "discriminator"})  # no real data needed
    assert set(out) == {"student", "discriminator"}


def test_short_run_moves_samples_toward_the_data():
    torch.manual_seed(0)
    m = make(n=2048, lr=1e-3, d_lr=1e-3)
    z = torch.randn(256, 2)
    before = nearest_mode_distance(m.sample(z, 1), m.teacher.means)
    run(m, None, None, 100, 64)
    after = nearest_mode_distance(m.sample(z, 1), m.teacher.means)
    assert before > 0.9 and after < 0.75 * before


def test_registered_and_errors():
    assert get_method("ladd") is LADD and not LADD.needs_data
    bad = Pairs(torch.zeros(4, 3), torch.zeros(4, 3), None, {"sample_shape": [3]})
    with pytest.raises(FewstepError, match="do not fit"):
        LADD(ring2d(), student=mlp_denoiser(), features=TeacherFeatures(mlp_denoiser()), pairs=bad)
