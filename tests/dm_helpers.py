"""Shared pieces of the distribution-matching method tests (Diff-Instruct, DMD2, SiD).

A Gaussian teacher N(mu, s^2 I) has an exact denoiser; a generator z -> m + std z produces exactly
Gaussian samples, and a fake score that is the analytic mixture N(m, std^2 I) is that generator's
exact score. So distribution-matching gradients can be checked against closed forms.
"""

import torch
from torch import nn

from fewstep.methods import Batch
from fewstep.teachers.analytic import GaussianMixture
from fewstep.teachers.native import build_model


class GaussianGenerator(nn.Module):
    """One-step generator ``G(z) = m + exp(log_std) z`` (exactly Gaussian output)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean = nn.Parameter(torch.as_tensor(mean, dtype=torch.float32).clone())
        self.log_std = nn.Parameter(torch.tensor(float(std)).log())

    def forward(self, z, cond=None):
        return self.mean + self.log_std.exp() * z


class GaussianDenoisingStudent(GaussianGenerator):
    """The same generator in DMD2's student signature ``G(x, sigma)`` with ``x = sigma z``."""

    def forward(self, x, sigma, cond=None):
        return self.mean + self.log_std.exp() * x / sigma[:, None]


def gaussian_teacher(mean=(0.0, 0.0), std=0.3):
    return GaussianMixture(torch.tensor([mean], dtype=torch.float32), std)


def set_fake_to(method, mean, std):
    """Make the analytic fake score the exact score of N(mean, std^2 I)."""
    with torch.no_grad():
        method.fake_score.means.copy_(torch.as_tensor(mean, dtype=torch.float32)[None])
        method.fake_score.stds.fill_(std)


def tiny_teacher(arch="mlp", num_classes=0):
    """An untrained EDM teacher (weights random but fixed): enough to check plumbing and gradients."""
    if arch == "mlp":
        net = {"dim": 2, "hidden": 16, "depth": 1, "num_classes": num_classes}
        shape = [2]
    else:
        net = {
            "resolution": 8,
            "channels": 8,
            "channel_mult": [1, 2],
            "blocks": 1,
            "attn_resolutions": [],
            "num_classes": num_classes,
        }
        shape = [1, 8, 8]
    den = {"sample_shape": shape, "num_classes": num_classes, "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    torch.manual_seed(0)
    model = build_model(arch, net, den)
    with torch.no_grad():  # the zero-initialised output layer would make every prediction c_skip x
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def run(method, iterations, batch_size, lr=None, data=None):
    """A minimal stand-in for the engine: Adam per optimizer, stepped when due; returns step counts."""
    specs = method.optimizers()
    nets = method.networks()
    opts = {
        name: torch.optim.Adam(
            [p for n in spec.networks for p in nets[n].parameters()], lr=lr or spec.lr, betas=spec.betas
        )
        for name, spec in specs.items()
    }
    counts = dict.fromkeys(specs, 0)
    for i in range(iterations):
        due = {name for name, spec in specs.items() if spec.due(i)}
        x, labels = (None, None) if data is None else data(batch_size)
        losses = method.losses(Batch(size=batch_size, x=x, labels=labels), i, due)
        assert set(losses) == due
        for name in losses:
            opts[name].zero_grad(set_to_none=True)
        for loss in losses.values():
            loss.backward()
        for name in losses:
            opts[name].step()
            counts[name] += 1
    return counts


def grads_of(module):
    return [p.grad for p in module.parameters()]


def engine_run(tmp_path, method, teacher, steps=3, data=None, **options):
    """Train through the real engine for a few iterations, reload the run, return both methods."""
    from fewstep.train import distill, load_run

    common = dict(batch=4, sample_n=0, cpu=True, log_every=1, checkpoint_every=steps, ema_decay=0.5)
    m = distill(teacher, method, max_steps=steps, out=tmp_path / "run", data=data, **common, **options)
    return m, load_run(tmp_path / "run")


def tiny_images(n=32, num_classes=2):
    from fewstep.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return Dataset(x, torch.randint(num_classes, (n,), generator=g), num_classes, "tiny-images")
