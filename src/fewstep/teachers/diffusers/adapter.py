"""A diffusers network plus its scheduler config, seen as a fewstep sigma-space denoiser.

The scheduler config says how the network was trained; :mod:`fewstep.conversions` does the maths
(k-diffusion's ``external.py`` wrappers follow the same idea):

- **VP** schedulers (DDPM, DDIM, Euler, DPM-Solver, LCM, ...: anything with ``alphas_cumprod``):
  ``x_t = a x`` with ``a = 1/sqrt(1 + sigma^2)``; the network sees the continuous timestep
  ``sigma_to_timestep(sigma)`` (log-sigma interpolation between its 1000 training steps) and
  predicts ``epsilon``, ``v_prediction`` or ``sample``.
- **flow matching** (``FlowMatchEulerDiscreteScheduler``, SD3/Flux): ``x_t = x / (1 + sigma)``,
  time ``t = sigma / (1 + sigma)``, the network sees ``t * num_train_timesteps`` and predicts the
  velocity ``eps - x0``. ``t = 1`` is ``sigma = inf``; fewstep starts at ``sigma_max``
  (``t = 1 - 1/num_train_timesteps`` unless given).

Networks: ``UNet2DModel`` (unconditional or class labels), ``UNet2DConditionModel`` (text
conditioning, SDXL's added conditions) and ``SD3Transformer2DModel`` (text + pooled). A latent
model carries its VAE: :meth:`DiffusersDenoiser.encode` turns images into the latents the
denoiser works on and :meth:`DiffusersDenoiser.decode` turns samples back into images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conversions import (
    flow_t_to_sigma,
    sigma_to_flow_t,
    sigma_to_timestep,
    vp_scale,
    vp_sigmas,
    x0_from_output,
)
from fewstep.denoiser import Denoiser, append_dims, as_sigma
from fewstep.errors import FewstepError
from fewstep.teachers.diffusers.conditioning import TextConditioning, TextGuidance, check_text_conditioning

MODELS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass
class Formulation:
    """How a diffusers scheduler config defines the noisy sample and the network's target."""

    kind: str  # "vp" | "flow"
    prediction: str  # epsilon | v_prediction | sample | flow
    num_train_timesteps: int
    alphas_cumprod: Tensor | None = None  # float64, VP only

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> Formulation:
        name = type(scheduler).__name__
        cfg = scheduler.config
        if name.startswith("FlowMatch"):
            if cfg.get("use_dynamic_shifting"):
                raise FewstepError(
                    f"{name} with use_dynamic_shifting (Flux) needs a resolution-dependent mu; set "
                    "use_dynamic_shifting=false and a fixed shift in scheduler_config.json"
                )
            if cfg.get("invert_sigmas") or cfg.get("shift_terminal"):
                raise FewstepError(f"{name} with invert_sigmas/shift_terminal is not supported; use a plain shift")
            return cls("flow", "flow", int(cfg.num_train_timesteps))
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            raise FewstepError(
                f"scheduler {name} is not supported; use a VP scheduler (DDPMScheduler, DDIMScheduler, ...) "
                "or FlowMatchEulerDiscreteScheduler in scheduler_config.json"
            )
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in VP_PREDICTIONS:
            raise FewstepError(
                f"prediction_type {pred!r} of {name} is not supported; use one of {', '.join(VP_PREDICTIONS)}"
            )
        # zero-terminal-SNR schedules end in abar = 0 (sigma = inf): clamp as diffusers' Euler does
        abar = abar.to(torch.float64).clamp_min(2.0**-24)
        return cls("vp", pred, len(abar), abar)

    def native(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, s, timestep)`` of the network's own form ``x_t = a x0 + s eps`` at ``sigma``."""
        if self.kind == "vp":
            a = vp_scale(sigma)
            return a, sigma * a, sigma_to_timestep(sigma, self.alphas_cumprod.to(sigma.device))
        a = 1 / (1 + sigma)  # = 1 - t, without the cancellation of 1 - t near t = 1
        return a, sigma * a, sigma_to_flow_t(sigma) * self.num_train_timesteps

    def training_sigma_range(self, scheduler: Any) -> tuple[float, float]:
        if self.kind == "vp":
            sig = vp_sigmas(self.alphas_cumprod)
            return float(sig[0]), float(sig[-1])
        t_min = float(scheduler.sigma_min)
        return float(flow_t_to_sigma(torch.tensor(t_min, dtype=torch.float64))), float(self.num_train_timesteps - 1)


def _cfg(model: nn.Module) -> dict:
    return dict(model.config)


class DiffusersDenoiser(Denoiser):
    """A diffusers network with its scheduler's formulation, behind ``forward(x, sigma, cond)``.

    Args:
        model: ``UNet2DModel``, ``UNet2DConditionModel`` or ``SD3Transformer2DModel``.
        scheduler: the diffusers scheduler it was trained with (its config is what matters).
        vae: the ``AutoencoderKL`` of a latent model (``None`` for pixel models).
        null_class: for a class-conditional ``UNet2DModel`` (``num_class_embeds = K + 1``), whether
            the last label ``K`` is the null class used for guidance (then ``num_classes = K``);
            ``False`` if every embedding is a real class (no guidance).
        uncond: the unconditional embedding of a text-conditioned model (for guidance).
        sigma_data: data standard deviation (default 0.5 for pixels in [-1, 1], 1.0 for latents).
        sigma_max: largest noise level fewstep samples from (default: the last training timestep;
            for flow models ``t = 1 - 1/num_train_timesteps``).
        guidance_input: accept a network that embeds the guidance scale (``time_cond_proj_dim``;
            students built by :class:`~fewstep.teachers.diffusers.students.LCMStudent`).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler: Any,
        *,
        vae: nn.Module | None = None,
        null_class: bool = True,
        uncond: TextConditioning | None = None,
        sigma_data: float | None = None,
        sigma_max: float | None = None,
        guidance_input: bool = False,
        prompts: TextConditioning | None = None,
        prompt_classes: list[int] | None = None,
    ) -> None:
        super().__init__()
        kind = type(model).__name__
        if kind not in MODELS:
            raise FewstepError(f"diffusers model {kind} is not supported as a teacher; use one of {', '.join(MODELS)}")
        self.model, self.scheduler, self.vae = model, scheduler, vae
        self.formulation = Formulation.from_scheduler(scheduler)
        self.uncond = uncond
        cfg = _cfg(model)
        self.conditioning, self.cond_spec = self._conditioning_of(kind, cfg, guidance_input)
        self.num_classes = 0
        if self.conditioning == "labels":
            self.num_classes = cfg["num_class_embeds"] - 1 if null_class else cfg["num_class_embeds"]
        self.has_null_class = null_class and self.conditioning == "labels"
        self.prompts, self.prompt_classes = None, None
        if prompts is not None:
            self._set_prompts(prompts, prompt_classes)
        size = cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (cfg["in_channels"], h, w)
        self.sigma_data = sigma_data if sigma_data is not None else (1.0 if vae is not None else 0.5)
        self.sigma_min, top = self.formulation.training_sigma_range(scheduler)
        self.sigma_max = float(sigma_max) if sigma_max is not None else top

    # --- conditioning ----------------------------------------------------------------------------
    @staticmethod
    def _conditioning_of(kind: str, cfg: dict, guidance_input: bool) -> tuple[str, dict]:
        if kind == "UNet2DModel":
            if cfg.get("class_embed_type") is not None:
                raise FewstepError(
                    f"UNet2DModel with class_embed_type={cfg['class_embed_type']!r} is not supported; "
                    "use num_class_embeds (an embedding table of labels)"
                )
            return ("labels" if cfg.get("num_class_embeds") else "none"), {}
        if kind == "SD3Transformer2DModel":
            return "text", {"hidden": cfg["joint_attention_dim"], "pooled": cfg["pooled_projection_dim"]}
        for key in ("num_class_embeds", "class_embed_type", "encoder_hid_dim_type"):
            if cfg.get(key) is not None:
                raise FewstepError(f"UNet2DConditionModel with {key} set is not supported; use a text-only UNet")
        if cfg.get("time_cond_proj_dim") is not None and not guidance_input:
            raise FewstepError(
                "this UNet2DConditionModel embeds a guidance scale (time_cond_proj_dim, an LCM student); "
                "distill from its base model instead"
            )
        hidden = cfg["cross_attention_dim"]
        if not isinstance(hidden, int):
            raise FewstepError("UNet2DConditionModel with per-block cross_attention_dim is not supported")
        spec = {"hidden": hidden, "pooled": None, "time_ids": None}
        add = cfg.get("addition_embed_type")
        if add == "text_time":  # SDXL: text_embeds (pooled) + 6 micro-conditioning time ids
            spec["time_ids"] = 6
            spec["pooled"] = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        elif add is not None:
            raise FewstepError(f"addition_embed_type={add!r} is not supported; use a text or SDXL (text_time) UNet")
        return "text", spec

    def _set_prompts(self, prompts: TextConditioning, prompt_classes: list[int] | None) -> None:
        """Let integer labels stand for prompts: label ``k`` is ``prompts[k]``, label ``K`` (the
        null label, ``K = len(prompts)``) the unconditional embedding. So every label-driven part of
        fewstep (the engine's batches, guidance by the null label, evaluation's uniform labels) runs on
        a text-to-image teacher; ``prompt_classes[k]`` is the class prompt ``k`` shows (what
        evaluation's label accuracy compares with)."""
        if self.conditioning != "text":
            raise FewstepError("a prompt table needs a text-conditioned model (UNet2DConditionModel, SD3)")
        if self.uncond is None:
            raise FewstepError("a prompt table needs the unconditional embedding (fewstep_uncond.safetensors)")
        self.prompts = check_text_conditioning(prompts, len(prompts), self.cond_spec, type(self.model).__name__)
        self.prompt_classes = list(prompt_classes) if prompt_classes is not None else list(range(len(prompts)))
        if len(self.prompt_classes) != len(prompts):
            raise FewstepError(f"{len(prompts)} prompts but {len(self.prompt_classes)} prompt classes; give one each")
        self.num_classes, self.has_null_class = len(prompts), True

    def label_conditioning(self, labels: Tensor) -> TextConditioning:
        """The prompts' encodings for integer ``labels`` (the null label: the unconditional one)."""
        table = TextConditioning.cat([self.prompts, self.uncond[:1]])
        return table.to(device=labels.device)[labels.long()]

    def _check_cond(self, cond: Any, batch: int, x: Tensor) -> Any:
        if self.conditioning == "none":
            if cond is not None:
                raise FewstepError("this diffusers model is unconditional; pass cond=None")
            return None
        if self.conditioning == "labels":
            if cond is None:
                if not self.has_null_class:
                    raise FewstepError("this model has no null class; pass class labels as cond")
                return torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
            cond = torch.as_tensor(cond, device=x.device)
            if cond.shape != (batch,) or cond.is_floating_point():
                raise FewstepError(
                    f"class labels must be an integer tensor of shape ({batch},), got {tuple(cond.shape)} "
                    f"{cond.dtype}; pass one label per sample"
                )
            return cond.long()
        if cond is None:
            if self.uncond is None:
                raise FewstepError(
                    "this text-conditioned model needs cond=TextConditioning(...), or load it with uncond= "
                    "to sample unconditionally"
                )
            cond = self.uncond
        if self.prompts is not None and isinstance(cond, Tensor) and not cond.is_floating_point():
            if cond.shape != (batch,) or int(cond.min()) < 0 or int(cond.max()) > self.num_classes:
                raise FewstepError(
                    f"prompt labels must be integers in [0, {self.num_classes}] of shape ({batch},), got "
                    f"{tuple(cond.shape)}; label k is prompt k, {self.num_classes} the empty prompt"
                )
            cond = self.label_conditioning(cond)
        cond = check_text_conditioning(cond, batch, self.cond_spec, type(self.model).__name__)
        return cond.to(device=x.device, dtype=self.dtype)

    # --- the network -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def network(self, x_t: Tensor, timestep: Tensor, cond: Any, timestep_cond: Tensor | None = None) -> Tensor:
        """The raw diffusers output at native input ``x_t`` and (continuous) ``timestep``.

        ``cond`` must already be checked (see :meth:`forward`). Learned-variance outputs
        (``2C`` channels) are cut to their first ``C`` channels, as diffusers' schedulers do.
        """
        dt = self.dtype
        x_in, t_in = x_t.to(dt), timestep.to(dt)
        kind = type(self.model).__name__
        if kind == "UNet2DModel":
            out = self.model(x_in, t_in, class_labels=cond).sample
        elif kind == "UNet2DConditionModel":
            added = None
            if cond.time_ids is not None:
                added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
            out = self.model(
                x_in,
                t_in,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=added,
                timestep_cond=timestep_cond,
            ).sample
        else:
            out = self.model(
                hidden_states=x_in,
                encoder_hidden_states=cond.encoder_hidden_states,
                pooled_projections=cond.pooled,
                timestep=t_in,
            ).sample
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def native_x0(self, x: Tensor, sigma: Tensor, cond: Any = None, timestep_cond: Tensor | None = None):
        """``(x0_hat, x_t, a, t)``: the network's own prediction turned into x0, with the native
        sample and timestep it saw (students reuse this to add their own parameterisation)."""
        sigma = as_sigma(sigma, x)
        cond = self._check_cond(cond, x.shape[0], x)
        a, s, t = self.formulation.native(sigma)
        x_t = x * append_dims(a, x.ndim)
        out = self.network(x_t, t, cond, timestep_cond)
        return x0_from_output(out, x_t, a, s, self.formulation.prediction), x_t, a, t

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return self.native_x0(x, sigma, cond)[0]

    # --- students (fewstep.students.copy_teacher / consistency_student call these) ----------------
    def trainable_copy(self, extra_dims: int = 0) -> DiffusersDenoiser:
        """A trainable copy of this network with the same formulation (an ODE student); with
        ``extra_dims = 1`` a UNet copy that embeds one extra scalar (guided distillation's ``w``) as
        LCM embeds its guidance scale."""
        from fewstep.teachers.diffusers.students import EmbeddedInputStudent, ode_student

        if extra_dims > 1 or (extra_dims and type(self.model).__name__ != "UNet2DConditionModel"):
            raise FewstepError(
                f"{type(self.model).__name__} cannot take {extra_dims} extra scalar input(s) (a UNet2DConditionModel "
                "takes one); methods that need more need a fewstep network"
            )
        return EmbeddedInputStudent(self) if extra_dims else ode_student(self)

    def consistency_student(self, extra_dims: int = 0) -> Denoiser:
        """An LCM-parameterised consistency student; ``extra_dims = 1`` embeds the guidance scale
        as LCM does (``time_cond_proj_dim = 256``)."""
        from fewstep.teachers.diffusers.students import LCMStudent

        if extra_dims > 1:
            raise FewstepError(f"an LCM student takes at most one extra input (w), got {extra_dims}")
        return LCMStudent(self, guidance_embed_dim=256 if extra_dims else 0)

    # --- guidance, sampling grids, the VAE -------------------------------------------------------
    def guided(self, scale: float | Tensor) -> Denoiser:
        """Classifier-free guidance (``fewstep.guidance.cfg`` calls this): text models use the
        unconditional embedding, class-conditional ones the null label."""
        if self.conditioning == "text" and self.prompts is None:
            return TextGuidance(self, scale)
        from fewstep.guidance import CFGDenoiser

        if not self.has_null_class:
            raise FewstepError("guidance needs a model with a null class (num_class_embeds = classes + 1)")
        return CFGDenoiser(self, scale)

    def scheduler_sigmas(self, steps: int, scheduler: Any = None, **set_timesteps_kwargs: Any) -> Tensor:
        """The noise levels a diffusers scheduler (default: this teacher's) visits in ``steps``
        steps, in sigma-space and ending in 0. A flow grid's ``t = 1`` becomes ``sigma_max``."""
        base = scheduler if scheduler is not None else self.scheduler
        sched = type(base).from_config(base.config)
        sched.set_timesteps(steps, **set_timesteps_kwargs)
        if self.formulation.kind == "flow":
            t = sched.sigmas.to(torch.float64)
            sig = flow_t_to_sigma(t.clamp(max=1 - 1e-12))
            return torch.where(t >= 1, torch.full_like(t, self.sigma_max), sig)
        if isinstance(getattr(sched, "sigmas", None), Tensor) and len(sched.sigmas) == steps + 1:
            return sched.sigmas.to(torch.float64)  # Euler-type schedulers keep sigma-space levels
        vp = vp_sigmas(self.formulation.alphas_cumprod)
        sig = vp[sched.timesteps.long()]
        last = 0.0 if sched.config.get("set_alpha_to_one", True) else float(vp[0])
        return torch.cat([sig, sig.new_tensor([last])])

    def start(self, noise: Tensor, sigma: float | Tensor) -> Tensor:
        """The sigma-space sample a diffusers loop starts from when its initial latents are
        ``noise``: ``noise / a(sigma)`` (``noise * sqrt(1 + sigma^2)`` for VP). fewstep's own
        samplers start from ``sigma * noise``, which differs by ``O(1/sigma)``."""
        sigma = as_sigma(sigma, noise)
        a, _, _ = self.formulation.native(sigma)
        return noise / append_dims(a, noise.ndim)

    def _codec(self) -> nn.Module:
        if self.vae is None:
            raise FewstepError("this teacher works in pixel space and has no VAE; encode/decode apply to latent models")
        return self.vae

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` -> latents in the denoiser's space (the posterior
        mean, or a sample of it when ``generator`` is given), scaled as the pipeline scales them."""
        vae = self._codec()
        dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(images.dtype)

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents -> images in [-1, 1] (as the pipeline's ``vae.decode`` step); ``grad`` lets gradients
        flow through the frozen decoder to ``latents`` (a pixel-space discriminator on a student's output)."""
        vae = self._codec()
        shift = vae.config.get("shift_factor") or 0.0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = latents / vae.config.scaling_factor + shift
            return vae.decode(z.to(next(vae.parameters()).dtype)).sample.to(latents.dtype)
