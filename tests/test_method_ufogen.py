"""UFOGen (arXiv 2311.09257): chain steps, the forward-marginal GAN plus KL reconstruction term,
a discriminator initialised from the teacher, frozen teacher, ratio, one-step 2-D run."""

import pytest
import torch

from adv_helpers import PointFeatures, mlp_denoiser, nearest_mode_distance, run
from fewstep.errors import FewstepError
from fewstep.methods import get_method
from fewstep.methods.base import Batch
from fewstep.methods.ufogen import UFOGen, UFOGenConfig
from fewstep.networks.discriminator import TeacherFeatures
from fewstep.teachers.analytic import ring2d

CHAIN = (80.0, 0.3, 0.1, 0.03)  # levels suited to 2-D data of scale 1


def make(features=None, **kw):
    kw.setdefault("chain_sigmas", CHAIN)
    return UFOGen(ring2d(), UFOGenConfig(**kw), student=mlp_denoiser(32, 2), features=features or PointFeatures())


def test_chain_steps_go_one_level_down_and_end_at_zero():
    m = make()
    torch.manual_seed(0)
    s_t, s_prev = m.chain_step(4000, "cpu", torch.float64)
    chain = [*CHAIN, 0.0]
    pairs = {(float(a), float(b)) for a, b in zip(s_t, s_prev, strict=True)}
    assert pairs == {(chain[i], chain[i + 1]) for i in range(4)}


def test_generator_loss_is_gan_plus_kl_reconstruction():
    m = make(gan_loss="nonsaturating", rec_weight=2.0, gamma_floor=0.05)
    x0 = ring2d().sample(8)
    torch.manual_seed(1)
    x0_hat_m, s_prev_m = m.generate(x0, None)
    loss = m.generator_loss(x0, x0_hat_m, s_prev_m, None)
    torch.manual_seed(1)
    chain = torch.tensor([*CHAIN, 0.0])
    i = torch.randint(4, (8,))
    s_t, s_prev = chain[i], chain[i + 1]
    x0_hat = m.student(x0 + s_t[:, None] * torch.randn_like(x0), s_t)
    x_fake = x0_hat + s_prev[:, None] * torch.randn_like(x0_hat)  # q(x_{t-1} | x'_0)
    adv = torch.nn.functional.softplus(-m.discriminator(x_fake, s_prev)).mean()
    gamma = 0.5 / s_prev.clamp_min(0.05) ** 2  # KL between N(x'_0, s^2) and N(x0, s^2) per squared error
    rec = (gamma * (x0 - x0_hat).pow(2).mean(1)).mean()
    assert loss.item() == pytest.approx((adv + 2.0 * rec).item(), rel=1e-5)


def test_discriminator_backbone_is_a_trainable_copy_of_the_teacher_and_the_teacher_stays_frozen():
    teacher_net = mlp_denoiser(16, 2).requires_grad_(False)
    m = make(features=TeacherFeatures(teacher_net, trainable=True))
    assert m.discriminator.backbone is not None and "features" not in m.frozen()
    x0 = ring2d().sample(16)
    m.discriminator_loss(x0, *m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is None for p in m.student.parameters())
    assert any(p.grad is not None for p in m.discriminator.backbone.parameters())
    m.discriminator.zero_grad(set_to_none=True)
    m.generator_loss(x0, *m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in m.discriminator.parameters())


def test_ratio():
    m = make(gen_every=4)
    assert run(m, ring2d().sample(256), None, 8, 16) == {"student": 2, "discriminator": 8}


def test_one_step_samples_move_toward_the_data():
    torch.manual_seed(0)
    m = make(lr=1e-3, d_lr=1e-3)
    data = ring2d().sample(2048, torch.Generator().manual_seed(1))
    z = torch.randn(256, 2)
    before = nearest_mode_distance(m.sample(z, 1), m.teacher.means)
    run(m, data, None, 150, 64)
    after = nearest_mode_distance(m.sample(z, 1), m.teacher.means)
    assert before > 0.9 and after < 0.65 * before
    assert m.sample(z, 4).shape == z.shape  # multi-step: re-noise along the chain


def test_registered_and_errors():
    assert get_method("ufogen") is UFOGen and UFOGen.needs_data
    with pytest.raises(FewstepError, match="real images"):
        make().losses(Batch(4), 0, {"student"})
