"""Consistency trajectory models (Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji & Ermon
2023, arXiv 2310.02279).

A flow-map student ``G_theta(x_t, t, s) = (s/t) x_t + (1 - s/t) g_theta(x_t, t, s)`` (Eq. 5;
:class:`fewstep.students.FlowMapStudent`) jumps along the teacher's PF-ODE from any ``t`` to any
``s <= t``. Its loss (Eq. 9–11, reference code ``ctm_losses``):

    L_CTM = d( G_sg(G_theta(x_t, t, s), s, eps),  G_sg(sg[G_theta](Solver_phi(x_t, t -> u), u, s), s, eps) )
    L_DSM = E_sigma lambda(sigma) || g_theta(x0 + sigma z, sigma, sigma) - x0 ||^2
    L     = L_CTM + lambda_DSM L_DSM  [+ lambda_GAN L_GAN]

``G_sg`` is the EMA target network ``theta^-`` (stop-gradient weights; gradients still flow through
its input on the student side); the target's inner jump ``u -> s`` is the *online* student under
no-grad (``sg[G_theta]``, the reference's default ``ctm_target_inner_type = 'model_sg'``), its
outer jump to ``eps`` the EMA; ``eps = sigma_min`` (the paper's "0"). Times live on the
N-point Karras grid (rho = 7; index 0 = sigma_max): per batch, the number of teacher Heun steps is
``n`` with ``p(n) ∝ n`` on ``1..n_max`` (``heun_step_strategy = weighted``); per sample, ``t`` is
uniform on indices ``[0, N-1-n]``, ``u = t + n`` and ``s`` uniform on ``[u, N-1]``.
``Solver_phi`` is ``n`` Heun steps of the teacher along the grid. The DSM term draws half the
batch from ``ln sigma ~ N(-1.2, 1.2^2)`` and half uniformly in ``r`` on the Karras ramp
``sigma = (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, ``r ~ U[0, 0.7)``
(the reference's ``HalfLogNormalHalfUniformSampler`` with ``diffusion_mult = 0.7``: it covers the
high noise levels a 1-step sampler starts from), with EDM's weight
``lambda(sigma) = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2``, scaled adaptively to L_CTM
(``lambda_DSM ||grad L_CTM|| / ||grad L_DSM||`` at the student's last layer, clamped to [0, 1e4]:
the reference's default ``apply_adaptive_weight = True``).

The optional GAN term (Sec. 4.2) is a hinge game between real data and ``G_theta(x_t, t, 0)``;
the generator term is scaled adaptively by ``||grad L_CTM|| / ||grad L_GAN||`` at the student's
last layer (clipped to [0.01, 10], as ``calculate_adaptive_weight``), and starts at ``gan_start``.

Sampling is gamma-sampling (Algorithm 2): ``x <- G(x, t_n, sqrt(1 - gamma^2) t_{n+1}) + gamma
t_{n+1} z``; ``gamma = 0`` is deterministic flow-map stepping, ``gamma = 1`` is CM's multistep.

Defaults from the reference code's CIFAR-10 settings (N = 18, n_max = 17, uniform ``s``, EMA
0.999, RAdam lr 4e-4, lambda_DSM = 1 with the adaptive weight, discriminator RAdam lr 2e-3 betas
(0.5, 0.9)). Checked against sony/ctm ``code/cm/script_util.py``, ``karras_diffusion.py`` and
``resample.py``: ``ctm_target_inner_type='model_sg'`` (``get_ctm_target`` is under no-grad, the
inner jump by ``model``, the outer by ``target_model``), ``apply_adaptive_weight=True``,
``diffusion_schedule_sampler='halflognormal'`` with ``diffusion_mult=0.7``, the teacher's Heun
steps for ``x_u``, student dropout 0.
Deviations: the paper's feature distance (LPIPS, or StyleGAN-XL's DeiT/EfficientNet features) needs
ImageNet weights fewstep cannot download — L2 / L1 / pseudo-Huber instead (a feature distance
from the digits classifier would leak into the FID it is judged by); the discriminator is
:mod:`fewstep.networks.discriminator`'s heads on the frozen teacher's features at ``gan_sigma``
instead of StyleGAN-XL's projected discriminator (``dsm_adaptive = False`` gives a fixed
lambda_DSM, ``dsm_sampler = "lognormal"`` the log-normal DSM levels alone, ``target_inner =
"ema"`` the EMA for both target jumps: this module's behaviour before it was checked against the
reference); the student's dropout defaults to 0 whatever the teacher's (the target and the
teacher run without it).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): the ``compress`` warm-up network with CTM's zero-initialised target-
level input; the ODE solver and the DSM term still use the teacher; the discriminator reads the
teacher's features (an analytic teacher's: the warm-up network's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, append_dims
from fewstep.errors import FewstepError
from fewstep.losses import edm_weight
from fewstep.methods import Batch, EMASpec, Method, OptimizerSpec, register
from fewstep.methods._trajectory import (
    DISTANCES,
    check_option,
    distance,
    expand_like,
    sampling_sigmas,
)
from fewstep.schedules import karras_sigmas
from fewstep.solvers import STEPPERS, ode_step
from fewstep.students import FlowMapStudent, copy_teacher, set_dropout


@dataclass
class CTMConfig:
    num_scales: int = 18  # N: Karras grid points (CIFAR-10; ImageNet-64 uses 40)
    rho: float = 7.0
    max_heun_steps: int = 17  # n_max (reference: 17 on CIFAR-10, 39 on ImageNet-64)
    heun_step_strategy: str = "weighted"  # weighted (p(n) ∝ n) | uniform | fixed (always n_max)
    s_strategy: str = "uniform"  # uniform on [u, sigma_min] | smallest (s = sigma_min)
    solver: str = "heun"  # teacher solver: heun | euler
    target_decay: float = 0.999
    distance: str = "l2"  # l2 | l1 | huber
    huber_c: float = 0.001
    dsm_weight: float = 1.0
    dsm_adaptive: bool = True  # scale L_DSM to L_CTM's gradient norm at the last layer (apply_adaptive_weight)
    dsm_sampler: str = "halflognormal"  # halflognormal (the reference) | lognormal
    dsm_p_mean: float = -1.2
    dsm_p_std: float = 1.2
    diffusion_mult: float = 0.7  # the uniform half's range on the Karras ramp, r ~ U[0, diffusion_mult)
    target_inner: str = "student"  # the target's inner jump: student (no-grad, 'model_sg') | ema
    gan_weight: float = 0.0  # 0 disables the GAN term
    gan_start: int = 0  # iteration at which the GAN term starts
    gan_sigma: float = 0.002  # noise level at which the teacher's features are read
    d_lr: float = 2e-3
    gamma: float = 0.0  # gamma-sampling
    sample_sigmas: tuple[float, ...] = (0.821,)  # 2-step level (as CD); others: Karras
    dropout: float | None = 0.0  # student dropout (None: the teacher's); the target runs without
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "radam"
    grad_clip: float | None = None


@register
class ConsistencyTrajectoryModel(Method):
    name = "ctm"
    family = "trajectory"
    paper = "2310.02279"
    title = "Consistency trajectory models: a flow map G(x, t, s) with soft consistency, DSM and GAN terms"
    needs_data = True
    Config = CTMConfig
    default_steps = (1, 2, 4)

    def __init__(self, teacher: Denoiser, config: CTMConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        check_option("teacher solver", c.solver, STEPPERS)
        check_option("distance", c.distance, DISTANCES)
        check_option("heun_step_strategy", c.heun_step_strategy, ("weighted", "uniform", "fixed"))
        check_option("s_strategy", c.s_strategy, ("uniform", "smallest"))
        check_option("dsm_sampler", c.dsm_sampler, ("halflognormal", "lognormal"))
        check_option("target_inner", c.target_inner, ("student", "ema"))
        if not 1 <= c.max_heun_steps <= c.num_scales - 1:
            raise FewstepError(f"max_heun_steps must lie in [1, num_scales - 1 = {c.num_scales - 1}]")
        if not 0.0 <= c.gamma <= 1.0:
            raise FewstepError(f"gamma must lie in [0, 1], got {c.gamma}")
        self.student = student if student is not None else FlowMapStudent(copy_teacher(teacher, extra_dims=1))
        set_dropout(self.student, c.dropout)
        self.target = copy.deepcopy(self.student).requires_grad_(False)  # theta^-
        self.grid = karras_sigmas(c.num_scales, teacher.sigma_min, teacher.sigma_max, c.rho)[:-1]  # descending
        self.discriminator = self._build_discriminator() if c.gan_weight > 0 else None

    def _build_discriminator(self) -> nn.Module:
        from fewstep.networks.discriminator import Discriminator, teacher_features

        feats = teacher_features(self.teacher, "multi")
        return Discriminator(feats, self.teacher.sample_shape, self.teacher.num_classes)

    def networks(self) -> dict[str, nn.Module]:
        nets = {"student": self.student}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        if self.discriminator is None:
            return {"student": OptimizerSpec(["student"], c.lr, c.betas, kind=c.optimizer, grad_clip=c.grad_clip)}
        # the reference alternates generator and discriminator updates (g_learning_period = 2)
        return {
            "student": OptimizerSpec(["student"], c.lr, c.betas, kind=c.optimizer, grad_clip=c.grad_clip, every=2),
            "discriminator": OptimizerSpec(["discriminator"], c.d_lr, (0.5, 0.9), kind="radam", every=2, offset=1),
        }

    def emas(self) -> dict[str, EMASpec]:
        return {"target": EMASpec("student", self.config.target_decay)}

    # --- time sampling -------------------------------------------------------------------------
    def draw_heun_steps(self) -> int:
        c, n_max = self.config, self.config.max_heun_steps
        if c.heun_step_strategy == "fixed":
            return n_max
        p = torch.arange(1, n_max + 1, dtype=torch.float64)
        p = p if c.heun_step_strategy == "weighted" else torch.ones_like(p)
        return int(torch.multinomial(p, 1)) + 1

    def draw_indices(self, batch: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Grid indices ``(t, u, s)`` with ``t < u = t + n <= s <= N - 1`` (0 = sigma_max)."""
        N = len(self.grid)
        i_t = torch.randint(0, N - n, (batch,))
        i_u = i_t + n
        if self.config.s_strategy == "smallest":
            return i_t, i_u, torch.full_like(i_t, N - 1)
        i_s = i_u + (torch.rand(batch) * (N - i_u)).long().clamp_max(N - 1 - i_u)
        return i_t, i_u, i_s

    # --- losses --------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_solve(self, x: Tensor, i_t: Tensor, n: int, cond: Any = None) -> Tensor:
        """``n`` teacher steps along the grid from index ``i_t`` (per sample) to ``i_t + n``."""
        grid = self.grid.to(device=x.device, dtype=x.dtype)
        i_t = i_t.to(x.device)
        for k in range(n):
            x = ode_step(self.teacher, x, grid[i_t + k], grid[i_t + k + 1], cond, self.config.solver)
        return x

    def ctm_loss(self, x0: Tensor, cond: Any, i_t: Tensor, n: int, i_s: Tensor, noise: Tensor) -> Tensor:
        """Per-sample soft consistency loss (Eq. 9) for grid indices ``t``, ``u = t + n``, ``s``."""
        grid = self.grid.to(device=x0.device, dtype=x0.dtype)
        t, u, s = grid[i_t], grid[i_t + n], grid[i_s]
        eps = torch.full_like(s, self.teacher.sigma_min)
        x_t = x0 + append_dims(t, x0.ndim) * noise
        estimate = self.target(self.student(x_t, t, s, cond), s, eps, cond)  # gradient through the student
        with torch.no_grad():
            x_u = self.teacher_solve(x_t, i_t, n, cond)
            target = self.ctm_target(x_u, u, s, eps, cond)
        return distance(estimate, target, self.config.distance, self.config.huber_c)

    @torch.no_grad()
    def ctm_target(self, x_u: Tensor, u: Tensor, s: Tensor, eps: Tensor, cond: Any) -> Tensor:
        """The target ``G_sg(sg[G_theta](x_u, u, s), s, eps)``: the inner jump by the online student
        under no-grad (``model_sg``; ``target_inner = "ema"``: by the EMA), the outer by the EMA."""
        inner = self.student if self.config.target_inner == "student" else self.target
        return self.target(inner(x_u, u, s, cond), s, eps, cond)

    def dsm_sigma(self, n: int, device: torch.device | str) -> Tensor:
        """DSM noise levels: the first half log-normal, the rest uniform in ``r`` on the Karras ramp
        (``HalfLogNormalHalfUniformSampler``); all log-normal with ``dsm_sampler = "lognormal"``."""
        c, t = self.config, self.teacher
        sigma = (torch.randn(n) * c.dsm_p_std + c.dsm_p_mean).exp()
        if c.dsm_sampler == "halflognormal":
            r = torch.rand(n - n // 2) * c.diffusion_mult
            hi, lo = t.sigma_max ** (1 / c.rho), t.sigma_min ** (1 / c.rho)
            sigma = torch.cat([sigma[: n // 2], (hi + r * (lo - hi)) ** c.rho])
        return sigma.to(device)

    def dsm_loss(self, x0: Tensor, cond: Any, sigma: Tensor, noise: Tensor) -> Tensor:
        """Per-sample EDM-weighted DSM of the student's denoiser ``g(x, sigma, sigma)``."""
        x = x0 + append_dims(sigma, x0.ndim) * noise
        err = (self.student.g(x, sigma, sigma, cond) - x0).flatten(1).pow(2).mean(1)
        return edm_weight(sigma, self.teacher.sigma_data) * err

    def gan_fake(self, x0: Tensor, cond: Any) -> Tensor:
        """``G_theta(x_t, t, 0)`` from a grid level ``t`` (reference: ``gan_fake_outer_type = no``)."""
        t = self.grid.to(device=x0.device, dtype=x0.dtype)[torch.randint(0, len(self.grid) - 1, (x0.shape[0],))]
        x_t = x0 + append_dims(t, x0.ndim) * torch.randn_like(x0)
        return self.student(x_t, t, torch.zeros_like(t), cond)

    def _disc(self, x: Tensor, cond: Any) -> Tensor:
        return self.discriminator(x, expand_like(self.config.gan_sigma, x), cond)

    def _adaptive_weight(self, loss_ctm: Tensor, other: Tensor, lo: float, hi: float) -> Tensor:
        """``||grad L_CTM|| / ||grad other||`` at the student's last layer, clamped (reference
        ``calculate_adaptive_weight``; VQGAN's balancing)."""
        last = [p for p in self.student.parameters() if p.requires_grad and p.ndim > 1][-1]
        (g_ctm,) = torch.autograd.grad(loss_ctm, last, retain_graph=True)
        (g_other,) = torch.autograd.grad(other, last, retain_graph=True)
        return (g_ctm.norm() / (g_other.norm() + 1e-4)).clamp(lo, hi).detach()

    def student_loss(self, x0: Tensor, cond: Any, gan_on: bool) -> tuple[Tensor, Tensor]:
        """The student's total loss and its ``L_CTM`` term (the reference of the adaptive weights)."""
        c = self.config
        n = self.draw_heun_steps()
        i_t, _, i_s = self.draw_indices(x0.shape[0], n)
        loss_ctm = self.ctm_loss(x0, cond, i_t, n, i_s, torch.randn_like(x0)).mean()
        loss = loss_ctm
        if c.dsm_weight > 0:
            sigma = self.dsm_sigma(x0.shape[0], x0.device)
            loss_dsm = self.dsm_loss(x0, cond, sigma.to(x0.dtype), torch.randn_like(x0)).mean()
            if c.dsm_adaptive:
                loss_dsm = self._adaptive_weight(loss_ctm, loss_dsm, 0.0, 1e4) * loss_dsm
            loss = loss + c.dsm_weight * loss_dsm
        if gan_on:
            from fewstep.networks.discriminator import g_loss, no_param_grad

            with no_param_grad(self.discriminator):
                loss_gan = g_loss(self._disc(self.gan_fake(x0, cond), cond), "hinge")
            loss = loss + c.gan_weight * self._adaptive_weight(loss_ctm, loss_gan, 0.01, 10.0) * loss_gan
        return loss, loss_ctm

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if batch.x is None:
            raise FewstepError("CTM needs real data for its DSM term; pass a dataset (e.g. --data digits)")
        c, x0, cond = self.config, batch.x, batch.labels
        out: dict[str, Tensor] = {}
        gan_on = self.discriminator is not None and step >= c.gan_start
        if "student" in due:
            out["student"] = self.student_loss(x0, cond, gan_on)[0]
        if "discriminator" in due and self.discriminator is not None:
            from fewstep.networks.discriminator import d_loss

            with torch.no_grad():
                fake = self.gan_fake(x0, cond)
            loss_d = d_loss(self._disc(x0, cond), self._disc(fake, cond), "hinge")
            out["discriminator"] = loss_d if gan_on else 0.0 * loss_d
        return out

    # --- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None, gamma: float | None = None) -> Tensor:
        """gamma-sampling (Algorithm 2) with ``steps`` student evaluations."""
        gamma = self.config.gamma if gamma is None else gamma
        sigmas = [*sampling_sigmas(steps, self.teacher.sigma_min, self.teacher.sigma_max, self.config.sample_sigmas)]
        sigmas.append(0.0)
        x = noise * sigmas[0]
        for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            s = (1 - gamma**2) ** 0.5 * t_next
            x = self.student(x, expand_like(t, x), expand_like(s, x), cond)
            if gamma > 0 and t_next > 0:
                x = x + gamma * t_next * torch.randn_like(x)
        return x
