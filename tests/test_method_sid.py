"""SiD: the score-identity generator loss, checked in closed form and on Gaussian teachers."""

import math

import pytest
import torch

from dm_helpers import GaussianGenerator, engine_run, gaussian_teacher, grads_of, run, set_fake_to, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.methods.sid import sid_generator_loss, sid_sigma

SiD = get_method("sid")


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_loss_equals_its_closed_form_on_constructed_inputs(alpha):
    g = torch.Generator().manual_seed(0)
    x_g, f_real, f_fake = (torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    # (f_phi - f_psi)^T [(f_phi - x_g) - alpha (f_phi - f_psi)] = (1 - alpha)|D|^2 + D^T (f_psi - x_g)
    D = (f_real - f_fake).flatten(1)
    w = (x_g - f_real).abs().flatten(1).mean(1)
    want = (((1 - alpha) * D.pow(2).sum(1) + (D * (f_fake - x_g).flatten(1)).sum(1)) / w).mean()
    assert torch.allclose(sid_generator_loss(x_g, f_real, f_fake, alpha), want, rtol=1e-12)
    # one hand-computed number: x_g = 0, f_real = 1, f_fake = 0.5 on one pixel
    one = sid_generator_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.full((1, 1), 0.5), alpha)
    assert float(one) == pytest.approx(0.5 * (1 - 0.5 * alpha))


def test_the_normaliser_is_a_constant_but_gradients_reach_all_three_inputs():
    x_g, f_real, f_fake = (torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alpha = 1.2
    sid_generator_loss(x_g, f_real, f_fake, alpha).backward()
    w = (x_g - f_real).abs().mean(1, keepdim=True).detach()
    D = (f_real - f_fake).detach()
    n = 3  # batch mean
    assert torch.allclose(x_g.grad, -D / w / n)
    assert torch.allclose(f_fake.grad, (-(f_real - x_g) + 2 * alpha * D).detach() / w / n)
    assert torch.allclose(f_real.grad, ((f_real - x_g) - 2 * alpha * D + D).detach() / w / n)


def test_generator_noise_levels_lie_on_the_karras_ramp_up_to_tmax():
    torch.manual_seed(0)
    s = sid_sigma(20000, 800, 0.002, 80.0)
    top = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # t = 0.8
    assert s.min() >= 0.002 and s.max() <= top + 1e-4 and s.max() > 0.95 * top
    # t is uniform: the median level sits at t = 0.4 on the ramp
    mid = (80 ** (1 / 7) + 0.6 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(float(s.median()), mid, rel_tol=0.05)


def test_gradient_is_zero_when_the_fake_score_equals_the_real_score():
    torch.manual_seed(0)
    m = SiD(gaussian_teacher(), student=GaussianGenerator([2.0, -1.0], 0.7))
    m.losses(Batch(size=64), 0, {"student"})["student"].backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(m.student))


def test_gradient_points_the_generator_to_the_data():
    # teacher N(0, s^2), generator N(d, s^2), psi exact: f_phi - f_psi = -c d with c = sigma^2/(s^2+sigma^2),
    # so the gradient in the generator's mean is E[c^2 / w] d: positive along d (descent moves to 0).
    torch.manual_seed(0)
    s, d = 0.3, torch.tensor([1.0, -0.5])
    m = SiD(gaussian_teacher(std=s), student=GaussianGenerator(d, s))
    set_fake_to(m, d, s)
    m.losses(Batch(size=4096), 0, {"student"})["student"].backward()
    g = m.student.mean.grad
    assert float(g @ d) > 0 and float(torch.cosine_similarity(g, d, 0)) > 0.999


def test_teacher_and_fake_score_get_no_gradient_from_the_generator_and_vice_versa():
    teacher = tiny_teacher("mlp", num_classes=3)
    m = SiD(teacher)
    assert m.student.sigma_init == 2.5 and set(m.networks()) == {"student", "fake_score"}
    m.losses(Batch(size=8), 0, {"student"})["student"].backward()
    assert any(g is not None and g.abs().sum() > 0 for g in grads_of(m.student))
    assert all(g is None for g in grads_of(m.fake_score) + grads_of(teacher))
    assert all(p.requires_grad for p in m.fake_score.parameters())  # restored after the step
    m.student.zero_grad(set_to_none=True)
    m.losses(Batch(size=8), 0, {"fake_score"})["fake_score"].backward()
    assert all(g is None for g in grads_of(m.student) + grads_of(teacher))


@pytest.mark.parametrize("ratio", [1, 4])
def test_optimizers_step_at_the_configured_ratio(ratio):
    m = SiD(gaussian_teacher(), SiD.Config(fake_updates=ratio), student=GaussianGenerator([0.0, 0.0], 1.0))
    assert m.optimizers()["student"].betas == (0.0, 0.999)
    cycles, rest = divmod(12, ratio + 1)
    assert run(m, 12, 4) == {"fake_score": cycles * ratio + min(rest, ratio), "student": cycles}
    # the reference's order: ratio fake-score steps, then a generator step that sees their result
    # (never both in one iteration, where the generator would use the fake score before its update)
    specs = m.optimizers()
    due = ["".join(k[0] for k, s in specs.items() if s.due(i)) for i in range(2 * (ratio + 1))]
    assert due == (["f"] * ratio + ["s"]) * 2


def test_short_run_moves_the_generator_onto_the_teacher():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -0.5])
    teacher = gaussian_teacher(mu.tolist(), 0.3)
    m = SiD(teacher, student=GaussianGenerator([0.0, 0.0], 1.0))

    def loglik():
        return float(teacher.log_prob(m.sample(torch.randn(4000, 2))).mean())

    before = loglik()
    run(m, 300, 256, lr=0.02)
    assert float((m.student.mean.detach() - mu).norm()) < 0.1  # started 1.12 away
    assert abs(float(m.student.log_std.detach().exp()) - 0.3) < 0.1  # started at std 1.0
    assert loglik() > before + 2.0
    with pytest.raises(FewstepError, match="steps=1"):
        m.sample(torch.randn(2, 2), 2)


def test_runs_under_the_engine_and_reloads(tmp_path):
    teacher = tiny_teacher("mlp", num_classes=3)
    m, loaded = engine_run(tmp_path, "sid", teacher, steps=3, lr=1e-3, fake_lr=1e-3)
    assert m.run.summary["step"] == 3 and loaded.run.step == 3
    z, c = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(loaded.sample(z, 1, c), m.sample(z, 1, c))


def test_lsg_guides_both_scores_and_drops_prompts_in_the_fake_step():
    """SiD-LSG (arXiv 2406.01561): with psi = the teacher and kappa_2 = kappa_4 the generator gradient
    is zero (both guided scores agree; to rounding, as plain SiD's on this network); kappa_2 != kappa_4
    moves it; psi's own step runs on its kappa_1-guided output with about a tenth of the labels
    replaced by the null label."""
    teacher = tiny_teacher("mlp", num_classes=3)
    torch.manual_seed(0)
    same = SiD(teacher, SiD.Config(guidance=2.0, fake_guidance=2.0, fake_eval_guidance=2.0))
    same.losses(Batch(size=64), 0, {"student"})["student"].backward()
    zero = max(g.abs().max().item() for g in grads_of(same.student) if g is not None)
    torch.manual_seed(0)
    other = SiD(teacher, SiD.Config(guidance=2.0, fake_guidance=2.0, fake_eval_guidance=1.0))
    other.losses(Batch(size=64), 0, {"student"})["student"].backward()
    moved = max(g.abs().max().item() for g in grads_of(other.student) if g is not None)
    assert zero < 1e-8 < 1e-3 < moved
    seen = []
    hook = same.fake_score.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    same.losses(Batch(size=2000), 0, {"fake_score"})["fake_score"].backward()
    hook.remove()
    (labels,) = seen  # one call: conditional and null halves as one batch (CFG)
    cond, null = labels.chunk(2)
    assert null.eq(3).all() and 0.07 < cond.eq(3).float().mean() < 0.13
    plain = SiD(teacher)  # SiD's defaults: psi unguided, no dropped labels
    seen.clear()
    hook = plain.fake_score.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    plain.losses(Batch(size=200), 0, {"fake_score"})
    hook.remove()
    assert len(seen) == 1 and len(seen[0]) == 200 and not seen[0].eq(3).any()
