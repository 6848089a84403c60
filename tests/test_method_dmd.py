"""DMD: the distribution-matching gradient against exact scores, ratios, no teacher gradient, a short run."""

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.methods import Batch, get_method
from fewstep.methods._fake_score import dsm_loss
from fewstep.pairs import generate_pairs, load_pairs
from fewstep.students import OneStepGenerator
from fewstep.teachers.analytic import GaussianMixture, ring2d
from fewstep.teachers.native import build_model

DMD = get_method("dmd")


def mlp(dim=2, num_classes=0, hidden=32):
    net = {"dim": dim, "hidden": hidden, "depth": 1, "num_classes": num_classes}
    den = {"sample_shape": [dim], "num_classes": num_classes, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    return build_model("mlp", net, den)


def gaussian(mean, std=0.2):
    return GaussianMixture(torch.tensor([mean], dtype=torch.float64), std)


def test_gradient_is_zero_when_fake_score_equals_real_score():
    teacher = ring2d(k=4, std=0.1, dtype=torch.float64)
    m = DMD(teacher, DMD.Config(reg_weight=0), student=OneStepGenerator(mlp(num_classes=4), 80.0))
    x, y = torch.randn(64, 2, dtype=torch.float64), torch.randint(0, 4, (64,))
    assert torch.equal(m.dm_gradient(x, y), torch.zeros_like(x))  # the fake score starts as the teacher


def fit_fake_score(m, draw, steps=200):
    opt = torch.optim.Adam([m.fake_score.means], lr=0.01)  # stds stay right; the means must be found
    for _ in range(steps):
        loss = dsm_loss(m.fake_score, draw(256), None, m.fake_sigma(256))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_gradient_vanishes_when_generator_distribution_is_the_teachers():
    """A fake score fitted by DSM to exact teacher samples stays on the teacher and gives a gradient
    far smaller than one fitted to a mis-placed generator's samples."""
    torch.manual_seed(0)
    teacher = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), 0.2)
    shift = torch.tensor([0.6, 0.0])
    grads = []
    for offset in (torch.zeros(2), shift):
        m = DMD(teacher, DMD.Config(reg_weight=0), student=OneStepGenerator(mlp(), 80.0))
        m.fake_score.means.data += 0.3  # start off, so the fit has to find the samples
        fit_fake_score(m, lambda n, o=offset: teacher.sample(n) + o)
        assert torch.allclose(m.fake_score.means.detach(), teacher.means + offset, atol=0.06)
        grads.append(m.dm_gradient(teacher.sample(4000) + offset, None).norm(dim=1).mean())
    matched, mis_placed = grads
    assert matched < 0.2 * mis_placed


def test_gradient_moves_a_misplaced_generator_toward_the_data_exactly():
    """Teacher N(mu_r, s^2), generator N(mu_f, s^2) with its exact fake score: for every sample and
    every noise level, -grad points along mu_r - mu_f (both posterior means shrink alike)."""
    teacher = gaussian([1.0, -0.5])
    m = DMD(teacher, DMD.Config(reg_weight=0), student=OneStepGenerator(mlp(), 80.0))
    m.fake_score.means.data[:] = torch.tensor([[-1.0, 0.5]], dtype=torch.float64)
    x = m.fake_score.sample(500)
    step = -m.dm_gradient(x, None)
    toward = (teacher.means - m.fake_score.means).detach()[0]
    cos = torch.nn.functional.cosine_similarity(step, toward.expand_as(step), dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-9)


def test_gradient_sign_on_a_1d_mixture():
    """Data: two modes at -1 and +1; generator stuck at +3: every sample is pushed left."""
    teacher = GaussianMixture(torch.tensor([[-1.0], [1.0]], dtype=torch.float64), 0.2)
    m = DMD(teacher, DMD.Config(reg_weight=0), student=OneStepGenerator(mlp(dim=1), 80.0))
    m.fake_score.means.data[:] = 3.0  # fake score = exact score of the generator's N(3, 0.2^2)
    x = m.fake_score.sample(1000)
    assert (-m.dm_gradient(x, None) < 0).all()


def test_student_loss_is_dm_plus_weighted_regression():
    """At initialisation the fake score equals the teacher, so the DM term is 0 and the generator
    loss is exactly lambda_reg * ||G(z_ref) - y_ref||^2 on the (here single, repeated) stored pair."""
    from fewstep.pairs import Pairs, teacher_fingerprint

    teacher = ring2d(k=4, std=0.1)
    z_ref, y_ref, c_ref = torch.randn(1, 2), torch.tensor([[0.3, -0.7]]), torch.tensor([2])
    meta = {"sample_shape": [2], "num_classes": 4, "teacher_sha256": teacher_fingerprint(teacher)}
    m = DMD(teacher, DMD.Config(reg_weight=0.25), student=OneStepGenerator(mlp(num_classes=4), 80.0),
            pairs=Pairs(z_ref, y_ref, c_ref, meta))  # fmt: skip
    loss = m.losses(Batch(size=6), 0, {"student"})["student"]
    want = 0.25 * (m.student(z_ref, c_ref) - y_ref).pow(2).mean()
    torch.testing.assert_close(loss, want)


def test_teacher_gets_no_gradient_and_losses_are_independent():
    torch.manual_seed(0)
    teacher = mlp(num_classes=3).eval().requires_grad_(False)
    m = DMD(teacher, DMD.Config(reg_weight=0))
    losses = m.losses(Batch(size=8), 0, {"student", "fake_score"})
    assert set(losses) == {"student", "fake_score"}
    losses["student"].backward()
    assert all(p.grad is None for p in m.fake_score.parameters())  # the DM gradient is a constant
    assert any(p.grad is not None for p in m.student.parameters())
    m.student.zero_grad(set_to_none=True)
    losses["fake_score"].backward()
    assert all(p.grad is None for p in m.student.parameters())  # DSM sees sg(G(z))
    assert all(p.grad is None for p in teacher.parameters())
    assert set(m.frozen()) == {"teacher"} and set(m.networks()) == {"student", "fake_score"}


def test_optimizers_step_at_the_configured_ratio():
    teacher = mlp()
    m = DMD(teacher, DMD.Config(reg_weight=0, fake_updates=3))
    specs = m.optimizers()
    assert specs["student"].kind == "adamw" and specs["student"].weight_decay == 0.01
    counts = {"student": 0, "fake_score": 0}
    for i in range(12):
        due = {k for k, s in specs.items() if s.due(i)}
        assert set(m.losses(Batch(size=2), i, due)) == due
        for k in due:
            counts[k] += 1
    assert counts == {"student": 4, "fake_score": 12}
    with pytest.raises(FewstepError, match="fake_updates"):
        DMD(teacher, DMD.Config(reg_weight=0, fake_updates=0))


def run(m, steps, seed):
    torch.manual_seed(seed)
    specs = m.optimizers()
    opts = {
        k: torch.optim.AdamW([p for n in s.networks for p in getattr(m, n).parameters()], lr=s.lr, weight_decay=0)
        for k, s in specs.items()
    }
    for i in range(steps):
        due = {k for k, s in specs.items() if s.due(i)}
        losses = m.losses(Batch(size=64), i, due)
        for k in due:
            opts[k].zero_grad()
            losses[k].backward()
            opts[k].step()


def nll(m, teacher):
    g = torch.Generator().manual_seed(123)
    z, y = torch.randn(2000, 2, generator=g), torch.randint(0, 4, (2000,), generator=g)
    return -teacher.log_prob(m.sample(z, 1, y), 0.0, y).mean().item()


@pytest.mark.parametrize("reg_weight", [0.0, 0.25])
def test_short_run_lowers_the_teacher_nll(tmp_path, reg_weight):
    teacher = ring2d(k=4, std=0.1)
    pairs = None
    if reg_weight:
        generate_pairs(teacher, tmp_path, n=256, steps=8, shard_size=256, batch=256, progress=False)
        pairs = load_pairs(tmp_path)
    torch.manual_seed(0)
    cfg = DMD.Config(reg_weight=reg_weight, lr=2e-3, fake_lr=1e-2)
    m = DMD(teacher, cfg, student=OneStepGenerator(mlp(num_classes=4), 80.0), pairs=pairs)
    before = nll(m, teacher)
    run(m, 300, seed=0)
    assert nll(m, teacher) < 0.2 * before


def test_fewstep_distill_dmd_with_pairs(tmp_path, capsys):
    from engine_helpers import tiny_teacher
    from fewstep.cli import main
    from fewstep.runs import load_run
    from fewstep.teachers.native import save_model

    teacher_dir = str(save_model(tiny_teacher(), tmp_path / "teacher"))
    pairs = str(tmp_path / "pairs")
    assert main(["pairs", "--teacher", teacher_dir, "--n", "32", "--steps", "4", "--out", pairs, "--quiet"]) == 0
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", teacher_dir, "--method", "dmd", "--out", str(out), "--max-steps", "4",
               "--batch", "8", "--set", f"pairs={pairs}", "--set", "fake_updates=2", "--set", "sample_n=0",
               "--set", "cpu=true"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = load_run(out)
    assert m.sample(torch.randn(3, 2), 1, torch.tensor([0, 1, 1])).shape == (3, 2)


def test_gradient_is_divided_by_the_per_sample_normaliser():
    """Eq. 8 by hand on fixed noise: (mu_fake - mu_real) / mean_dims |x - mu_real| per sample."""
    teacher = gaussian([1.0, -0.5])
    m = DMD(teacher, DMD.Config(reg_weight=0), student=OneStepGenerator(mlp(), 80.0))
    m.fake_score.means.data[:] = torch.tensor([[-1.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([[0.3, 0.2], [2.0, -1.0], [-3.0, 4.0]], dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    noise = torch.tensor([[0.1, -0.2], [1.0, 0.5], [-0.3, 0.7]], dtype=torch.float64)
    x_t = x + sigma[:, None] * noise
    real, fake = teacher(x_t, sigma), m.fake_score(x_t, sigma)
    want = (fake - real) / (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(m.dm_gradient(x, None, sigma, noise), want)
    assert not torch.allclose(want, fake - real)  # the normaliser is not 1 here
