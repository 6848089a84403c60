"""ADD (arXiv 2311.17042): distillation loss against the exact teacher, the student levels and
sampler, frozen networks, the G:D update ratio under the engine, and a short 2-D run."""

import pytest
import torch

from adv_helpers import PointFeatures, mlp_denoiser, nearest_mode_distance, run
from engine_helpers import tiny_config
from fewstep.data import Dataset
from fewstep.errors import FewstepError
from fewstep.io import load_tensors
from fewstep.methods import get_method
from fewstep.methods._adversarial import few_step_levels, sd_levels, sd_sigmas
from fewstep.methods.add import ADD, ADDConfig
from fewstep.methods.base import Batch
from fewstep.runs import checkpoints as runck
from fewstep.solvers import renoise_sample
from fewstep.teachers.analytic import ring2d
from fewstep.train.loop import train


def make(teacher=None, **kw):
    teacher = teacher if teacher is not None else ring2d()
    student = mlp_denoiser(32, 2).to(teacher.means.dtype)
    return ADD(teacher, ADDConfig(**kw), student=student, features=PointFeatures().to(teacher.means.dtype))


def test_levels_match_sd_timesteps_at_equal_snr():
    s = sd_sigmas()
    assert float(s[999]) == pytest.approx(14.6146, abs=1e-3)  # SD's scaled-linear schedule
    levels = sd_levels((999, 749, 499, 249), 0.5, 80.0)
    assert levels == pytest.approx((0.5 * 14.6146, 0.5 * 4.0817, 0.5 * 1.6129, 0.5 * 0.6932), abs=1e-3)
    assert sd_levels((999,), 0.5, 5.0) == (5.0,)  # capped at the teacher's sigma_max
    assert few_step_levels(levels, 1) == [levels[0]]
    assert few_step_levels(levels, 2) == [levels[0], levels[2]]  # SDXL-Turbo's 999, 499
    assert few_step_levels(levels, 4) == list(levels)
    with pytest.raises(FewstepError, match="1..4"):
        few_step_levels(levels, 8)


def test_renoise_sampler_denoises_then_renoises():
    seen = []

    def student(x, sigma, cond):
        seen.append((float(sigma[0]), x.clone()))
        return torch.full_like(x, 0.25)

    torch.manual_seed(0)
    z = torch.randn(3, 2)
    out = renoise_sample(student, z, [80.0, 2.0], None)
    torch.manual_seed(0)
    torch.randn(3, 2)
    eps = torch.randn(3, 2)
    assert [s for s, _ in seen] == [80.0, 2.0]
    assert torch.allclose(seen[0][1], 80 * z)
    assert torch.allclose(seen[1][1], 0.25 + 2.0 * eps)  # x0_hat re-noised with fresh noise
    assert torch.allclose(out, torch.full((3, 2), 0.25))


def test_distillation_loss_equals_closed_form(mixture64):
    m = make(mixture64, c_t="exp")
    x_hat = torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(3)
    idx = torch.randint(1000, (6,))
    eps = torch.randn(6, 2, dtype=torch.float64)
    t = (sd_sigmas() * mixture64.sigma_data).clamp(mixture64.sigma_min, mixture64.sigma_max).float()[idx].double()
    target = mixture64(x_hat + t[:, None] * eps, t, labels)
    c_t = 1 / (1 + (t / mixture64.sigma_data) ** 2).sqrt()  # alpha_t of the matching SD timestep
    expect = (c_t * (x_hat - target).pow(2).sum(1)).mean()  # the paper's squared norm, summed over dimensions
    torch.manual_seed(3)
    assert m.distill_loss(x_hat, labels).item() == pytest.approx(expect.item(), rel=1e-6)
    m.config.distill_reduce = "mean"
    torch.manual_seed(3)
    assert m.distill_loss(x_hat, labels).item() == pytest.approx(expect.item() / 2, rel=1e-6)


def test_frozen_networks_get_no_gradient():
    m = make()
    for p in m.teacher.parameters():  # the analytic teacher has none; give it one to watch
        p.requires_grad_(False)
    x0 = ring2d().sample(16)
    m.generator_loss(m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in m.features.parameters())
    assert all(p.grad is None for p in m.discriminator.parameters())  # G's loss leaves D alone
    assert any(p.grad is not None for p in m.student.parameters())
    m.student.zero_grad(set_to_none=True)
    m.discriminator_loss(x0, m.generate(x0, None), None).backward()
    assert all(p.grad is None for p in m.student.parameters())  # D's loss uses sg(G)
    assert all(p.grad is not None for p in m.discriminator.parameters())


def test_engine_steps_generator_and_discriminator_at_the_configured_ratio(tmp_path):
    m = make(gen_every=3, r1_gamma=1.0)
    data = Dataset(ring2d().sample(256), None, 0, "ring")
    train(m, tiny_config(max_steps=9, checkpoint_every=9), tmp_path, data=data)
    opt = load_tensors(runck.latest(tmp_path / "checkpoints").path / "optim.safetensors")
    assert float(opt["opt.discriminator.0.step"]) == 9
    assert float(opt["opt.student.0.step"]) == 3  # iterations 2, 5, 8
    spec = m.optimizers()["student"]
    assert [i for i in range(9) if spec.due(i)] == [2, 5, 8]


def test_short_run_moves_samples_toward_the_data():
    torch.manual_seed(0)
    teacher = ring2d()
    m = make(teacher, lr=1e-3, d_lr=1e-3)
    data = teacher.sample(2048, torch.Generator().manual_seed(1))
    z = torch.randn(256, 2)
    before = nearest_mode_distance(m.sample(z, 1), teacher.means)
    run(m, data, None, 100, 64)
    after = nearest_mode_distance(m.sample(z, 1), teacher.means)
    assert before > 0.9 and after < 0.5 * before


def test_registered_and_config_errors():
    assert get_method("add") is ADD and ADD.family == "adversarial" and ADD.needs_data
    with pytest.raises(FewstepError, match="c\\(t\\)"):
        make(c_t="sds")
    with pytest.raises(FewstepError, match="decreasing"):
        make(student_sigmas=(1.0, 2.0))
    with pytest.raises(FewstepError, match="real images"):
        make().losses(Batch(4), 0, {"student"})
