"""SiDA, adversarial Score identity Distillation (Zhou, Zheng, Gu, Wang & Huang 2024, "Adversarial
Score identity Distillation: Rapidly Surpassing the Teacher in One Step", arXiv 2410.14919).

SiD (:mod:`fewstep.methods.sid`) plus a GAN whose discriminator costs no parameters: the fake
score network psi's own encoder. Its logits are the channel mean of psi's UNet bottleneck
features, a ``(B, h, w)`` map classified per location (real data vs generator samples). Both
networks' losses gain a term:

    psi step:  ls DSM(psi; sg G(z)) + lsd lambda(sigma) 1/2 [BCE(D(x_real,t), 1) + BCE(D(x_fake,t), 0)]
               (real and fake noised with the same sigma ~ LogNormal(-1.2, 1.2) and the same noise)
    G step:    1/2 [ lsg L_SiD + lsg_gan BCE(clamp(D(x_t), +-10), 1) C H W / w ]
               (D read at the SiD loss's own noised sample x_t, w = mean |x_g - f_real|)

with ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (EDM's weight) and the GAN terms switched
on after ``gan_start_kimg`` generator images. SiD²A starts G from a finished SiD generator
(``--init`` of a ``sid`` run) while psi — and so the discriminator — starts from the teacher, as
the reference's ``run_sid_sida.sh`` (``carries_fake_score = False``).

Defaults checked against mingyuanzhou/SiD, branch ``sida`` (``sida_training/sida_loss.py``
``fakescore_discriminator_share_encoder_loss`` / ``generator_share_encoder_loss``,
``sida_training_loop.py``, ``sida_train.py``, ``run_sida.sh``): alpha = 1 (every script; the CLI
default is 1.2), lsg 100, lsg_gan 0.01, lsd 1, ls 1, init_sigma 2.5, tmax 800, Adam betas (0,
0.999), lr 1e-5 (CIFAR-10); psi trained in train mode and switched to eval mode, frozen, for the
generator loss (as SiD); the GAN after 200 kimg. Everything else is SiD's (update order psi then G,
EMA of G evaluated).

Deviations: the reference sums psi's DSM over pixels and so does this module here (``ls`` times
the pixel sum, so the GAN weight keeps its size relative to it), but its gradient clipping by value
(1) is not applied; G is trained from the first iteration (the reference holds G for the first 100
kimg while psi adapts); image counts are per process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.denoiser import EDMDenoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.losses import edm_weight
from fewstep.methods import register
from fewstep.methods._fake_score import dsm_loss, eval_mode, generator_inputs
from fewstep.methods.base import Batch
from fewstep.methods.sid import SiD, SiDConfig, sid_generator_loss, sid_sigma
from fewstep.networks.discriminator import no_param_grad, teacher_features
from fewstep.schedules import sample_lognormal


def bce(logits: Tensor, target: Tensor) -> Tensor:
    """Elementwise binary cross-entropy of logits."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


@dataclass
class SiDAConfig(SiDConfig):
    alpha: float = 1.0
    lsg: float = 100.0  # generator: SiD loss scale
    lsg_gan: float = 0.01  # generator: GAN loss scale
    ls: float = 1.0  # psi: DSM scale
    lsd: float = 1.0  # psi: discriminator loss scale
    gan_start_kimg: float = 200.0  # generator images before the GAN terms start


@register
class SiDA(SiD):
    name = "sida"
    paper = "2410.14919"
    title = "SiDA: SiD with a discriminator on the fake score's encoder, trained on real data"
    needs_data = True
    Config = SiDAConfig
    carries_fake_score = False  # SiD²A: G from a SiD run, psi (and the discriminator) from the teacher

    def __init__(self, teacher, config: SiDAConfig | None = None, student=None):
        super().__init__(teacher, config, student)
        if not isinstance(self.fake_score, EDMDenoiser):
            raise FewstepError("sida's discriminator is the fake score's UNet encoder; it needs a UNet teacher")
        self.encoder = teacher_features(self.fake_score, levels="bottleneck")  # psi's weights, shared
        with torch.no_grad():
            (h,) = self.encoder(torch.zeros((1, *teacher.sample_shape)), torch.ones(1))
        if h.ndim != 4:
            raise FewstepError("sida's discriminator is the fake score's UNet encoder; it needs a UNet teacher")
        self.dim = math.prod(teacher.sample_shape)

    def logits(self, x_t: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """``(B, h, w)``: the channel mean of psi's bottleneck features at ``x_t``."""
        (h,) = self.encoder(x_t, sigma, cond)
        return h.mean(1)

    def gan_on(self, step: int, batch_size: int) -> bool:
        return step * batch_size / 1000 >= self.config.gan_start_kimg

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        c, out = self.config, {}
        gan = self.gan_on(step, batch.size)
        if "fake_score" in due:
            z, cond = generator_inputs(batch, self.student, self.teacher)
            with torch.no_grad(), eval_mode(self.student):
                x = self.student(z, cond)
            sigma = sample_lognormal(x.shape[0], c.p_mean, c.p_std).to(x)
            noise = torch.randn_like(x)
            loss = c.ls * self.dim * dsm_loss(self.fake_score, x, cond, sigma, noise)
            if gan:
                if batch.x is None:
                    raise FewstepError("sida needs real images for its discriminator; pass a dataset (--data digits)")
                real = batch.x.to(x)
                real_cond = batch.labels.to(x.device) if batch.labels is not None else None
                s = append_dims(sigma, x.ndim)
                lr_, lf = self.logits(real + s * noise, sigma, real_cond), self.logits(x + s * noise, sigma, cond)
                d = 0.5 * (bce(lr_, torch.ones_like(lr_)) + bce(lf, torch.zeros_like(lf)))
                loss = loss + c.lsd * (edm_weight(sigma, self.teacher.sigma_data) * d.flatten(1).mean(1)).mean()
            out["fake_score"] = loss
        if "student" in due:
            z, cond = generator_inputs(batch, self.student, self.teacher)
            out["student"] = self.generator_loss_gan(self.student(z, cond), cond, gan)
        return out

    def generator_loss_gan(self, x_g: Tensor, cond: Any, gan: bool) -> Tensor:
        """``1/2 (lsg L_SiD + lsg_gan L_GAN)`` at one noised copy of the generator's sample."""
        c, t = self.config, self.teacher
        sigma = sid_sigma(x_g.shape[0], c.tmax, t.sigma_min, t.sigma_max, c.rho).to(x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        with no_param_grad(self.fake_score), eval_mode(self.fake_score):
            f_fake = self.fake_score(x_t, sigma, cond)
            logits = self.logits(x_t, sigma, cond) if gan else None
        f_real = self.real_score(x_t, sigma, cond)
        loss = c.lsg * sid_generator_loss(x_g, f_real, f_fake, c.alpha)
        if logits is not None:
            with torch.no_grad():
                w = (x_g - f_real).abs().flatten(1).mean(1).clamp_min(1e-5)
            lg = logits.clamp(-10, 10)
            loss = loss + c.lsg_gan * (bce(lg, torch.ones_like(lg)).flatten(1).mean(1) * self.dim / w).mean()
        return 0.5 * loss
