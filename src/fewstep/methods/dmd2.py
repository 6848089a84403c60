"""DMD2, improved distribution matching distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

DMD (arXiv 2311.18828, Eq. 7) moves generator samples x = G(z) along the difference of two
x0-predictions at a noised copy x_t = x + sigma eps: the frozen teacher's ("real score") and a fake
score psi fitted to the generator by DSM. DMD2 keeps that gradient, normalised per sample as DMD's
Eq. 8,

    grad = (D_psi(x_t) - D_real(x_t)) / mean|x - D_real(x_t)|,   L_DM = 0.5 ||x - sg(x - grad)||^2,

and changes the recipe (Sec. 4):
- 4.1 no regression loss on stored teacher pairs;
- 4.2 two time-scale updates: psi is updated ``fake_updates`` (5) times per generator update;
- 4.3 a GAN: a small classifier head on psi's UNet bottleneck tells noised real images from noised
  generator samples (non-saturating loss); the generator adds ``gen_gan_weight`` x its GAN loss,
  psi and the head add ``cls_weight`` x the classifier loss to DSM (``gan_features="teacher"``
  reads the frozen teacher's bottleneck instead, training only the head);
- 4.4 multi-step students: G denoises at a fixed grid of levels (the paper's timesteps
  999/749/499/249, here those indices of the 1000-point Karras grid) and re-noises in between;
  *backward simulation* trains step j on inputs produced by the student's own steps 0..j-1.

Defaults from the official EDM code (tianweiy/DMD2 ``main/edm/edm_guidance.py``, ``train_edm.py``,
``experiments/imagenet/*genloss3e-3_diffusion1000_lr2e-6*.sh``): AdamW lr 2e-6, betas (0.9, 0.999),
weight decay 0.01, grad-norm clip 10, a 500-iteration linear warm-up for both networks; ratio 5;
generator input ``80 z`` at sigma 80; DM level uniform over Karras-grid indices [20, 980]; DSM
level uniform over all 1000, EDM weight ``1/sigma^2 + 1/sd^2``; GAN on (diffusion-GAN) noise levels
over all 1000 indices, generator GAN weight 3e-3, classifier weight 1e-2; real score without
guidance (``guidance`` sets a CFG scale, as the text-to-image models use). Checked against
``edm_network.py``, ``edm_unified_model.py``, ``train_edm.py`` and ``test_folder_edm.py``: every
network is built with dropout 0 (so train or eval mode changes nothing); the generator steps
before the fake score in an iteration; no EMA anywhere — the raw generator is what is evaluated
(``engine_defaults``: ``ema_decay`` 0).

Stable Diffusion setting (``experiments/sdv1.5/*.sh`` of the same repository, checked): stage one
from the teacher with generator and fake-score lr 1e-5, real-score guidance 1.75 (fake score
unguided), 10 fake-score updates per generator update, no GAN, clipping 10, batch 32 per GPU; stage
two resumes at lr 5e-7 with the GAN on (generator weight 1e-3, classifier weight 1e-2, noise over all
1000 timesteps, the classifier also on clean images). On a diffusers teacher set those with
``--set lr=1e-5 fake_lr=1e-5 guidance=1.75 fake_updates=10 gan=false`` (tier 2 of the benchmark uses
lr 1e-5 with the GAN on, at its own guidance scale). The defaults above stay the EDM ones.

Deviations: the classifier head (the reference's ``cls_pred_branch``: conv 4x4/2, conv to 1x1, 1x1
conv to a logit) is sized to fewstep's UNet bottleneck, read through
:func:`~fewstep.networks.discriminator.teacher_features`; multi-step sampling re-noises with the
global RNG; psi's DSM and the GAN use fresh generator samples rather than the generator step's (the
same distribution).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network as the generator ``G(x, sigma)``; the
fake score still copies the teacher; the GAN head reads the fake score's bottleneck (an analytic
teacher's fake score is a mixture: the head reads the frozen warm-up network's).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.guidance import cfg
from fewstep.losses import dm_gradient, dm_loss
from fewstep.methods import register
from fewstep.methods._fake_score import KarrasSigmaSampler, dsm_loss, make_fake_score
from fewstep.methods.base import Batch, Method, OptimizerSpec
from fewstep.networks.discriminator import d_loss, g_loss, no_param_grad, teacher_features
from fewstep.solvers import renoise_sample
from fewstep.students import copy_teacher, set_dropout


@dataclass
class DMD2Config:
    lr: float = 2e-6  # --generator_lr
    fake_lr: float = 2e-6  # --guidance_lr (psi and the classifier head)
    betas: tuple[float, float] = (0.9, 0.999)  # train_edm.py: AdamW defaults
    weight_decay: float = 0.01
    grad_clip: float | None = 10.0  # --max_grad_norm
    dropout: float | None = 0.0  # of G and psi; edm_network.py builds every network with dropout 0
    warmup: int = 500  # --warmup_step: linear lr warm-up over this many iterations (both networks)
    fake_updates: int = 5  # --dfake_gen_update_ratio
    dm_lo: float = 0.02  # --min_step_percent / --max_step_percent of the Karras grid
    dm_hi: float = 0.98
    guidance: float = 1.0  # CFG scale of the real score (1 = the plain conditional teacher)
    gan: bool = True  # --gan_classifier
    gan_features: str = "fake"  # "fake" (psi's bottleneck, the paper) or "teacher" (frozen)
    gen_gan_weight: float = 3e-3  # --gen_cls_loss_weight
    cls_weight: float = 1e-2  # --cls_loss_weight
    gan_hi: float = 1.0  # --diffusion_gan_max_timestep 1000: classifier noise over the whole grid
    student_steps: int = 1  # 4 for the multi-step student (Sec. 4.4), trained by backward simulation


def warmup_factor(k: int, steps: float) -> float:
    """diffusers' ``constant_with_warmup``: ``k / steps`` for the first ``steps`` optimizer steps."""
    return min(1.0, k / steps) if steps > 0 else 1.0


class ClassifierHead(nn.Module):
    """DMD2's ``cls_pred_branch``: conv 4x4 stride 2, then a conv to 1x1, then a 1x1 conv to a logit,
    with group norm and SiLU between (sized from the bottleneck's channels ``c`` and side ``r``)."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
        r2 = max(r // 2, 1)
        self.layers = nn.Sequential(
            nn.Conv2d(c, c, 4, stride=2, padding=1) if r >= 2 else nn.Conv2d(c, c, 1),
            nn.GroupNorm(groups, c),
            nn.SiLU(),
            nn.Conv2d(c, c, r2),  # r2 x r2 -> 1 x 1
            nn.GroupNorm(groups, c),
            nn.SiLU(),
            nn.Conv2d(c, 1, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.layers(h).flatten(1)[:, 0]


@register
class DMD2(Method):
    name = "dmd2"
    family = "output"
    paper = "2405.14867"
    title = "Improved distribution matching distillation for fast image synthesis"
    needs_data = True  # real images for the GAN; a gan=False run is data-free
    Config = DMD2Config
    default_steps = (1,)
    engine_defaults = {"ema_decay": 0.0}  # test_folder_edm.py scores the raw generator (no EMA anywhere)

    def __init__(self, teacher: Denoiser, config: DMD2Config | None = None, student: nn.Module | None = None):
        super().__init__(teacher, config)
        c = self.config
        if c.fake_updates < 1 or c.student_steps < 1:
            raise FewstepError(
                f"need fake_updates >= 1 and student_steps >= 1, got {c.fake_updates}, {c.student_steps}"
            )
        if c.gan_features not in ("fake", "teacher"):
            raise FewstepError(f"gan_features must be 'fake' or 'teacher', got {c.gan_features!r}")
        self.needs_data = c.gan
        self.student = student if student is not None else copy_teacher(teacher)  # G(x, sigma), a teacher copy
        self.fake_score = make_fake_score(teacher)
        set_dropout(self.student, c.dropout)
        set_dropout(self.fake_score, c.dropout)
        self.real_score = cfg(self.teacher, c.guidance)  # the teacher itself when guidance == 1
        grid = KarrasSigmaSampler.of(teacher)
        self.fake_sigma, self.gan_sigma = grid, KarrasSigmaSampler.of(teacher, 0.0, c.gan_hi)
        self.dm_sigma = KarrasSigmaSampler.of(teacher, c.dm_lo, c.dm_hi)
        K = c.student_steps  # Sec. 4.4: grid indices 999, 999 - 1000/K, ... (999/749/499/249 for K = 4)
        self.student_sigmas = torch.stack([grid.sigmas[999 - j * 1000 // K] for j in range(K)])
        self.default_steps = tuple(k for k in (1, 2, 4, 8) if K % k == 0)
        if c.gan:  # bottleneck features of psi (trained with it) or of the frozen teacher
            source = self.fake_score if c.gan_features == "fake" else self.teacher
            self.features = teacher_features(source, levels="bottleneck")  # not a network: shares weights
            with torch.no_grad():
                (h,) = self.features(torch.zeros((1, *teacher.sample_shape)), torch.ones(1))
            if h.ndim != 4:
                raise FewstepError("the DMD2 GAN needs a UNet model (spatial bottleneck features); pass gan=False")
            self.classifier = ClassifierHead(h.shape[1], h.shape[-1])

    def networks(self) -> dict[str, nn.Module]:
        nets = {"student": self.student, "fake_score": self.fake_score}
        return {**nets, "classifier": self.classifier} if self.config.gan else nets

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c, k = self.config, self.config.fake_updates
        guide = ["fake_score", "classifier"] if c.gan else ["fake_score"]
        opt = dict(betas=c.betas, weight_decay=c.weight_decay, kind="adamw", grad_clip=c.grad_clip)
        # train_edm.py: the generator steps on iterations i % ratio == 0, psi on every iteration; both
        # schedulers advance every iteration, so the generator warms up over warmup / ratio of its steps
        return {
            "student": OptimizerSpec(
                ["student"], lr=c.lr, every=k, lr_schedule=partial(warmup_factor, steps=c.warmup / k), **opt
            ),
            "fake_score": OptimizerSpec(guide, lr=c.fake_lr, lr_schedule=partial(warmup_factor, steps=c.warmup), **opt),
        }

    # --- maths ---------------------------------------------------------------------------------
    def _noise_and_labels(self, n: int) -> tuple[Tensor, Tensor | None]:
        device = next(self.student.parameters()).device
        z = torch.randn((n, *self.teacher.sample_shape), device=device)
        k = self.teacher.num_classes  # train_edm.py: generator labels drawn uniformly
        return z, (torch.randint(0, k, (n,), device=device) if k else None)

    def _denoise(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return self.student(x, sigma.to(x).expand(x.shape[0]), cond)

    def generate(self, z: Tensor, cond: Any) -> Tensor:
        """A training sample of G, with gradient through its last step only. One-step: G(80 z, 80).
        Multi-step with backward simulation (Sec. 4.4): pick a step j, run steps 0..j-1 without
        gradient from pure noise, re-noising each x0 prediction to the next level."""
        sig = self.student_sigmas.to(z)
        j = int(torch.randint(0, len(sig), ())) if len(sig) > 1 else 0
        x = sig[0] * z
        with torch.no_grad():
            for i in range(j):
                x = self._denoise(x, sig[i], cond) + sig[i + 1] * torch.randn_like(z)
        return self._denoise(x, sig[j], cond)

    def dm_loss(self, x: Tensor, cond: Any) -> Tensor:
        """DMD's distribution-matching loss (Eq. 7-8 of arXiv 2311.18828, edm_guidance.py)."""
        sigma = self.dm_sigma(x.shape[0], x.device).to(x)
        with torch.no_grad():
            x_t = x + append_dims(sigma, x.ndim) * torch.randn_like(x)
            pred_real = self.real_score(x_t, sigma, cond)
            pred_fake = self.fake_score(x_t, sigma, cond)
        return dm_loss(x, dm_gradient(x, pred_real, pred_fake))

    def logits(self, x: Tensor, cond: Any, sigma: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Classifier logits ("real") at a diffusion-GAN noise level (edm_guidance.py), or at the
        given ``sigma`` and ``noise``."""
        sigma = self.gan_sigma(x.shape[0], x.device).to(x) if sigma is None else sigma
        x_t = x + append_dims(sigma, x.ndim) * (torch.randn_like(x) if noise is None else noise)
        (h,) = self.features(x_t, sigma, cond)
        return self.classifier(h)

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        c, out = self.config, {}
        if "student" in due:
            z, cond = self._noise_and_labels(batch.size)
            x = self.generate(z, cond)
            loss = self.dm_loss(x, cond)
            if c.gan:  # non-saturating generator loss, psi and the head as fixed functions
                with no_param_grad(self.fake_score, self.classifier):
                    loss = loss + c.gen_gan_weight * g_loss(self.logits(x, cond), "nonsaturating")
            out["student"] = loss
        if "fake_score" in due:
            z, cond = self._noise_and_labels(batch.size)
            with torch.no_grad():
                x = self.generate(z, cond)
            loss = dsm_loss(self.fake_score, x, cond, self.fake_sigma(x.shape[0], x.device).to(x))
            if c.gan:
                if batch.x is None:
                    raise FewstepError(
                        "dmd2 with gan=True needs real images in the batch; give --data or set gan=False"
                    )
                real, real_cond = batch.x.to(x), batch.labels.to(x.device) if batch.labels is not None else None
                cls = d_loss(self.logits(real, real_cond), self.logits(x, cond), "nonsaturating")
                loss = loss + c.cls_weight * cls
            out["fake_score"] = loss
        return out

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        K = len(self.student_sigmas)
        if steps < 1 or K % steps:
            raise FewstepError(f"this dmd2 student has {K} step(s); sample with steps dividing {K} (got {steps})")
        return renoise_sample(self.student, noise, self.student_sigmas[:: K // steps].tolist(), cond)
