"""Progressive adversarial distillation (SDXL-Lightning, arXiv 2402.13929): the teacher
transition, PD's squared error in the first rounds, conditional then unconditional discriminator,
frozen networks, the update ratio, and a 2-D run that moves samples toward the data."""

import pytest
import torch

from adv_helpers import analytic_edm_teacher, mlp_denoiser, nearest_mode_distance, run
from fewstep.errors import FewstepError
from fewstep.methods import get_method
from fewstep.methods._rounds import subgrid
from fewstep.methods.base import Batch
from fewstep.methods.lightning import Lightning, LightningConfig
from fewstep.methods.progressive import ProgressiveConfig, ProgressiveDistillation
from fewstep.networks.discriminator import TeacherFeatures
from fewstep.teachers.analytic import ring2d

MIX = ring2d()


def make(**kw):
    kw = {"start_steps": 4, "end_steps": 2, "steps_per_round": 20, "mse_rounds": 0, **kw}
    backbone = mlp_denoiser(32, 2).requires_grad_(False)
    return Lightning(analytic_edm_teacher(MIX), LightningConfig(**kw), features=TeacherFeatures(backbone))


def ddim(x, x0, s, s_next):
    return x0 + (s_next / s)[:, None] * (x - x0)


def test_transition_target_is_two_teacher_ddim_steps():
    m = make(start_steps=8, end_steps=1)
    x0 = MIX.sample(6)
    torch.manual_seed(2)
    x, s, s_next, x_next = m.transition(x0, 2, m.teacher, None)
    torch.manual_seed(2)
    i = torch.randint(0, 2, (6,))
    g2, g4 = subgrid(m.fine, 2).float(), subgrid(m.fine, 4).float()
    assert torch.equal(s, g2[i]) and torch.equal(s_next, g2[i + 1])
    assert torch.allclose(x, x0 + s[:, None] * torch.randn(6, 2))
    mid = g4[2 * i + 1]  # the teacher grid's point between s and s_next
    x_mid = ddim(x, MIX(x, s), s, mid)
    expect = ddim(x_mid, MIX(x_mid, mid), mid, s_next)
    assert torch.allclose(x_next, expect, atol=1e-5)


def test_mse_round_is_progressive_distillation():
    m = make(start_steps=4, end_steps=1, mse_rounds=1)
    pd = ProgressiveDistillation.__new__(ProgressiveDistillation)
    pd.__dict__.update(m.__dict__)
    pd.config = ProgressiveConfig(start_steps=4, end_steps=1, steps_per_round=20)
    x0 = MIX.sample(8)
    torch.manual_seed(4)
    ours = m.losses(Batch(8, x0), 3, {"student"})["student"]
    torch.manual_seed(4)
    theirs = pd.losses(Batch(8, x0), 3, {"student"})["student"]
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_conditional_then_unconditional_discriminator():
    m = make(cond_fraction=0.25)
    assert [m.conditional(i) for i in (0, 4, 5, 19)] == [True, True, False, False]
    x0 = MIX.sample(8)
    for step, used, unused in (
        (0, m.discriminator.cond, m.discriminator.uncond),
        (10, m.discriminator.uncond, m.discriminator.cond),
    ):
        m.discriminator.zero_grad(set_to_none=True)
        m.losses(Batch(8, x0), step, {"discriminator"})["discriminator"].backward()
        assert all(p.grad is not None for p in used.parameters())
        assert all(p.grad is None for p in unused.parameters())
    assert m.discriminator.cond.heads[0].body[0].in_features == 2 * m.discriminator.uncond.heads[0].body[0].in_features


def test_frozen_networks_get_no_gradient():
    m = make()
    x0 = MIX.sample(8)
    out = m.losses(Batch(8, x0), 0, {"student", "discriminator"})
    out["student"].backward(inputs=list(m.student.parameters()) + list(m.discriminator.parameters()))
    assert all(p.grad is None for p in m.discriminator.parameters())  # G's loss leaves D alone
    out["discriminator"].backward()
    for net in (m.teacher, m.features):
        assert all(p.grad is None for p in net.parameters())
    assert "features" in m.frozen() and "discriminator" in m.networks()


def test_ratio():
    m = make(gen_every=2)
    assert run(m, MIX.sample(256), None, 6, 16) == {"student": 3, "discriminator": 6}


def test_short_run_moves_samples_toward_the_data():
    torch.manual_seed(0)
    m = make(steps_per_round=100, cond_fraction=0.5, lr=1e-3, d_lr=1e-3, gan_loss="hinge")
    with torch.no_grad():  # start from a student whose samples are shifted off the data
        m.student.net.correction.out.bias.fill_(1.0)
    z = torch.randn(512, 2)
    before = nearest_mode_distance(m.sample(z, 2), MIX.means)
    run(m, MIX.sample(2048, torch.Generator().manual_seed(1)), None, 100, 64)
    after = nearest_mode_distance(m.sample(z, 2), MIX.means)
    assert before > 0.4 and after < 0.8 * before


def test_registered_and_errors():
    assert get_method("lightning") is Lightning and Lightning.family == "adversarial"
    with pytest.raises(FewstepError, match="cond_fraction"):
        make(cond_fraction=1.5)
    with pytest.raises(FewstepError, match="frozen"):
        Lightning(
            analytic_edm_teacher(MIX),
            LightningConfig(start_steps=4),
            features=TeacherFeatures(mlp_denoiser(), trainable=True),
        )
    with pytest.raises(FewstepError, match="real images"):
        make().losses(Batch(4), 0, {"student"})
