import numpy as np
import pytest
import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import get_method
from fewstep.methods._rounds import RoundMethod, subgrid, two_step_target
from fewstep.methods.guided import GuidedConfig, GuidedDistillation
from fewstep.methods.progressive import ProgressiveDistillation
from fewstep.solvers import euler
from pd_support import batch, engine_resume_matches, same, tiny_teacher, train


def _method(**kw):
    cfg_ = GuidedConfig(**{"start_steps": 4, "steps_per_round": 3, "stage_one_steps": 2, **kw})
    return GuidedDistillation(tiny_teacher(), cfg_)


def test_stage_one_target_is_the_guided_teacher(mixture64):
    """With the exact (analytic) teacher, the target is (1 + w') E[x0|x,c] - w' E[x0|x], w = w' + 1."""
    m = _method()
    m.teacher = mixture64
    x = torch.randn(64, 2, dtype=torch.float64)
    sigma = m.draw_sigma(64)
    labels = torch.randint(0, 2, (64,))
    w = m.draw_w(64).double()
    target = m.stage_one_target(x, sigma, labels, w)
    x_c, x_u = mixture64(x, sigma, labels), mixture64(x, sigma, torch.full_like(labels, 2))
    wp = (w - 1)[:, None]
    assert torch.allclose(target, (1 + wp) * x_c - wp * x_u, atol=1e-12, rtol=0)
    assert torch.allclose(target, cfg(mixture64, w)(x, sigma, labels), atol=1e-14, rtol=0)
    assert (target - x_c).abs().max() > 1e-2  # guidance changes it
    assert ((w >= 1) & (w <= 5)).all() and w.std() > 0.5
    s = m.draw_sigma(20_000)
    assert s.max() <= m.fine[0] and s.min() >= m.fine[-2] and (s > 1).any() and (s < 0.1).any()


class GuidedOracle(nn.Module):
    """A student equal to the guided teacher, reading w from its extra input."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, sigma, cond=None, extra=None):
        return cfg(self.teacher, extra.reshape(-1))(x, sigma, cond)


def test_guided_student_has_zero_stage_one_loss():
    m = _method()
    assert m.schedule.round_of(0) == -1
    m.student = GuidedOracle(m.teacher)
    assert float(m.losses(batch(), 0, {"student"})["student"]) < 1e-24
    m.student = lambda x, s, c, extra: m.teacher(x, s, c)  # the unguided teacher: w ignored
    assert float(m.losses(batch(), 0, {"student"})["student"]) > 1e-6


def test_stage_two_is_progressive_distillation_at_the_same_w():
    """Stage two's loss is PD's: a student equal to the two-step map of the w-conditioned round
    teacher (at the w it is given) has zero loss."""
    assert issubclass(GuidedDistillation, RoundMethod) and not issubclass(GuidedDistillation, ProgressiveDistillation)
    m = _method()
    step = 2  # first iteration of round 0 (4 -> 2 steps)
    assert m.schedule.round_of(step) == 0 and m.round_teacher(0) is m.student_4
    with torch.no_grad():  # make the round teacher depend on w
        for mlp in m.student_4.net.embed.extra_mlps:
            nn.init.normal_(mlp[-1].weight, std=0.5)
    g_s, g_t = subgrid(m.fine, 2), subgrid(m.fine, 4)

    class TwoStep(nn.Module):
        def forward(self, x, s, c, extra=None):
            i = (s[:, None] == g_s[None, :-1].to(s)).double().argmax(1)
            teacher = lambda v, sig: m.student_4(v, sig, c, extra=extra)
            return two_step_target(teacher, x, s, g_t[2 * i + 1].to(s), g_s[i + 1].to(s))

    m.student = TwoStep()
    assert float(m.losses(batch(n=32), step, {"student"})["student"]) < 1e-18

    class WrongW(TwoStep):
        def forward(self, x, s, c, extra=None):
            return super().forward(x, s, c, extra=torch.ones_like(extra))

    m.student = WrongW()
    assert float(m.losses(batch(n=32), step, {"student"})["student"]) > 1e-6


def test_frozen_networks_get_no_gradient_in_both_stages():
    for step in (0, 2):
        m = _method()
        m.losses(batch(), step, {"student"})["student"].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
        for net in (m.teacher, m.student_4, m.student_2):
            assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_stages_and_rounds_switch():
    m = _method()
    assert m.counts == [4, 2, 1]
    assert [m.schedule.round_of(i) for i in range(10)] == [-1, -1, 0, 0, 0, 1, 1, 1, 1, 1]
    train(m, lambda i: batch(seed=i), range(0, 2))  # stage one -> the 4-step w-student
    assert same(m.student_4, m.student) and not same(m.student_2, m.student)
    train(m, lambda i: batch(seed=i), range(2, 5))  # round 0: 4 -> 2
    assert same(m.student_2, m.student) and not same(m.student_4, m.student)


def test_sample_takes_the_guidance_scale():
    m = _method()
    with torch.no_grad():
        for mlp in m.student.net.embed.extra_mlps:
            nn.init.normal_(mlp[-1].weight, std=0.5)
    seen = []
    m.student.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["extra"].clone()), with_kwargs=True)
    noise, labels = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 3, (5,))
    a, b = m.sample(noise, 1, labels, guidance=3.0), m.sample(noise, 1, labels)
    assert torch.equal(seen[0], torch.full((5,), 3.0, dtype=torch.float64)) and (seen[1] == 1.0).all()
    assert (a - b).abs().max() > 1e-4
    grid = subgrid(m.fine, 4)  # from start_steps up: the guided teacher itself
    ref = euler(cfg(m.teacher, 2.0), noise * grid[0], grid, labels)
    assert torch.allclose(m.sample(noise, 4, labels, guidance=2.0), ref, atol=1e-12)
    with pytest.raises(FewstepError, match="labels"):
        m.sample(noise, 1)


def test_short_run_lowers_the_stage_one_loss():
    torch.manual_seed(0)
    m = _method(stage_one_steps=10_000, lr=3e-3)
    data = batch(n=64, seed=5)

    def held_out():
        torch.manual_seed(123)
        return float(m.losses(data, 0, {"student"})["student"].detach())

    before = held_out()
    train(m, lambda i: batch(n=64, seed=100 + i), range(0, 80))
    assert held_out() < 0.5 * before


def test_registered_and_bad_input():
    assert get_method("guided") is GuidedDistillation
    with pytest.raises(FewstepError, match="class-conditional"):
        GuidedDistillation(tiny_teacher(num_classes=0))
    with pytest.raises(FewstepError, match="w_min"):
        _method(w_min=3.0, w_max=2.0)
    with pytest.raises(FewstepError, match="labelled"):
        _method().losses(batch().__class__(size=2, x=torch.zeros(2, 2)), 0, {"student"})


def test_engine_run_resumes_exactly(tmp_path):
    m = engine_resume_matches(
        tmp_path, "guided", steps=7, split=3, start_steps=4, stage_one_steps=2, steps_per_round=3, ema_decay=0.0
    )
    assert m.schedule.round_of(6) == 1
    noise, labels = torch.randn(3, 2), torch.randint(0, 3, (3,))
    assert not torch.equal(m.sample(noise, 1, labels, guidance=1.0), m.sample(noise, 1, labels, guidance=4.0))
    # `fewstep sample --guidance W` reaches the w-conditioned student (the same samples as sample(..., W))
    from fewstep.cli import main
    from fewstep.seeding import seeded_labels, seeded_noise

    out = tmp_path / "s.npz"
    assert (
        main(
            ["sample", "--model", str(tmp_path / "a"), "--steps", "1", "-n", "4", "--guidance", "4", "--out", str(out)]
        )
        == 0
    )
    expected = m.sample(seeded_noise(range(4), (2,)), 1, seeded_labels(range(4), 3), guidance=4.0)
    np.testing.assert_allclose(np.load(out)["samples"], expected.numpy(), rtol=0, atol=1e-5)
