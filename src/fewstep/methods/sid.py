"""Score identity Distillation, SiD (Zhou et al., ICML 2024, arXiv 2404.04057): a data-free one-step
generator trained with a loss built from score identities of the diffused generator distribution.

With x_g = G_theta(z), x_t = x_g + sigma eps, the teacher's x0-prediction f_phi(x_t) and the fake
score's f_psi(x_t) (a copy of the teacher fitted to the generator by DSM), SiD's generator loss
(Sec. 4, the fused loss with weight alpha; Algorithm 1) is, per sample,

    L_theta = (f_phi - f_psi)^T [ (f_phi - x_g) - alpha (f_phi - f_psi) ] / w,
            = [ (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g) ] / w,
    w = sg(mean |x_g - f_phi|)    (per-sample normalisation, as DMD's),

and, unlike Diff-Instruct and DMD, the gradient flows through *both* f_phi and f_psi at x_t (their
input Jacobians), not only through x_g; the networks' own parameters receive nothing. alpha = 1.2 is
the paper's default (alpha = 1 also reported; alpha = 0.5 gives the Fisher-divergence gradient).

Defaults from the official code (mingyuanzhou/SiD: ``training/sid_loss.py``,
``training/sid_training_loop.py``, ``sid_train.py``, ``run_sid.sh``): G and psi are copies of the
teacher; G is fed ``sigma_init z`` at ``sigma_init = 2.5``; the generator's noise level is
``sigma = (sigma_max^(1/rho) + (1 - t)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` with
``t ~ U[0, tmax/1000]``, ``tmax = 800`` (a continuous position on the Karras ramp, rho = 7); psi is
trained with EDM's loss (``ln sigma ~ N(-1.2, 1.2^2)``, weight ``(sigma^2 + sd^2)/(sigma sd)^2``);
one psi step then one G step per iteration; Adam, betas (0, 0.999), lr 1e-5 for both; data-free.
Checked against ``sid_training_loop.py``: the teacher is always in eval mode; psi trains in train
mode, then is switched to eval mode (and frozen) for the generator loss, so a psi equal to the
teacher gives a zero generator gradient; psi's samples come from G in eval mode; G trains in
train mode; the evaluated network is G's EMA.

Stable Diffusion setting: SiD-LSG (Zhou et al. 2024, arXiv 2406.01561; mingyuanzhou/SiD-LSG
``run_sid.sh`` and ``training/sid_training_loop.py``, checked) uses "long and short guidance": CFG
``kappa_1`` on the fake score's output in its own denoising loss (``fake_guidance``; the prompts of that
step, for the generator's samples as well, replaced by the empty prompt with probability 0.1 so psi
learns the unconditional branch — ``label_dropout``, on whenever a psi scale is not 1), CFG
``kappa_2 = kappa_3`` on the fake score in the generator loss (``fake_eval_guidance``) and ``kappa_4`` on
the teacher (``guidance``); run_sid.sh sets all four to 2, alpha 1, the generator fed at DDPM timestep
625, Adam lr 1e-6 for both networks, batch 512, EMA half-life 0.05 Mimg. fewstep's defaults keep SiD's
(scales 1); tier 2 of the benchmark sets ``guidance = fake_guidance = fake_eval_guidance = W`` (LSG at
the guided setting's scale) and keeps SiD's other defaults for a 15-minute budget. LSG's psi loss is
the epsilon MSE at uniform DDPM timesteps; fewstep keeps SiD's EDM-weighted loss at log-normal levels
on the guided output (the same minimiser per level, another weighting over levels).

Deviations: generator labels are drawn uniformly (the reference reads them from the data set); the
reference evaluates an EMA of G (half-life 500 kimg, ramp-up 0.05), which is the engine's evaluation
EMA here with the same settings (``engine_defaults``); losses are averaged
over pixels for psi (the reference sums) — only the scale seen by Adam changes.

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
from fewstep.guidance import cfg, drop_labels
from fewstep.methods import register
from fewstep.methods._fake_score import dsm_loss, eval_mode, fake_score_first, generator_inputs, make_fake_score
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.discriminator import no_param_grad
from fewstep.schedules import sample_lognormal
from fewstep.students import OneStepGenerator, copy_teacher, set_dropout


@dataclass
class SiDConfig:
    sigma_init: float = 2.5  # run_sid.sh: --init_sigma 2.5
    alpha: float = 1.2  # run_sid.sh: --alpha 1.2
    tmax: int = 800  # run_sid.sh: --tmax 800
    lr: float = 1e-5  # generator (--glr)
    fake_lr: float = 1e-5  # fake score (--lr)
    betas: tuple[float, float] = (0.0, 0.999)  # sid_train.py: Adam betas for both networks
    p_mean: float = -1.2  # psi's EDM loss: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    rho: float = 7.0
    fake_updates: int = 1  # fake-score steps per generator step (1 in the reference loop)
    guidance: float = 1.0  # CFG scale of the real score (1 = the plain conditional teacher); LSG's kappa_4
    fake_guidance: float = 1.0  # LSG's kappa_1: CFG on psi's output in its own loss
    fake_eval_guidance: float = 1.0  # LSG's kappa_2 = kappa_3: CFG on psi in the generator loss
    label_dropout: float = 0.1  # LSG: null labels in psi's step when a psi scale is not 1
    grad_clip: float | None = None
    dropout: float | None = None  # dropout of G and psi; None keeps the teacher's (as the reference)


def sid_sigma(n: int, tmax: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The generator loss's noise level: ``t ~ U[0, tmax/1000]`` placed on the Karras ramp, so
    ``t = 0`` is ``sigma_min`` and ``t = 1`` would be ``sigma_max`` (sid_loss.py)."""
    t = torch.rand(n) * (tmax / 1000)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def sid_generator_loss(x_g: Tensor, f_real: Tensor, f_fake: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss (batch mean of the per-sample sum over pixels), gradients kept on all
    three inputs; the normaliser ``w = mean |x_g - f_real|`` is a constant (sid_loss.py)."""
    with torch.no_grad():
        w = (x_g - f_real).abs().flatten(1).mean(1).clamp_min(1e-5)
    diff = f_real - f_fake
    per_sample = (diff * ((f_real - x_g) - alpha * diff)).flatten(1).sum(1)
    return (per_sample / w).mean()


@register
class SiD(Method):
    name = "sid"
    family = "output"
    paper = "2404.04057"
    title = "Score identity Distillation: exponentially fast distillation of pretrained diffusion models"
    needs_data = False
    Config = SiDConfig
    default_steps = (1,)
    # sid_training_loop.py: G_ema with ema_halflife_kimg 500 (sid_train.py --ema 0.5), ema_rampup_ratio 0.05
    engine_defaults = {"ema_halflife_kimg": 500.0, "ema_rampup": 0.05}

    def __init__(self, teacher: Denoiser, config: SiDConfig | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        if c.fake_updates < 1 or not 0 < c.tmax <= 1000:
            raise FewstepError(f"need fake_updates >= 1 and 0 < tmax <= 1000, got {c.fake_updates} and {c.tmax}")
        self.student = student if student is not None else OneStepGenerator(copy_teacher(teacher), c.sigma_init)
        self.fake_score = make_fake_score(teacher)
        set_dropout(self.student, c.dropout)
        set_dropout(self.fake_score, c.dropout)
        self.real_score = cfg(self.teacher, c.guidance)  # the teacher itself when guidance == 1
        self.fake_train = cfg(self.fake_score, c.fake_guidance)  # LSG's kappa_1 (psi itself at 1)
        self.fake_eval = cfg(self.fake_score, c.fake_eval_guidance)  # LSG's kappa_2 = kappa_3
        self.lsg = c.fake_guidance != 1.0 or c.fake_eval_guidance != 1.0

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return fake_score_first(self.config)  # k fake-score steps, then the generator (the reference's order)

    def generator_loss(self, x_g: Tensor, cond: Any) -> Tensor:
        """Algorithm 1, generator step: both scores at the same noised generator sample."""
        c, t = self.config, self.teacher
        sigma = sid_sigma(x_g.shape[0], c.tmax, t.sigma_min, t.sigma_max, c.rho).to(x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        with no_param_grad(self.fake_score), eval_mode(self.fake_score):  # the reference: psi.eval(), frozen
            f_fake = self.fake_eval(x_t, sigma, cond)
        f_real = self.real_score(x_t, sigma, cond)
        return sid_generator_loss(x_g, f_real, f_fake, c.alpha)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "fake_score" in due:  # Algorithm 1, psi step: EDM-weighted DSM on sg(G(z))
            z, cond = generator_inputs(batch, self.student, self.teacher)
            if self.lsg:  # LSG's context dropout
                cond = drop_labels(cond, self.config.label_dropout, self.teacher.num_classes)
            with torch.no_grad(), eval_mode(self.student):  # the reference samples with G.eval()
                x = self.student(z, cond)
            sigma = sample_lognormal(x.shape[0], self.config.p_mean, self.config.p_std).to(x)
            out["fake_score"] = dsm_loss(self.fake_train, x, cond, sigma)
        if "student" in due:
            z, cond = generator_inputs(batch, self.student, self.teacher)
            out["student"] = self.generator_loss(self.student(z, cond), cond)
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        if steps != 1:
            raise FewstepError(f"sid trains a one-step generator; sample with steps=1 (got {steps})")
        return self.student(noise, cond)
