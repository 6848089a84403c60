"""Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv 2311.18828).

A one-step generator ``G(z) = D_theta(sigma_max z, sigma_max)``, initialised from the teacher, is
trained to match the teacher's output *distribution* (a KL divergence) plus a regression term on
stored (noise, teacher ODE sample) pairs:

- Distribution matching (Sec. 3.2, Eqs. 7-8). Noise the generator sample, ``x_t = x + sigma eps``,
  and compare the teacher ("real", ``mu_real``, optionally with CFG) with the fake score
  ``mu_fake`` (a teacher copy fitted to the generator's samples). With ``w = 1 / mean|x - mu_real|``
  (Eq. 8's ``C S / ||mu_base(x_t) - x||_1``) the KL gradient with respect to ``x`` is
  ``grad = (mu_fake(x_t) - mu_real(x_t)) w``; the loss ``0.5 || x - sg(x - grad) ||^2`` has exactly
  that gradient (DMD2's ``compute_distribution_matching_loss``). ``sigma`` is uniform over the
  indices ``[0.02, 0.98] * 1000`` of a Karras grid (Sec. 3.2: ``t ~ U(T_min, T_max)``, T_min = 0.02 T,
  T_max = 0.98 T).
- Regression (Sec. 3.3, Eq. 9): ``L_reg = l(G(z_ref), y_ref)`` on pairs made by the teacher's
  deterministic ODE sampler (``fewstep pairs``), weighted by ``lambda_reg = 0.25``.
- Fake score (Eq. 6): denoising loss on ``sg(G(z))``, updated once per generator update
  (Algorithm 1), with the generator sample of the same iteration.

Defaults: AdamW, lr 5e-5 for both networks, betas (0.9, 0.999), weight decay 0.01,
``lambda_reg = 0.25`` (the paper's CIFAR-10 settings as used by the EDM re-implementation
devrimcavusoglu/dmd; batch 56 there). Real-score guidance is off (1.0) as for the class-conditional
EDM models in the paper; text-to-image used 3.

Deviations: the regression distance is L2 (or L1) in pixel space, not LPIPS — LPIPS needs
downloaded VGG/AlexNet weights, and it would also leak into a feature-based FID; the fake-score
loss uses EDM weighting and the full 1000-point Karras grid (DMD2's EDM code) where the paper
writes an unweighted denoising loss; generator labels are uniform over classes. The paper has no
official code: the fake score runs in eval mode (no dropout) when it serves as a score estimate in
the generator's gradient, as the frozen teacher does, so a fake score equal to the teacher gives a
zero gradient (DMD2's code reaches the same by building every network with dropout 0).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network fed at ``sigma_init``; the fake score
still copies the teacher (an analytic teacher's: a mixture with trainable means and scales), and the
regression pairs still come from the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.losses import REGRESSION, dm_gradient, dm_loss, regression_loss
from fewstep.methods import register
from fewstep.methods._fake_score import KarrasSigmaSampler, dsm_loss, eval_mode, generator_inputs, make_fake_score
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.pairs import Pairs, PairSource
from fewstep.students import OneStepGenerator, copy_teacher, set_dropout


@dataclass
class DMDConfig:
    reg_weight: float = 0.25  # lambda_reg (Sec. 4 / appendix); 0 turns the regression term off
    reg_loss: str = "l2"  # paper: LPIPS (unavailable offline), here l2 or l1 in pixel space
    pairs: str | None = None  # folder written by `fewstep pairs`; None = generate num_pairs into the cache
    num_pairs: int = 10000  # paper: 100k pairs on CIFAR-10, 25k on ImageNet-64
    solver: str = "heun"  # pair sampler (the teacher's deterministic Heun)
    solver_steps: int = 18
    guidance: float = 1.0  # CFG scale of the real score (and of the pairs' teacher)
    sigma_init: float | None = None  # None = teacher.sigma_max: the generator sees pure noise
    dm_sigma_range: tuple[float, float] = (0.02, 0.98)  # fractions of the 1000-step Karras grid
    lr: float = 5e-5  # generator
    fake_lr: float = 5e-5  # fake score
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    fake_updates: int = 1  # fake-score steps per generator step (Algorithm 1: 1)
    grad_clip: float | None = None
    dropout: float | None = None  # dropout of the trained copies; None keeps the teacher's


@register
class DMD(Method):
    name = "dmd"
    family = "output"
    paper = "2311.18828"
    title = "One-step diffusion with distribution matching distillation"
    needs_data = False
    Config = DMDConfig
    default_steps = (1,)

    def __init__(
        self,
        teacher: Denoiser,
        config: DMDConfig | None = None,
        student: nn.Module | None = None,
        pairs: Pairs | None = None,
    ) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.reg_loss not in REGRESSION:
            raise FewstepError(f"unknown regression loss {c.reg_loss!r}; use one of {', '.join(REGRESSION)}")
        if c.fake_updates < 1:
            raise FewstepError(f"fake_updates must be >= 1, got {c.fake_updates}")
        sigma_init = c.sigma_init if c.sigma_init is not None else teacher.sigma_max
        self.student = student if student is not None else OneStepGenerator(copy_teacher(teacher), sigma_init)
        self.fake_score = make_fake_score(teacher)  # mu_fake starts as the teacher (Sec. 3.2)
        set_dropout(self.student, c.dropout)
        set_dropout(self.fake_score, c.dropout)
        self.real_score = cfg(self.teacher, c.guidance) if teacher.num_classes else self.teacher
        self.dm_sigma = KarrasSigmaSampler.of(teacher, *c.dm_sigma_range)
        self.fake_sigma = KarrasSigmaSampler.of(teacher)
        self._pairs = PairSource(teacher, c, pairs)  # read at the first loss (load_run needs none)

    @property
    def pairs(self) -> Pairs | None:
        """The stored pairs of the regression term (``None`` when ``reg_weight == 0``)."""
        c = self.config
        if c.reg_weight <= 0:
            return None
        return self._pairs.get()

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c, k = self.config, self.config.fake_updates
        common = dict(betas=c.betas, weight_decay=c.weight_decay, kind="adamw", grad_clip=c.grad_clip)
        return {
            "fake_score": OptimizerSpec(["fake_score"], lr=c.fake_lr, **common),
            "student": OptimizerSpec(["student"], lr=c.lr, every=k, offset=k - 1, **common),
        }

    # --- maths ---------------------------------------------------------------------------------
    @torch.no_grad()
    def dm_gradient(self, x: Tensor, cond: Any, sigma: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Eqs. 7-8: ``(mu_fake(x_t) - mu_real(x_t)) / mean|x - mu_real(x_t)|`` per sample; descending
        it moves ``x`` toward the real score's denoised estimate and away from the fake one's."""
        sigma = self.dm_sigma(x.shape[0], x.device) if sigma is None else sigma
        x_t = x + append_dims(sigma, x.ndim) * (torch.randn_like(x) if noise is None else noise)
        mu_real = self.real_score(x_t, sigma, cond)
        with eval_mode(self.fake_score):  # a score estimate, as the frozen teacher's: no dropout noise
            mu_fake = self.fake_score(x_t, sigma, cond)
        return dm_gradient(x, mu_real, mu_fake)

    def dm_loss(self, x: Tensor, cond: Any) -> Tensor:
        """``0.5 || x - sg(x - grad) ||^2`` (pixel mean): its gradient in ``x`` is ``grad / numel``."""
        return dm_loss(x, self.dm_gradient(x.detach(), cond))

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if not due & {"student", "fake_score"}:
            return out
        z, cond = generator_inputs(batch, self.student, self.teacher)
        n = z.shape[0]
        ref = self.pairs.batch(n, z.device) if "student" in due and self.pairs is not None else None
        if ref is not None:  # one generator pass over [z; z_ref] (one forward per backward under DDP)
            z = torch.cat([z, ref[0]])
            cond = None if cond is None else torch.cat([cond, ref[2]])
        with torch.set_grad_enabled("student" in due):
            x = self.student(z, cond)  # Algorithm 1: x = G(z)
        if ref is not None:
            x, x_ref = x[:n], x[n:]
            cond = None if cond is None else cond[:n]
        if "student" in due:
            loss = self.dm_loss(x, cond)  # D_KL (Eq. 7)
            if ref is not None:  # + lambda_reg L_reg (Eq. 9) on stored pairs
                loss = loss + self.config.reg_weight * regression_loss(x_ref, ref[1], self.config.reg_loss)
            out["student"] = loss
        if "fake_score" in due:  # Eq. 6 on sg(x): the fake score follows the generator
            out["fake_score"] = dsm_loss(self.fake_score, x.detach(), cond, self.fake_sigma(x.shape[0], x.device))
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"dmd trains a one-step generator; sample with steps=1 (got {steps})")
        return self.student(noise, cond)
