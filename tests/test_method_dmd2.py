"""DMD2: distribution matching with two time-scales, a GAN head on the fake score, multi-step students."""

import pytest
import torch

from dm_helpers import (
    GaussianDenoisingStudent,
    engine_run,
    gaussian_teacher,
    grads_of,
    run,
    set_fake_to,
    tiny_images,
    tiny_teacher,
)
from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.methods._fake_score import KarrasSigmaSampler

DMD2 = get_method("dmd2")
NO_GAN = DMD2.Config(gan=False)


def test_gradient_is_zero_when_the_fake_score_equals_the_real_score():
    torch.manual_seed(0)
    m = DMD2(gaussian_teacher(), NO_GAN, student=GaussianDenoisingStudent([2.0, -1.0], 0.7))
    m.losses(Batch(size=64), 0, {"student"})["student"].backward()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads_of(m.student))


def test_gradient_is_the_normalised_score_difference_and_points_to_the_data():
    # teacher N(0, s^2), generator N(d, s^2), psi exact: D_psi - D_real = c d with c = sigma^2/(s^2+sigma^2);
    # DMD's gradient per pixel is that over mean|x - D_real|, averaged over all B*D elements.
    torch.manual_seed(0)
    s, d = 0.3, torch.tensor([1.0, -0.5])
    m = DMD2(gaussian_teacher(std=s), NO_GAN, student=GaussianDenoisingStudent(d, s))
    set_fake_to(m, d, s)
    m.losses(Batch(size=4096), 0, {"student"})["student"].backward()
    g = m.student.mean.grad
    assert float(g @ d) > 0 and float(torch.cosine_similarity(g, d, 0)) > 0.999


def test_dm_loss_matches_the_reference_formula_on_fixed_noise():
    torch.manual_seed(0)
    m = DMD2(gaussian_teacher(std=0.3), NO_GAN, student=GaussianDenoisingStudent([0.0, 0.0], 0.3))
    set_fake_to(m, [0.5, 0.5], 0.4)
    x = torch.randn(6, 2, requires_grad=True)
    torch.manual_seed(1)
    m.dm_loss(x, None).backward()
    torch.manual_seed(1)  # replay the same sigma and noise
    sigma = m.dm_sigma(6, "cpu")
    x_t = x.detach() + sigma[:, None] * torch.randn(6, 2)
    real, fake = m.teacher(x_t, sigma), m.fake_score(x_t, sigma).detach()
    grad = (fake - real) / (x.detach() - real).abs().mean(1, keepdim=True)
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-7)
    assert sigma.min() >= m.dm_sigma.sigmas[20] and sigma.max() <= m.dm_sigma.sigmas[980]


def test_optimizers_follow_the_reference_two_time_scale_rule():
    m = DMD2(gaussian_teacher(), NO_GAN, student=GaussianDenoisingStudent([0.0, 0.0], 1.0))
    specs = m.optimizers()
    assert specs["student"].every == 5 and specs["fake_score"].every == 1
    assert specs["student"].kind == "adamw" and specs["student"].weight_decay == 0.01
    assert specs["student"].lr == 2e-6 and specs["student"].grad_clip == 10.0
    # 500-iteration warm-up: psi's k-th step at k/500, the generator's (every 5th iteration) at 5k/500
    assert specs["fake_score"].lr_schedule(250) == 0.5 and specs["fake_score"].lr_schedule(900) == 1.0
    assert specs["student"].lr_schedule(50) == 0.5 and specs["student"].lr_schedule(0) == 0.0
    assert run(m, 20, 4) == {"student": 4, "fake_score": 20}  # generator on i % 5 == 0


def test_gan_head_reads_the_fake_score_bottleneck_and_gradients_go_where_they_should():
    torch.manual_seed(0)
    teacher = tiny_teacher("unet", num_classes=2)
    m = DMD2(teacher)  # paper defaults: GAN on psi's bottleneck
    assert set(m.networks()) == {"student", "fake_score", "classifier"}
    assert m.optimizers()["fake_score"].networks == ["fake_score", "classifier"]
    real, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.randint(0, 2, (8,))
    m.losses(Batch(size=8, x=real, labels=labels), 0, {"student"})["student"].backward()
    assert any(g is not None and g.abs().sum() > 0 for g in grads_of(m.student))
    assert all(g is None for g in grads_of(m.fake_score) + grads_of(m.classifier) + grads_of(teacher))
    m.student.zero_grad(set_to_none=True)
    m.losses(Batch(size=8, x=real, labels=labels), 1, {"fake_score"})["fake_score"].backward()
    assert all(g is None for g in grads_of(m.student) + grads_of(teacher))
    assert all(g is not None for g in grads_of(m.classifier))
    # the classifier loss reaches psi's encoder (bottleneck) as in the reference's guidance optimizer
    assert m.fake_score.net.mid[0].conv0.weight.grad.abs().sum() > 0
    with pytest.raises(FewstepError, match="real images"):
        m.losses(Batch(size=8), 1, {"fake_score"})


def test_generator_loss_is_dm_plus_weighted_non_saturating_gan_loss():
    teacher = tiny_teacher("unet", num_classes=2)
    m = DMD2(teacher)
    torch.manual_seed(3)
    total = m.losses(Batch(size=4), 0, {"student"})["student"]
    torch.manual_seed(3)  # replay the same draws by hand
    z, cond = m._noise_and_labels(4)
    x = m.student(80 * z, torch.full((4,), 80.0), cond)  # one step: G(80 z, 80)
    dm = m.dm_loss(x, cond)
    gan = torch.nn.functional.softplus(-m.logits(x, cond)).mean()
    assert torch.allclose(total, dm + 3e-3 * gan) and gan > 0


def test_teacher_feature_head_trains_only_the_head():
    teacher = tiny_teacher("unet", num_classes=2)
    m = DMD2(teacher, DMD2.Config(gan_features="teacher"))
    real, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randint(0, 2, (4,))
    m.losses(Batch(size=4, x=real, labels=labels), 1, {"fake_score"})["fake_score"].backward()
    assert all(g is not None for g in grads_of(m.classifier))
    assert all(g is None for g in grads_of(teacher))
    with pytest.raises(FewstepError, match="UNet"):
        DMD2(tiny_teacher("mlp"))  # the GAN needs bottleneck features


def test_multistep_grid_and_backward_simulation():
    class Recorder(GaussianDenoisingStudent):
        def forward(self, x, sigma, cond=None):
            calls.append((float(sigma[0]), torch.is_grad_enabled()))
            return super().forward(x, sigma, cond)

    m = DMD2(gaussian_teacher(), DMD2.Config(gan=False, student_steps=4), student=Recorder([0.0, 0.0], 1.0))
    grid = KarrasSigmaSampler.of(m.teacher).sigmas
    want = [float(grid[i]) for i in (999, 749, 499, 249)]  # the paper's timesteps on the Karras grid
    assert m.student_sigmas.tolist() == pytest.approx(want) and want[0] == pytest.approx(80.0)
    assert m.default_steps == (1, 2, 4)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        calls = []
        m.generate(torch.randn(3, 2), None)
        sig = [c[0] for c in calls]
        j = len(sig) - 1
        assert sig == pytest.approx(want[: j + 1])  # steps 0..j in order, from pure noise
        assert [c[1] for c in calls] == [False] * j + [True]  # gradient through the last step only
        seen.add(j)
    assert seen == {0, 1, 2, 3}
    for steps, n in ((1, 1), (2, 2), (4, 4)):
        calls = []
        assert m.sample(torch.randn(5, 2), steps).shape == (5, 2) and len(calls) == n
    assert [c[0] for c in calls] == pytest.approx(want)
    with pytest.raises(FewstepError, match="steps dividing 4"):
        m.sample(torch.randn(5, 2), 3)


def test_short_run_moves_the_generator_onto_the_teacher():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -0.5])
    teacher = gaussian_teacher(mu.tolist(), 0.3)
    m = DMD2(teacher, DMD2.Config(gan=False, fake_updates=2), student=GaussianDenoisingStudent([0.0, 0.0], 1.0))

    def loglik():
        return float(teacher.log_prob(m.sample(torch.randn(4000, 2))).mean())

    before = loglik()
    run(m, 400, 256, lr=0.02)
    assert float((m.student.mean.detach() - mu).norm()) < 0.1  # started 1.12 away
    assert abs(float(m.student.log_std.detach().exp()) - 0.3) < 0.1  # started at std 1.0
    assert loglik() > before + 2.0


def test_runs_under_the_engine_with_real_images_and_reloads(tmp_path):
    teacher = tiny_teacher("unet", num_classes=2)
    m, loaded = engine_run(tmp_path, "dmd2", teacher, steps=6, data=tiny_images(), student_steps=2, lr=1e-3)
    assert m.run.summary["step"] == 6 and loaded.run.step == 6 and loaded.needs_data
    z, c = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 0])
    assert torch.allclose(loaded.sample(z, 1, c), m.sample(z, 1, c))
    assert loaded.sample(z, 2, c).shape == (3, 1, 8, 8)
    _, no_gan = engine_run(tmp_path / "b", "dmd2", teacher, steps=2, gan=False)
    assert not no_gan.needs_data and "classifier" not in no_gan.networks()
