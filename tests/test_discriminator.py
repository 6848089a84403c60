"""Discriminator block: losses and penalties against closed forms, frozen features, heads."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fewstep.denoiser import EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.networks.discriminator import (
    Discriminator,
    Head,
    ImageFeatures,
    TeacherFeatures,
    approx_r1_penalty,
    d_loss,
    g_loss,
    no_param_grad,
    r1_on,
    r1_penalty,
)
from fewstep.networks.mlp import MLP, MLPConfig
from fewstep.networks.unet import UNet, UNetConfig

torch.manual_seed(0)


def tiny_unet_teacher(num_classes=3):
    net = UNet(
        UNetConfig(
            resolution=8, channels=8, channel_mult=(1, 2), blocks=1, attn_resolutions=(), num_classes=num_classes
        )
    )
    return EDMDenoiser(net, (1, 8, 8), num_classes).eval().requires_grad_(False)


def tiny_mlp_teacher():
    return EDMDenoiser(MLP(MLPConfig(dim=2, hidden=16, depth=2)), (2,)).eval().requires_grad_(False)


REAL = torch.tensor([[2.0, 0.5, -0.3], [1.2, -1.5, 0.0]], dtype=torch.float64)
FAKE = torch.tensor([[-2.0, 0.4, 1.3], [0.9, -0.2, -1.1]], dtype=torch.float64)


def test_hinge_losses_closed_form():
    # relu(1 - r): [0, .5, 1.3, 0, 2.5, 1] -> 5.3/6 ; relu(1 + f): [0, 1.4, 2.3, 1.9, .8, 0] -> 6.4/6
    assert d_loss(REAL, FAKE, "hinge").item() == pytest.approx(5.3 / 6 + 6.4 / 6, abs=1e-12)
    assert g_loss(FAKE, "hinge").item() == pytest.approx(-(-2.0 + 0.4 + 1.3 + 0.9 - 0.2 - 1.1) / 6, abs=1e-12)


def test_nonsaturating_losses_closed_form():
    sig = lambda v: 1 / (1 + math.exp(-v))
    expect_d = (
        sum(-math.log(sig(r)) for r in REAL.flatten().tolist()) / 6
        + sum(-math.log(1 - sig(f)) for f in FAKE.flatten().tolist()) / 6
    )
    expect_g = sum(-math.log(sig(f)) for f in FAKE.flatten().tolist()) / 6
    assert d_loss(REAL, FAKE, "nonsaturating").item() == pytest.approx(expect_d, abs=1e-12)
    assert g_loss(FAKE, "nonsaturating").item() == pytest.approx(expect_g, abs=1e-12)


def test_unknown_loss_kind():
    with pytest.raises(FewstepError, match="hinge"):
        d_loss(REAL, FAKE, "wgan")


def test_r1_equals_squared_weight_norm_of_linear_discriminator():
    lin = nn.Linear(5, 1).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    r1 = r1_on(lambda z: lin(z), x)
    assert r1.item() == pytest.approx(lin.weight.pow(2).sum().item(), rel=1e-12)
    # two logits per sample: the penalty uses the gradient of their mean
    lin2 = nn.Linear(5, 2).double()
    r1b = r1_on(lambda z: lin2(z), x)
    assert r1b.item() == pytest.approx(lin2.weight.mean(0).pow(2).sum().item(), rel=1e-12)
    # and it is differentiable in the discriminator's weights: d r1 / d w = 2 w
    r1.backward()
    assert torch.allclose(lin.weight.grad, 2 * lin.weight.detach())


def test_r1_by_hand_on_quadratic_discriminator():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits = (x**2).sum(1, keepdim=True)  # grad = 2x
    assert r1_penalty(logits, x).item() == pytest.approx((2 * x.detach()).pow(2).sum(1).mean().item(), rel=1e-12)


def test_approx_r1_linear_discriminator():
    lin = nn.Linear(4, 1).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    n = torch.randn(6, 4, dtype=torch.float64)
    s = 0.1
    pen = approx_r1_penalty(lin(x), lin(x + s * n))
    assert pen.item() == pytest.approx((s * n @ lin.weight.T).pow(2).mean().item(), rel=1e-10)
    # in expectation s^2 ||w||^2: check with many draws
    x = torch.randn(20000, 4, dtype=torch.float64)
    pen = approx_r1_penalty(lin(x), lin(x + s * torch.randn_like(x)))
    assert pen.item() == pytest.approx(s**2 * lin.weight.pow(2).sum().item(), rel=0.05)


def test_projection_head_closed_form():
    head = Head(channels=3, spatial=False, hidden=4, num_classes=2).double()
    f = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])  # 2 is the null label
    phi = F.leaky_relu(head.body[1](head.body[0](f)), 0.2)
    expect = head.out(phi)[:, 0] + (head.embed(y) * phi).sum(1) / 2.0
    assert torch.allclose(head(f, y)[:, 0], expect)
    # no labels means the null label
    assert torch.allclose(head(f), head(f, torch.full((5,), 2)))


def test_teacher_features_unet_levels_and_frozen():
    teacher = tiny_unet_teacher()
    feats = TeacherFeatures(teacher, "multi")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    out = feats(x, sigma, torch.tensor([0, 3]))
    assert [tuple(f.shape) for f in out] == [(2, 8, 8, 8), (2, 16, 4, 4)]
    c_noise = sigma.log() / 4
    c_in = (1 / (0.25 + sigma**2).sqrt())[:, None, None, None]
    assert torch.allclose(out[-1], teacher.net.bottleneck(c_in * x, c_noise, torch.tensor([0, 3])))
    assert len(TeacherFeatures(teacher, "bottleneck")(x, sigma)) == 1


def test_frozen_features_get_no_gradient_but_pass_it_to_the_input():
    teacher = tiny_unet_teacher()
    disc = Discriminator(TeacherFeatures(teacher), (1, 8, 8), num_classes=3, hidden=8)
    assert not any(k.startswith("net") or "backbone" in k for k in disc.state_dict())  # teacher not in D's state
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    logits = disc(x, torch.full((4,), 1.0), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 8 * 8 + 4 * 4)
    with no_param_grad(disc):
        g = g_loss(disc(x, torch.full((4,), 1.0)))
    g.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in disc.parameters())  # frozen during the generator loss
    assert all(p.requires_grad for p in disc.parameters())  # and restored after
    d_loss(logits, -logits).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in disc.parameters())


def test_trainable_backbone_is_a_copy():
    teacher = tiny_mlp_teacher()
    disc = Discriminator(TeacherFeatures(teacher, "multi", trainable=True), (2,), hidden=8)
    assert disc.backbone is not None and disc.backbone.net is not teacher.net
    assert any(k.startswith("backbone") for k in disc.state_dict())
    x = torch.randn(5, 2)
    d_loss(disc(x, torch.ones(5)), disc(x + 1, torch.ones(5))).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in disc.backbone.parameters())


def test_image_features_and_paired_heads():
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    feats = ImageFeatures(extractor)
    assert not any(p.requires_grad for p in extractor.parameters())
    disc = Discriminator(feats, (1, 8, 8), hidden=8, paired=True)
    x, ctx = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    assert disc.heads[0].body[0].in_features == 12
    out = disc(x, None, None, context=ctx)
    assert out.shape == (3, 1)
    assert not torch.allclose(out, disc(x, None, None, context=ctx + 1))
    with pytest.raises(FewstepError, match="context"):
        disc(x)


def test_bad_teacher_rejected():
    from fewstep.teachers.analytic import ring2d

    with pytest.raises(FewstepError, match="ImageFeatures"):
        TeacherFeatures(ring2d())
