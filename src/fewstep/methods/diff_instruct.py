"""Diff-Instruct (Luo et al., NeurIPS 2023, arXiv 2305.18455): one-step generation by minimising the
Integral KL divergence between the generator's distribution and the teacher's.

IKL(q_g, p) = int_t w(t) KL(q_{g,t} || p_t) dt compares the two distributions after diffusing both to
every noise level. Its gradient (the paper's Theorem 3.1, used in Algorithm 1) only needs scores:

    grad_theta IKL = E_{t, z, eps} [ w(t) (s_{q_g,t}(x_t) - s_{p_t}(x_t))^T dx_t/dtheta ],
    x_t = G_theta(z) + sigma eps,

where s_{p_t} is the teacher's score and s_{q_g,t} the *fake score* psi, a copy of the teacher kept
fitted to the generator's samples by denoising score matching (DSM). Training alternates: one DSM
step on psi with sg(G(z)), then one generator step. In sigma-space the score is ``(D(x_t) - x_t) /
sigma^2``, so with the reference code's weight ``w = sigma^2`` the gradient with respect to the
sample is ``D_psi(x_t) - D_phi(x_t)`` — the surrogate loss below has exactly that gradient.

Defaults follow the official code (pkulwj1994/diff_instruct: ``di_train.py``,
``training/di_loss.py``, README command): generator ``G(z) = D_theta(sigma_init z, sigma_init)``
initialised from the teacher with ``init_sigma = 1.0``; Adam with betas (0, 0.999) and lr 1e-5 for
both networks; ``ln sigma ~ N(-1.2, 1.2^2)`` for both losses; EDM-weighted DSM for psi; data-free.
Checked against ``di_loss.py`` / ``di_training_loop.py``: in the generator loss the teacher and
psi both run in train mode with one shared dropout mask (the RNG state is restored between the two
calls), under no-grad; psi trains in train mode on samples of G taken in eval mode under no-grad;
psi steps before G in each round; the evaluated network is the EMA of G.

Deviations: generator labels are drawn uniformly (the reference reads them from the data set);
the reference evaluates an EMA of G (half-life 500 kimg, ramp-up 0.05), which is the engine's
evaluation EMA here with the same settings (``engine_defaults``); DSM is averaged over pixels
(the reference sums them) — only the scale seen by Adam changes.

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network fed at ``sigma_init``; the fake score
still copies the teacher (an analytic teacher's: a mixture with trainable means and scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.methods import register
from fewstep.methods._fake_score import (
    dsm_loss,
    eval_mode,
    fake_score_first,
    generator_inputs,
    make_fake_score,
    shared_dropout,
)
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.schedules import sample_lognormal
from fewstep.students import OneStepGenerator, copy_teacher, set_dropout


@dataclass
class DiffInstructConfig:
    sigma_init: float = 1.0  # README: --init_sigma 1.0
    lr: float = 1e-5  # generator (README: --glr 0.00001)
    fake_lr: float = 1e-5  # fake score (README: --lr 0.00001)
    betas: tuple[float, float] = (0.0, 0.999)  # di_train.py: Adam betas for both networks
    p_mean: float = -1.2  # di_loss.py: ln sigma ~ N(p_mean, p_std^2) for both losses
    p_std: float = 1.2
    fake_updates: int = 1  # fake-score steps per generator step (1 in the reference loop)
    guidance: float = 1.0  # CFG scale of the real score (1 = the plain conditional teacher)
    grad_clip: float | None = None
    dropout: float | None = None  # dropout of G and psi; None keeps the teacher's (as the reference)


@register
class DiffInstruct(Method):
    name = "diff_instruct"
    family = "output"
    paper = "2305.18455"
    title = "Diff-Instruct: a universal approach for transferring knowledge from pre-trained diffusion models"
    needs_data = False
    Config = DiffInstructConfig
    default_steps = (1,)
    # di_training_loop.py: Gema with ema_halflife_kimg 500 (di_train.py --ema 0.5), ema_rampup_ratio 0.05
    engine_defaults = {"ema_halflife_kimg": 500.0, "ema_rampup": 0.05}

    def __init__(self, teacher: Denoiser, config: DiffInstructConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        if c.fake_updates < 1:
            raise FewstepError(f"fake_updates must be >= 1, got {c.fake_updates}")
        # G(z) = D_theta(sigma_init z, sigma_init), initialised as a copy of the teacher
        self.student = student if student is not None else OneStepGenerator(copy_teacher(teacher), c.sigma_init)
        self.fake_score = make_fake_score(teacher)  # psi starts equal to the teacher
        set_dropout(self.student, c.dropout)
        set_dropout(self.fake_score, c.dropout)
        self.real_score = cfg(self.teacher, c.guidance)  # the teacher itself when guidance == 1

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return fake_score_first(self.config)  # k fake-score steps, then the generator (the reference's order)

    # --- maths ---------------------------------------------------------------------------------
    def _sigma(self, n: int, device: torch.device) -> Tensor:
        return sample_lognormal(n, self.config.p_mean, self.config.p_std).to(device)

    def generator_loss(self, x: Tensor, cond: Any) -> Tensor:
        """Surrogate whose gradient is Theorem 3.1's IKL gradient with ``w(sigma) = sigma^2``:
        ``d loss / d x = D_psi(x_t) - D_phi(x_t) = sigma^2 (s_fake - s_real)`` per sample."""
        sigma = self._sigma(x.shape[0], x.device)
        with torch.no_grad():  # both scores are constants in the gradient
            x_t = x + append_dims(sigma, x.ndim) * torch.randn_like(x)
            # di_loss.py: teacher and psi in train mode with one shared dropout mask
            real, fake = shared_dropout(self.real_score, self.fake_score, x_t, sigma, cond)
            direction = fake - real
        return (direction * x).flatten(1).sum(1).mean()

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "fake_score" in due:  # Algorithm 1, fake-score step: DSM on sg(G(z))
            z, cond = generator_inputs(batch, self.student, self.teacher)
            with torch.no_grad(), eval_mode(self.student):  # di_training_loop.py samples with G.eval()
                x = self.student(z, cond)
            out["fake_score"] = dsm_loss(self.fake_score, x, cond, self._sigma(x.shape[0], x.device))
        if "student" in due:  # Algorithm 1, generator step
            z, cond = generator_inputs(batch, self.student, self.teacher)
            out["student"] = self.generator_loss(self.student(z, cond), cond)
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"diff_instruct trains a one-step generator; sample with steps=1 (got {steps})")
        return self.student(noise, cond)
