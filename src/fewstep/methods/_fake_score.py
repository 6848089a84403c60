"""The fake-score building block of Diff-Instruct, DMD, DMD2 and SiD (a helper, not a method).

A *fake score* is a denoiser that tracks the distribution of the generator's samples. It starts as
a trainable copy of the teacher and is trained by denoising score matching (DSM) on
``sg(G(z))``, the generator's samples with the gradient stopped:

    L_fake = E_{sigma, eps} [ lambda(sigma) || D_psi(x0 + sigma eps, sigma) - x0 ||^2 ],
    lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,

the EDM-weighted loss (Karras et al. 2022, arXiv 2206.00364, Eq. 8 and Table 1; DMD2's
``weight_schedule karras``, SiD's ``EDMLoss``). Its x0-prediction at a noised generator sample,
compared with the teacher's ("real score"), gives the distribution-matching direction.

API (small on purpose)::

    fake = make_fake_score(teacher)                        # trainable Denoiser, equal to the teacher
    sampler = KarrasSigmaSampler.of(teacher, lo=0.0, hi=1.0)  # uniform index on a 1000-step Karras grid
    sigma = sampler(batch, device)                         # (B,) noise levels
    loss = dsm_loss(fake, x_fake.detach(), labels, sigma)  # scalar, EDM-weighted

``make_fake_score`` also accepts the analytic :class:`~fewstep.teachers.analytic.GaussianMixture`
teacher: the copy's means and standard deviations become trainable parameters, so tests can fit a
fake score exactly and check distribution-matching gradients against closed forms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, EDMDenoiser
from fewstep.errors import FewstepError
from fewstep.losses import edm_loss
from fewstep.methods.base import Batch, OptimizerSpec
from fewstep.schedules import ascending_karras
from fewstep.teachers.analytic import GaussianMixture


def make_fake_score(teacher: Denoiser) -> Denoiser:
    """A trainable copy of ``teacher`` (DMD Sec. 3.2: "initialised from the real diffusion model").

    EDM-preconditioned fewstep networks are deep-copied, a diffusers teacher gives a trainable copy of
    its network with its own formulation; a :class:`GaussianMixture` becomes a mixture
    whose ``means`` and ``stds`` are parameters. The copy is in train mode with gradients enabled.
    """
    if isinstance(teacher, EDMDenoiser):
        return copy.deepcopy(teacher).train().requires_grad_(True)
    if type(teacher).__name__ == "DiffusersDenoiser":  # a diffusers copy with the teacher's formulation
        return teacher.trainable_copy().train().requires_grad_(True)
    if isinstance(teacher, GaussianMixture):
        fake = copy.deepcopy(teacher)
        fake.means = nn.Parameter(fake.means.detach().clone())  # replaces the buffer
        fake.stds = nn.Parameter(fake.stds.detach().clone())
        return fake.train()
    raise FewstepError(
        f"cannot build a fake score from a {type(teacher).__name__}; it needs an EDM-preconditioned fewstep "
        "network or an analytic mixture (wrap other models as fewstep networks first)"
    )


def dsm_loss(fake: Denoiser, x0: Tensor, cond: Any, sigma: Tensor, noise: Tensor | None = None) -> Tensor:
    """EDM-weighted denoising score matching of ``fake`` on clean samples ``x0`` at levels ``sigma``.

    ``x0`` should already be detached (the generator gets no gradient from this loss); it is
    detached again here to make that impossible to forget. :func:`fewstep.losses.edm_loss`: the batch
    mean of ``lambda(sigma) * mean_pixels (D(x0 + sigma eps, sigma) - x0)^2``.
    """
    return edm_loss(fake, x0.detach(), cond, sigma, noise)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode (dropout off) inside the block, their own modes restored after.
    SiD's loop puts the fake score in eval mode for the generator step and the generator in eval
    mode while it makes the fake score's training samples (sid_training_loop.py)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def shared_dropout(real: nn.Module, fake: nn.Module, x_t: Tensor, sigma: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
    """``(real(x_t), fake(x_t))`` with both networks in train mode and one dropout mask: the RNG
    state is saved before the real score and restored before the fake score, so a fake score equal
    to the teacher predicts exactly what it does (Diff-Instruct's ``di_loss.py``, which does this
    with the CUDA RNG). Modes are restored after."""
    device = x_t.device
    with eval_mode(real, fake):  # restores both modes on exit
        real.train()
        fake.train()
        cpu_state = torch.get_rng_state()
        dev_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        out_real = real(x_t, sigma, cond)
        torch.set_rng_state(cpu_state)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, device)
        out_fake = fake(x_t, sigma, cond)
    return out_real, out_fake


@dataclass
class KarrasSigmaSampler:
    """Noise levels drawn uniformly over the indices of an ascending Karras grid (rho = 7).

    DMD2's EDM code draws the fake-score level from all ``num_steps = 1000`` points and the
    distribution-matching level from indices ``[0.02, 0.98] * 1000``; ``lo``/``hi`` are those
    fractions of the grid (0 = sigma_min, 1 = sigma_max).
    """

    sigmas: Tensor  # ascending, (num_steps,)
    lo: int
    hi: int

    @classmethod
    def of(
        cls, model: Denoiser, lo: float = 0.0, hi: float = 1.0, num_steps: int = 1000, rho: float = 7.0
    ) -> KarrasSigmaSampler:
        if not 0.0 <= lo <= hi <= 1.0:
            raise FewstepError(f"sigma range fractions must satisfy 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
        grid = ascending_karras(num_steps, model.sigma_min, model.sigma_max, rho).float()
        return cls(grid, int(lo * num_steps), min(int(hi * num_steps), num_steps - 1))

    def __call__(self, n: int, device: torch.device | str | None = None) -> Tensor:
        idx = torch.randint(self.lo, self.hi + 1, (n,))
        return self.sigmas[idx].to(device)


def generator_inputs(batch: Batch, student: nn.Module, teacher: Denoiser) -> tuple[Tensor, Tensor | None]:
    """Unit noise for a data-free generator on the student's device, and its labels: the batch's
    (the engine's uniform labels, or data labels) or, without any, uniform over the teacher's classes."""
    device = next(student.parameters()).device
    z = torch.randn((batch.size, *teacher.sample_shape), device=device)
    if batch.labels is not None:
        return z, batch.labels.to(device)
    k = teacher.num_classes
    return z, (torch.randint(0, k, (batch.size,), device=device) if k else None)


def fake_score_first(config: Any) -> dict[str, OptimizerSpec]:
    """SiD's and Diff-Instruct's update order: ``config.fake_updates`` fake-score steps, then one
    generator step that sees the updated fake score (their training loops' order)."""
    c, k = config, config.fake_updates
    return {
        "fake_score": OptimizerSpec(
            ["fake_score"], lr=c.fake_lr, betas=c.betas, every=k + 1, offset=tuple(range(k)), grad_clip=c.grad_clip
        ),
        "student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k + 1, offset=k, grad_clip=c.grad_clip),
    }


__all__ = [
    "KarrasSigmaSampler",
    "dsm_loss",
    "eval_mode",
    "fake_score_first",
    "generator_inputs",
    "make_fake_score",
    "shared_dropout",
]
