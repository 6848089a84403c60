import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.methods import get_method
from fewstep.methods._rounds import RoundSchedule, pd_loss, subgrid, two_step_target, x0_target
from fewstep.methods.progressive import ProgressiveConfig, ProgressiveDistillation
from fewstep.solvers import ddim_step, euler
from pd_support import batch, engine_resume_matches, same, tiny_teacher, train


def _analytic(mixture):
    return lambda x, s: mixture(x, s)


@pytest.mark.parametrize("sigmas", [(3.0, 1.2, 0.4), (0.5, 0.1, 0.0)])
def test_target_reproduces_two_teacher_ddim_steps(mixture64, sigmas):
    """One student DDIM step with x~ lands on two teacher DDIM steps (float64, exact denoiser)."""
    s, s_mid, s_next = sigmas
    x = torch.randn(32, 2, dtype=torch.float64) * 2
    two_steps = euler(mixture64, x, torch.tensor([s, s_mid, s_next], dtype=torch.float64))
    full = lambda v: torch.full((32,), v, dtype=torch.float64)
    target = two_step_target(_analytic(mixture64), x, full(s), full(s_mid), full(s_next))
    assert torch.allclose(ddim_step(x, target, full(s), full(s_next)), two_steps, atol=1e-12, rtol=0)
    # the target differs from the teacher's own x0 prediction (otherwise distillation is trivial)
    assert (target - mixture64(x, full(s))).abs().max() > 1e-3


def test_x0_target_inverts_ddim_per_sample():
    x, x0 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    s, s_next = torch.rand(5, dtype=torch.float64) + 1, torch.rand(5, dtype=torch.float64)
    assert torch.allclose(x0_target(x, ddim_step(x, x0, s, s_next), s, s_next), x0, atol=1e-12)


def _method(**kw):
    cfg = ProgressiveConfig(**{"start_steps": 8, "steps_per_round": 3, **kw})
    return ProgressiveDistillation(tiny_teacher(), cfg)


def test_two_step_student_has_zero_loss(mixture64):
    """pd_loss of a student equal to the two-step map of its teacher is zero (and > 0 otherwise)."""
    m = _method()
    teacher = _analytic(mixture64)
    for n in (4, 2, 1):
        g_s, g_t = subgrid(m.fine, n), subgrid(m.fine, 2 * n)

        def two_step_map(x, s, g_s=g_s, g_t=g_t):
            i = (s[:, None] == g_s[None, :-1]).double().argmax(1)
            assert torch.equal(g_s[i], s)
            return two_step_target(teacher, x, s, g_t[2 * i + 1], g_s[i + 1])

        x0 = mixture64.sample(64)
        assert pd_loss(two_step_map, teacher, x0, n, m.fine, "snr_trunc", 0.5) < 1e-18
        assert pd_loss(teacher, teacher, x0, n, m.fine, "snr_trunc", 0.5) > 1e-4


def test_frozen_networks_get_no_gradient():
    m = _method(start_steps=4)
    loss = m.losses(batch(), 0, {"student"})["student"]
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in m.student.parameters())
    for net in [m.teacher, m.student_2]:
        assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert m.losses(batch(), 0, set()) == {}


def test_rounds_switch_and_halve_steps():
    m = _method()  # 8 -> 4 -> 2 -> 1, three iterations per round
    assert m.counts == [8, 4, 2, 1]
    s = m.schedule
    assert [s.round_of(i) for i in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert [s.student_steps(s.round_of(i)) for i in (0, 3, 6, 20)] == [4, 2, 1, 1]
    assert m.round_teacher(0) is m.teacher and m.round_teacher(1) is m.student_4
    assert m.round_teacher(2) is m.student_2

    train(m, lambda i: batch(seed=i), range(0, 3))  # round 0
    assert same(m.student_4, m.student) and not same(m.student_2, m.student)
    frozen4 = [p.clone() for p in m.student_4.parameters()]
    train(m, lambda i: batch(seed=i), range(3, 6))  # round 1: teacher := round-0 student, kept
    assert all(torch.equal(a, b) for a, b in zip(frozen4, m.student_4.parameters(), strict=True))
    assert same(m.student_2, m.student) and not same(m.student_4, m.student)
    assert not hasattr(m, "student_1")  # the last round's student is the run's student


def test_sampler_uses_the_student_of_its_step_count():
    m = _method()
    calls = {}
    for k in (4, 2, 1):
        net = getattr(m, f"student_{k}") if k > 1 else m.student
        net.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
    noise, labels = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 3, (6,))
    for k in (4, 2, 1):
        out = m.sample(noise, k, labels)
        assert out.shape == noise.shape and torch.isfinite(out).all()
    assert calls == {4: 4, 2: 2, 1: 1}
    assert torch.equal(m.model_for(8)[1], m.fine) and m.model_for(8)[0] is m.teacher
    # a 1-step sample is one DDIM step from sigma_max to 0: the network's x0 prediction
    sig = torch.full((6,), m.fine[0].item(), dtype=torch.float64)
    assert torch.allclose(m.sample(noise, 1, labels), m.student(noise * m.fine[0], sig, labels))
    assert m.model_for(3)[0] is m.student_2 and len(m.model_for(3)[1]) == 4  # 3 steps: the 2-step student


def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    m = _method(start_steps=4, steps_per_round=10_000, lr=3e-3)
    data = batch(n=64, seed=5)

    def held_out():
        torch.manual_seed(123)
        return float(m.losses(data, 0, {"student"})["student"].detach())

    before = held_out()
    train(m, lambda i: batch(n=64, seed=100 + i), range(0, 80))
    assert held_out() < 0.5 * before


def test_registered_and_bad_config():
    assert get_method("progressive") is ProgressiveDistillation
    with pytest.raises(FewstepError):
        _method(start_steps=6)
    with pytest.raises(FewstepError):
        _method(start_steps=1)
    with pytest.raises(FewstepError, match="real data"):
        _method().losses(batch().__class__(size=4), 0, {"student"})
    assert RoundSchedule((4, 2, 1), 5, offset=3).round_of(2) == -1


def test_lr_anneal_restarts_every_round():
    m = _method(lr_anneal=True)  # rounds of 3 iterations
    f = m.optimizers()["student"].lr_schedule
    assert [f(k) for k in range(12)] == pytest.approx([1, 2 / 3, 1 / 3] * 3 + [0, 0, 0])
    assert _method().optimizers()["student"].lr_schedule is None


def test_engine_run_resumes_exactly_and_keeps_round_students(tmp_path):
    """Under the engine (ema_decay 0): rounds switch at the configured iterations, resuming
    mid-round reproduces the straight run, and the round copies are saved and reloaded."""
    from fewstep.runs import load_run

    opts = dict(start_steps=4, steps_per_round=3, ema_decay=0.0)
    m = engine_resume_matches(tmp_path, "progressive", steps=8, split=4, **opts)
    assert m.counts == [4, 2, 1] and m.schedule.round_of(7) == 1
    assert not same(m.student_2, m.student)  # frozen since the end of round 0 (iteration 2)
    loaded = load_run(tmp_path / "a")
    assert same(loaded.student_2, m.student_2) and same(loaded.student, m.student)
    noise, labels = torch.randn(5, 2), torch.randint(0, 3, (5,))
    for k in (1, 2):
        assert torch.equal(loaded.sample(noise, k, labels), m.sample(noise, k, labels))


def test_student_dropout_is_set_and_the_teacher_keeps_its_own():
    from fewstep.networks.unet import UNetConfig
    from fewstep.teachers.native import build_model

    net = UNetConfig(channels=8, channel_mult=(1,), blocks=1, attn_resolutions=(), num_classes=2, dropout=0.3)
    teacher = build_model("unet", net.to_dict(), {"sample_shape": [1, 8, 8], "num_classes": 2}).eval()
    rates = lambda m: {b.dropout for b in m.modules() if isinstance(getattr(b, "dropout", None), float)}
    m = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=2))
    assert rates(m.student) == {0.0} and m.student.net.config.dropout == 0.0 and rates(m.teacher) == {0.3}
    m = ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=2, dropout=None))
    assert rates(m.student) == {0.3}


def test_rounds_of_different_lengths():
    s = RoundSchedule((8, 4, 2, 1), (1, 2, 3), offset=2)
    assert [s.round_of(i) for i in range(10)] == [-1, -1, 0, 1, 1, 2, 2, 2, 2, 2]
    assert [s.start(r) for r in range(3)] == [2, 3, 5]
    m = _method(steps_per_round=(1, 2, 3), lr_anneal=True)
    assert [m.optimizers()["student"].lr_schedule(k) for k in range(4)] == pytest.approx([1, 1, 0.5, 1])
    with pytest.raises(FewstepError, match="round lengths"):
        _method(steps_per_round=(1, 2))
    with pytest.raises(FewstepError, match=">= 1"):
        _method(steps_per_round=0)


def test_loss_weights_are_the_closed_forms():
    """Truncated SNR max(1/sigma^2, 1) (Salimans & Ho, Sec. 4), EDM's lambda, constant 1."""
    from fewstep.losses import loss_weight

    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(sigma), torch.tensor([100.0, 4.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    edm = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss_weight(sigma, "edm", 0.5), edm)
    torch.testing.assert_close(loss_weight(sigma, "constant"), torch.ones_like(sigma))


def test_guidance_guides_round_zeros_teacher_only():
    """``guidance=w``: round 0 distils two DDIM steps of the guided teacher (and the sampler's
    fine-grid fallback is the guided teacher); later rounds' teachers are the kept students."""
    from fewstep.guidance import cfg
    from fewstep.methods.lightning import Lightning, LightningConfig

    teacher = tiny_teacher()
    c = ProgressiveConfig(start_steps=4, steps_per_round=2, guidance=3.0)
    m, b = ProgressiveDistillation(teacher, c), batch()
    guided = cfg(teacher, 3.0)
    x, s = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    torch.testing.assert_close(m.round_teacher(0)(x, s, y), guided(x, s, y), rtol=0, atol=0)
    assert ProgressiveDistillation(teacher, ProgressiveConfig(start_steps=4)).round_teacher(0) is teacher
    assert m.round_teacher(1) is m.student_2 and m.model_for(4)[0] is m.start_teacher
    torch.manual_seed(0)
    got = m.losses(b, 0, {"student"})["student"]
    torch.manual_seed(0)
    want = pd_loss(lambda x, s: m.student(x, s, b.labels), lambda x, s: guided(x, s, b.labels), b.x, 2, m.fine,
                   c.weighting, teacher.sigma_data)  # fmt: skip
    assert torch.equal(got, want)
    lightning = Lightning(teacher, LightningConfig(start_steps=4, guidance=3.0))
    torch.testing.assert_close(lightning.round_teacher(0)(x, s, y), guided(x, s, y), rtol=0, atol=0)
