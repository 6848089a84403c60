"""Rectified flow: reflow and its one-step distillation (Liu, Gong & Liu 2022, "Flow straight and
fast", arXiv 2209.03003), and InstaFlow's recipe for guided teachers (Liu et al. 2023, arXiv
2309.06380) as the ``instaflow`` preset.

Reflow couples noise ``z`` with the answer ``y`` of an ODE started from it (the pairs ``fewstep
pairs`` makes) and trains a new flow on the straight lines between them:

    min_v  int_0^1 E || (X_1 - X_0) - v(X_t, t) ||^2 dt,   X_t = t X_1 + (1 - t) X_0

With ``X_1 = z`` and ``X_0 = y`` in flow-matching time (``t = sigma / (1 + sigma)``;
:mod:`fewstep.conversions`) and the velocity read from a denoiser, ``v = (x_t - D(x_t / (1 - t),
sigma_t)) / t``, the loss is a regression of the denoiser onto the pair's end, weighted by
``1 / t^2``:

    x_sigma = (1 - sigma / sigma_max) y + sigma z,    L = E_t || D_theta(x_sigma, sigma) - y ||^2 / t^2

— the straight line from the pair's start ``sigma_max z`` (every fewstep ODE starts there; it is
``t_max = sigma_max / (1 + sigma_max)`` in flow time, not 1) to ``y``, on which the velocity is the
constant ``z - y / t_max`` (:func:`fewstep.conversions.pair_line`, ``flow_time_velocity``; tested).
A flow trained on its own straight lines
is *k-rectified* (``pairs_from=init`` starts round k + 1 from run k); Euler on a uniform ``t`` grid
samples it (Euler in ``t`` is Euler/DDIM in ``sigma``). ``phase=distill`` is the paper's
distillation: only ``t = 1`` is trained, ``|| (X_1 - X_0) - v(X_1, 1) ||^2``, i.e. the one-step
output ``D(sigma_max z, sigma_max)`` regresses ``y`` (KD onto the straightened flow's
pairs). :func:`straightness` is the paper's measure ``S = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt``
of a sampler's trajectory (0 for a straight flow), reported per round by ``bench/reflow_straightness.py``.

Defaults checked against the reference code (gnobitab/RectifiedFlow, ``losses.py``
``get_rectified_flow_loss_fn``/``sde_lib.RectifiedFlow``; InstaFlow ``code/train_rf.py``):
``t ~ U(eps, 1)`` with ``eps = 1e-3`` (the reference's ``t = 0`` is the noise; here ``eps`` keeps
``t`` off the data end, where ``v = (x_t - D) / t``); the loss is the mean squared velocity error
with no time weighting (``reduce_mean``); Adam lr 2e-4, betas (0.9, 0.999) (the CIFAR-10 config)
with gradient clipping at 1 and an EMA for evaluation (0.999999 for the 1-RF, 0.9999 for reflow
and distillation; the engine's ramped evaluation EMA here); reflow pairs from the previous flow's
EMA weights and its ODE (RK45 in the reference; Heun 18 on the Karras grid here, 35 NFE), 10,000
pairs (the config's ``total_number_of_samples``; its README suggests 1M); the k-RF starts from the
(k-1)-RF; the distillation (``reflow_t_schedule = 't0'``) trains the one step from the noise only,
with LPIPS in the reference's one-step config and L2 as its option — L2 here, as no LPIPS network
can be downloaded (InstaFlow: L2 first, then LPIPS); sampling with Euler on a uniform grid.

InstaFlow (``instaflow``; its repository holds inference code only, so its training settings come
from the model cards and the authors' answers in its issues): the same two stages on a guided
teacher — the 2-RF starts from the teacher and trains on the teacher's pairs with classifier-free
guidance 6, then the one-step model starts from the 2-RF and regresses the 2-RF's pairs made with
guidance 1.5 (``guidance`` overrides both; InstaFlow: L2, then LPIPS).

Deviations: ``t`` lies in ``[eps, t_max]`` (sigma-space teachers have no ``t = 1``); a chained
round starts from the previous run's evaluation-EMA weights (the reference loads the raw weights
and starts a new EMA); the reference's 5,000-iteration lr warm-up is not applied (each round
fine-tunes a trained flow, and this budget is ~6,000 iterations); the line starts
at ``sigma_max z`` as the pairs did; the network is an x-predicting denoiser through EDM's
preconditioning (the reference predicts ``v``) so the student starts at the teacher; 10,000 pairs
by default (the reference generates millions).

A student that is not a teacher copy (``--student-net``, an analytic teacher;
:mod:`fewstep.train.warmup`): trained from its start by the same regression.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conversions import flow_t_to_sigma, flow_time_velocity, pair_line, uniform_flow_sigmas
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.losses import REGRESSION, regression_loss
from fewstep.methods import register
from fewstep.methods.base import Batch, EMASpec, Method, OptimizerSpec
from fewstep.pairs import Pairs, PairSource
from fewstep.solvers import ddim_step, euler
from fewstep.students import copy_teacher, set_dropout

PHASES = ("flow", "distill")
SOURCES = ("teacher", "init")


@torch.no_grad()
def straightness(denoiser: Denoiser, noise: Tensor, steps: int = 64, cond: Any = None) -> float:
    """Liu et al.'s straightness ``int E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt`` (pixel mean) of
    ``denoiser``'s ODE, Euler on ``steps`` uniform flow-time steps from ``sigma_max noise``; 0 for a
    flow whose trajectories are straight lines."""
    sigmas = uniform_flow_sigmas(steps, denoiser.sigma_max)
    x = noise * float(sigmas[0])
    t = sigmas / (1 + sigmas)
    start = x / (1 + sigmas[0])
    vs = []
    for i in range(steps):
        s = torch.full((x.shape[0],), float(sigmas[i]), device=x.device, dtype=x.dtype)
        x0 = denoiser(x, s, cond)
        vs.append(flow_time_velocity(x, x0, s))
        x = ddim_step(x, x0, s, torch.full_like(s, float(sigmas[i + 1])))  # Euler in t = DDIM in sigma
    chord = (start - x) / float(t[0] - t[-1])  # (Z_1 - Z_0) / (t_max - 0)
    return float(sum((v - chord).pow(2).flatten(1).mean(1).mean() for v in vs) / steps)


@dataclass
class ReflowConfig:
    phase: str = "flow"  # flow: train the straight flow; distill: the one-step distillation (t = 1 only)
    pairs_from: str = "teacher"  # teacher, or init: the ODE of the flow this run starts from (--init)
    pairs: str | None = None  # a folder written by `fewstep pairs` (of the teacher); None = generate
    num_pairs: int = 10000
    solver: str = "heun"  # the ODE solver of the pairs (reference: RK45)
    solver_steps: int = 18  # 35 NFE per pair
    guidance: float = 1.0  # CFG scale of the pair-generating ODE (InstaFlow: 1.5)
    t_eps: float = 1e-3  # t ~ U(t_eps, t_max) (reference eps = 1e-3)
    loss: str = "l2"
    lr: float = 2e-4  # RectifiedFlow CIFAR-10 config
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    dropout: float | None = None  # dropout of the trained copy; None keeps the teacher's


@register
class Reflow(Method):
    name = "reflow"
    family = "trajectory"
    paper = "2209.03003"
    title = "Rectified flow: straighten the teacher's ODE on its own (noise, sample) pairs, then distil"
    needs_data = False
    starts_at_teacher = False  # regression onto pairs trains a network from its own start
    Config = ReflowConfig

    def __init__(self, teacher: Denoiser, config: ReflowConfig | None = None, student: nn.Module | None = None) -> None:
        super().__init__(teacher, config)
        c = self.config
        if c.phase not in PHASES or c.pairs_from not in SOURCES or c.loss not in REGRESSION:
            raise FewstepError(
                f"reflow needs phase in {PHASES}, pairs_from in {SOURCES}, loss in {REGRESSION}; "
                f"got {c.phase!r}, {c.pairs_from!r}, {c.loss!r}"
            )
        if not 0 < c.t_eps < teacher.sigma_max / (1 + teacher.sigma_max):
            raise FewstepError(f"t_eps must lie in (0, t_max), got {c.t_eps}")
        self.student = student if student is not None else copy_teacher(teacher)
        set_dropout(self.student, c.dropout)
        if c.pairs_from == "init":  # the flow this run starts from, frozen: the ODE of round k + 1's pairs
            self.source = copy.deepcopy(self.student).eval().requires_grad_(False)
        source = self.source if c.pairs_from == "init" else teacher
        self._pairs = PairSource(source, c)  # generated at the first loss; loading a run to sample never does

    @property
    def pairs(self) -> Pairs:
        return self._pairs.get()

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def emas(self) -> dict[str, EMASpec]:
        # decay 1: the source flow never moves; kept in checkpoints so a resumed run reads the same pairs
        return {"source": EMASpec("student", 1.0)} if self.config.pairs_from == "init" else {}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        c = self.config
        return {"student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, grad_clip=c.grad_clip)}

    def loss_on(self, z: Tensor, y: Tensor, labels: Tensor | None, t: Tensor | None = None) -> Tensor:
        """The rectified-flow loss on pairs at flow times ``t`` (``(B,)``; drawn when ``None``), in
        velocity units; ``phase=distill`` evaluates the one-step output at ``sigma_max`` only."""
        c, smax = self.config, self.teacher.sigma_max
        if c.phase == "distill":
            sigma = torch.full((z.shape[0],), smax, device=z.device, dtype=z.dtype)
            t_max = smax / (1 + smax)  # in velocity units, as the flow phase
            loss = regression_loss(self.student(smax * z, sigma, labels), y, c.loss)
            return loss / (t_max**2 if c.loss == "l2" else t_max)
        if t is None:
            t_max = smax / (1 + smax)
            t = c.t_eps + (t_max - c.t_eps) * torch.rand(z.shape[0], device=z.device, dtype=z.dtype)
        sigma = flow_t_to_sigma(t)
        x = pair_line(y, z, sigma, smax)
        diff = (self.student(x, sigma, labels) - y).flatten(1)  # = -t (v_theta - v*)
        if c.loss == "l2":
            return (diff.pow(2).mean(1) / t**2).mean()
        return (diff.abs().mean(1) / t).mean()

    def losses(self, batch: Batch, step: int, due: set[str]) -> dict[str, Tensor]:
        if "student" not in due:
            return {}
        device = next(self.student.parameters()).device
        z, y, labels = self.pairs.batch(batch.size, device)
        return {"student": self.loss_on(z, y, labels)}

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int = 1, cond: Any = None) -> Tensor:
        """Euler on ``steps`` uniform flow-time steps from ``sigma_max noise`` (one step: ``D(sigma_max z)``)."""
        sigmas = uniform_flow_sigmas(steps, self.teacher.sigma_max).to(noise.device)
        return euler(self.student, noise * float(sigmas[0]), sigmas, cond)


@dataclass
class InstaFlowConfig(ReflowConfig):
    guidance: float | None = None  # None: 6 for the 2-RF's teacher pairs, 1.5 for the distillation's 2-RF pairs


@register
class InstaFlow(Reflow):
    name = "instaflow"
    paper = "2309.06380"
    title = "InstaFlow: reflow on guided teacher pairs (2-RF from the teacher), then one-step distillation"
    Config = InstaFlowConfig

    def __init__(self, teacher: Denoiser, config: Any = None, student: nn.Module | None = None) -> None:
        config = config if config is not None else InstaFlowConfig()
        if config.guidance is None:
            config = dataclasses.replace(config, guidance=1.5 if config.phase == "distill" else 6.0)
        super().__init__(teacher, config, student)
