"""Students that are themselves diffusers networks, parameterised so that a stock diffusers
scheduler reproduces them exactly — the condition for a lossless export (:mod:`fewstep.export`).

- :class:`LCMStudent` — a consistency function in the parameterisation of Latent Consistency
  Models (Luo et al. 2023, arXiv 2310.04378, Sec. 4.2; diffusers' ``LCMScheduler.step``):

      f(x, sigma) = c_skip(t) * x_t + c_out(t) * x0_pred(net(x_t, t))
      c_skip = sd^2 / ((k t)^2 + sd^2),   c_out = k t / sqrt((k t)^2 + sd^2),   sd = 0.5, k = 10

  with ``x_t = a(sigma) x`` and ``t`` the (continuous) DDPM timestep of ``sigma``. It starts as
  the teacher's own x0 prediction (``c_out ~ 1`` for ``t >= 1``) and ``f(x, t=0) = x_t``.
  Optionally it takes the guidance scale as an input (LCM's ``w`` embedding through
  ``time_cond_proj_dim``; ``UNet2DConditionModel`` only).
- :func:`ode_student` — a trainable copy of the teacher adapter, for methods whose student is
  sampled with the ODE (progressive distillation, rectified flows): it exports with a DDIM
  (trailing) or flow-matching Euler scheduler.

Unlike fewstep's :class:`~fewstep.students.ConsistencyStudent` (sigma-space CM scalings, EDM
preconditioning), these parameterisations are the ones stock diffusers schedulers implement.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conversions import vp_sigmas
from fewstep.denoiser import Denoiser, append_dims, as_sigma, copy_contract
from fewstep.errors import FewstepError
from fewstep.teachers.diffusers.adapter import DiffusersDenoiser


def unwrap_teacher(teacher: Any) -> DiffusersDenoiser:
    """The :class:`DiffusersDenoiser` under guidance / NFE wrappers."""
    seen = teacher
    while not isinstance(seen, DiffusersDenoiser) and hasattr(seen, "inner"):
        seen = seen.inner
    if not isinstance(seen, DiffusersDenoiser):
        raise FewstepError(
            f"a diffusers student needs a diffusers teacher, got {type(teacher).__name__}; "
            "load one with load_teacher(folder)"
        )
    return seen


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's sinusoidal embedding of ``w' = w - 1`` (diffusers' pipelines'
    ``get_guidance_scale_embedding``, after VDM): ``[sin(1000 w' f_i), cos(1000 w' f_i)]`` with
    ``f_i = 10000^(-i / (dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.reshape(-1).float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def lcm_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's boundary-condition scalings ``(c_skip, c_out)`` at DDPM timestep ``t``."""
    kt = t * timestep_scaling
    return sigma_data**2 / (kt**2 + sigma_data**2), kt / (kt**2 + sigma_data**2).sqrt()


def _copy_network(teacher: DiffusersDenoiser, guidance_embed_dim: int) -> nn.Module:
    model = teacher.model
    if not guidance_embed_dim:
        return copy.deepcopy(model)
    if type(model).__name__ != "UNet2DConditionModel":
        raise FewstepError(
            f"{type(model).__name__} has no guidance input (time_cond_proj_dim); distil at a fixed guidance scale "
            "(teacher = cfg(teacher, w)) instead of embedding w"
        )
    # drop diffusers' "_use_default_values", which would reset time_cond_proj_dim to its default
    cfg = {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}
    student = type(model).from_config({**cfg, "time_cond_proj_dim": guidance_embed_dim})
    missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:  # pragma: no cover - a diffusers change
        raise RuntimeError(f"copying the teacher into a guidance-embedded UNet left {missing + unexpected} unmatched")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher
    dtype = next(model.parameters()).dtype
    return student if dtype == torch.float32 else student.to(dtype)


class LCMStudent(Denoiser):
    """A consistency student in LCM's parameterisation around a copy of the teacher's network.

    Args:
        teacher: a diffusers VP teacher (possibly wrapped in guidance).
        guidance_embed_dim: ``> 0`` adds LCM's guidance input of this size (``time_cond_proj_dim``);
            ``forward`` then takes ``extra = w - 1`` ``(B, 1)``, as :mod:`fewstep.methods.cd` passes it.
        network: use this network instead of a copy (e.g. the teacher's own model carrying LoRA
            adapters, :func:`fewstep.teachers.diffusers.lora.lora_student`).
    """

    def __init__(
        self,
        teacher: Denoiser,
        guidance_embed_dim: int = 0,
        timestep_scaling: float = 10.0,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        base = unwrap_teacher(teacher)
        if base.formulation.kind != "vp":
            raise FewstepError("LCM students need a VP (DDPM-type) teacher; flow teachers export an Euler student")
        net = network if network is not None else _copy_network(base, guidance_embed_dim)
        self.inner = _rewrap(base, net)
        self.guidance_embed_dim, self.timestep_scaling = guidance_embed_dim, timestep_scaling
        copy_contract(self, base)
        if network is None:
            self.inner.train().requires_grad_(True)

    @property
    def model(self) -> nn.Module:
        return self.inner.model

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None) -> Tensor:
        sigma = as_sigma(sigma, x)
        timestep_cond = None
        if self.guidance_embed_dim:
            if extra is None:
                raise FewstepError("this LCM student embeds the guidance scale; pass extra = w - 1 of shape (B, 1)")
            timestep_cond = guidance_scale_embedding(extra.reshape(x.shape[0], -1)[:, 0], self.guidance_embed_dim)
        x0, x_t, _, t = self.inner.native_x0(x, sigma, cond, timestep_cond)
        c_skip, c_out = lcm_scalings(t, 0.5, self.timestep_scaling)
        return append_dims(c_skip, x.ndim) * x_t + append_dims(c_out, x.ndim) * x0

    def ddim_grid(self, ddim_steps: int) -> Tensor:
        """The ascending sigmas of the LCM scripts' DDIM solver grid: timestep 0 and
        ``j * (T // ddim_steps) - 1`` for ``j = 1..ddim_steps`` (``DDIMSolver`` of diffusers'
        ``train_lcm_distill_*_wds.py``; its step from grid point ``j`` lands on point ``j - 1``)."""
        form = self.inner.formulation
        ratio = form.num_train_timesteps // ddim_steps
        t = torch.cat([torch.zeros(1), torch.arange(1, ddim_steps + 1) * ratio - 1]).long()
        return vp_sigmas(form.alphas_cumprod)[t]

    def lcm_sigmas(self, steps: int, original_inference_steps: int = 50) -> Tensor:
        """The sigmas ``LCMScheduler`` visits in ``steps`` steps (ending in 0)."""
        from diffusers import LCMScheduler

        lcm = LCMScheduler(num_train_timesteps=self.inner.formulation.num_train_timesteps)
        return self.inner.scheduler_sigmas(steps, lcm, original_inference_steps=original_inference_steps)


class EmbeddedInputStudent(Denoiser):
    """An ODE student of a diffusers UNet teacher with one extra scalar input (guided distillation's
    guidance scale ``w``; CTM's and BOOT's target time through ``FlowMapStudent``, which passes
    ``ln(s)/4``), embedded as LCM embeds its ``w``: the sinusoidal
    :func:`guidance_scale_embedding` of ``extra`` into the time embedding through
    ``time_cond_proj_dim``, whose projection starts at zero, so the student starts as the teacher.
    ``forward(x, sigma, cond, extra)`` with ``extra`` of shape ``(B,)`` or ``(B, 1)``."""

    def __init__(self, teacher: Denoiser, embed_dim: int = 256) -> None:
        super().__init__()
        base = unwrap_teacher(teacher)
        self.inner = _rewrap(base, _copy_network(base, embed_dim)).train().requires_grad_(True)
        self.embed_dim = embed_dim
        copy_contract(self, base)

    @property
    def model(self) -> nn.Module:
        return self.inner.model

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, extra: Tensor | None = None) -> Tensor:
        if extra is None:
            raise FewstepError("this student takes an extra scalar input (e.g. the guidance scale); pass extra")
        e = guidance_scale_embedding(torch.as_tensor(extra, device=x.device).reshape(x.shape[0], -1)[:, 0],
                                     self.embed_dim)  # fmt: skip
        return self.inner.native_x0(x, sigma, cond, e.to(x.dtype))[0]


def ode_student(teacher: Denoiser) -> DiffusersDenoiser:
    """A trainable copy of a diffusers teacher, sampled with the ODE (exports with DDIM trailing or
    flow-matching Euler). The VAE stays with the teacher."""
    base = unwrap_teacher(teacher)
    return _rewrap(base, copy.deepcopy(base.model)).train().requires_grad_(True)


def _rewrap(base: DiffusersDenoiser, model: nn.Module) -> DiffusersDenoiser:
    """Another network with ``base``'s scheduler, conditioning and noise range."""
    return DiffusersDenoiser(
        model,
        base.scheduler,
        null_class=base.has_null_class or base.conditioning != "labels",
        uncond=base.uncond,
        sigma_data=base.sigma_data,
        sigma_max=base.sigma_max,
        guidance_input=True,
        prompts=base.prompts,
        prompt_classes=base.prompt_classes,
    )


@torch.no_grad()
def lcm_sample(
    student: LCMStudent,
    generators: list[torch.Generator],
    steps: int,
    cond: Any = None,
    guidance: float | None = None,
    original_inference_steps: int = 50,
) -> Tensor:
    """Multistep consistency sampling exactly as ``LCMScheduler`` runs it, in sigma-space.

    Sample ``i`` draws its initial noise and each re-noising from ``generators[i]``, in the order
    diffusers' pipelines draw them (so a pipeline given the same generators makes the same images):
    ``x = z / a(sigma_0)``; then ``x0 = f(x, sigma_i)``, ``x = x0 + sigma_{i+1} z_i``.
    """
    sigmas = student.lcm_sigmas(steps, original_inference_steps)
    dtype = next(student.parameters()).dtype

    def draw() -> Tensor:
        return torch.stack([torch.randn((1, *student.sample_shape), generator=g, dtype=dtype)[0] for g in generators])

    extra = None
    if student.guidance_embed_dim:
        w = 1.0 if guidance is None else guidance
        extra = torch.full((len(generators), 1), w - 1.0, dtype=dtype)
    x = student.inner.start(draw(), sigmas[0])
    for i in range(steps):
        x0 = student(x, torch.full((len(generators),), float(sigmas[i]), dtype=dtype), cond, extra)
        x = x0 + float(sigmas[i + 1]) * draw() if i < steps - 1 else x0
    return x
