"""Diff-Instruct: the integral-KL gradient through a fake score, checked on Gaussian teachers."""

import pytest
import torch

from dm_helpers import GaussianGenerator, engine_run, gaussian_teacher, grads_of, run, set_fake_to, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.schedules import sample_lognormal

DI = get_method("diff_instruct")


def test_gradient_is_zero_when_the_fake_score_equals_the_real_score():
    torch.manual_seed(0)
    teacher = gaussian_teacher()
    m = DI(teacher, student=GaussianGenerator([2.0, -1.0], 0.7))  # far from the data; psi = teacher copy
    m.losses(Batch(size=64), 0, {"student"})["student"].backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(m.student))


def test_gradient_is_the_closed_form_and_points_the_generator_to_the_data():
    # teacher N(0, s^2), generator N(d, s^2), psi its exact score: D_psi - D_phi = sigma^2/(s^2+sigma^2) d
    # for every x_t, so d loss / d m = E_sigma[sigma^2 / (s^2 + sigma^2)] d, a step toward the data.
    torch.manual_seed(0)
    s, d = 0.3, torch.tensor([1.0, -0.5])
    m = DI(gaussian_teacher(std=s), student=GaussianGenerator(d, s))
    set_fake_to(m, d, s)
    m.losses(Batch(size=20000), 0, {"student"})["student"].backward()
    sig = sample_lognormal(400000).double()
    coef = float((sig**2 / (s**2 + sig**2)).mean())
    assert torch.allclose(m.student.mean.grad, coef * d, rtol=0.02)
    assert abs(float(m.student.log_std.grad)) < 0.02  # same spread: no pull on the std


def test_teacher_and_fake_score_get_no_gradient_from_the_generator_and_vice_versa():
    teacher = tiny_teacher("mlp", num_classes=3)
    m = DI(teacher, DI.Config(guidance=2.0))  # student and psi are copies of the EDM teacher
    assert set(m.networks()) == {"student", "fake_score"} and m.frozen() == {"teacher": teacher}
    m.losses(Batch(size=8), 0, {"student"})["student"].backward()
    assert any(g is not None and g.abs().sum() > 0 for g in grads_of(m.student))
    assert all(g is None for g in grads_of(m.fake_score) + grads_of(teacher))
    m.student.zero_grad(set_to_none=True)
    m.losses(Batch(size=8), 0, {"fake_score"})["fake_score"].backward()
    assert all(g is None for g in grads_of(m.student) + grads_of(teacher))
    assert any(g is not None for g in grads_of(m.fake_score))


@pytest.mark.parametrize("ratio", [1, 3])
def test_optimizers_step_at_the_configured_ratio(ratio):
    teacher = gaussian_teacher()
    m = DI(teacher, DI.Config(fake_updates=ratio), student=GaussianGenerator([0.0, 0.0], 1.0))
    specs = m.optimizers()
    assert specs["fake_score"].betas == (0.0, 0.999) and specs["fake_score"].lr == 1e-5
    cycles, rest = divmod(12, ratio + 1)
    assert run(m, 12, 4) == {"fake_score": cycles * ratio + min(rest, ratio), "student": cycles}
    # the reference's order: ratio fake-score steps, then a generator step that sees their result
    # (never both in one iteration, where the generator would use the fake score before its update)
    specs = m.optimizers()
    due = ["".join(k[0] for k, s in specs.items() if s.due(i)) for i in range(2 * (ratio + 1))]
    assert due == (["f"] * ratio + ["s"]) * 2
    assert m.losses(Batch(size=4), 0, set()) == {}


def test_short_run_moves_the_generator_onto_the_teacher():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -0.5])
    teacher = gaussian_teacher(mu.tolist(), 0.3)
    m = DI(teacher, student=GaussianGenerator([0.0, 0.0], 1.0))

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
    m, loaded = engine_run(tmp_path, "diff_instruct", teacher, steps=3, lr=1e-3, fake_lr=1e-3)
    assert m.run.summary["step"] == 3 and loaded.run.step == 3
    z, c = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(loaded.sample(z, 1, c), m.sample(z, 1, c))
