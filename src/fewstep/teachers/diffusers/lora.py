"""LoRA students over a diffusers teacher, with one copy of the weights in memory (LCM-LoRA,
Luo et al. 2023, arXiv 2311.05556; peft's LoRA, Hu et al. 2021, arXiv 2106.09685).

peft adds low-rank adapters ``W + (alpha / r) B A`` to the teacher's own network (``B = 0`` at
first, so the student starts as the teacher). The base weights are frozen; only ``A`` and ``B``
train. The teacher is the same network with its adapters switched off:

    teacher = LoRATeacher(load_teacher("sd-folder"), rank=64)   # or load_teacher("lora:64:sd-folder")
    student = teacher.consistency_student()     # an LCM student whose only parameters are the adapters
    # methods see two networks; memory holds one UNet plus the adapters

:class:`LoRATeacher` registers no parameters (the network belongs to the student), so the engine's
check that frozen and trainable networks share no parameters holds, and freezing the teacher
never touches the adapters. :class:`LoRAStudent` exposes, trains and saves only the adapters.
Deviation from diffusers' LCM-LoRA script: the adapters are switched off by peft's per-layer flag
(not ``disable_adapters()``, which also flips ``requires_grad`` of the adapters mid-step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.denoiser import Denoiser, copy_contract
from fewstep.errors import FewstepError
from fewstep.students import add_lora
from fewstep.students import tuner_layers as _tuner_layers
from fewstep.teachers.diffusers.adapter import DiffusersDenoiser

# the layers diffusers' LCM-LoRA script adapts (attention, feed-forward, resnet convs, time projections)
TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in",
    "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip


@contextmanager
def adapters_off(layers: list[nn.Module]) -> Iterator[None]:
    """Run the network as the base model (peft's per-layer switch; ``requires_grad`` untouched)."""
    old = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, old, strict=True):
            m._disable_adapters = flag


class LoRATeacher(Denoiser):
    """A diffusers teacher whose network carries LoRA adapters, evaluated with them switched off."""

    def __init__(self, base: DiffusersDenoiser, rank: int = 64, alpha: float | None = None,
                 targets: tuple[str, ...] = TARGETS) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(base, DiffusersDenoiser):
            raise FewstepError(f"LoRA students need a diffusers teacher, got {type(base).__name__}")
        self.lora_config = add_lora(base.model, rank, alpha, targets)
        object.__setattr__(self, "base", base)  # not a submodule: its network is the student's
        object.__setattr__(self, "_layers", _tuner_layers(base.model))
        for k in (
            "sigma_min",
            "sigma_max",
            "sigma_data",
            "sample_shape",
            "num_classes",
            "uncond",
            "vae",
            "prompts",
            "prompt_classes",
        ):
            object.__setattr__(self, k, getattr(base, k))
        self.source = getattr(base, "source", None)
        self.rank = rank

    @property
    def model(self) -> nn.Module:
        return self.base.model

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        with adapters_off(self._layers):
            return self.base(x, sigma, cond)

    def guided(self, scale: float | Tensor) -> Denoiser:
        from fewstep.guidance import CFGDenoiser
        from fewstep.teachers.diffusers.conditioning import TextGuidance

        if self.base.conditioning == "text" and self.base.prompts is None:
            return TextGuidance(self, scale)
        return CFGDenoiser(self, scale)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.base.encode(images, generator)

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        return self.base.decode(latents, grad)

    accepts_extra_inputs = False  # adapters cannot add a network input (LCM's w embedding)

    # the students share this teacher's network
    def consistency_student(self, extra_dims: int = 0) -> LoRAStudent:
        from fewstep.teachers.diffusers.students import LCMStudent

        if extra_dims:
            raise FewstepError(
                "a LoRA student cannot add LCM's guidance input (it changes the network); distil at a fixed "
                "guidance scale (LCM-LoRA's recipe) by leaving guidance off"
            )
        return LoRAStudent(LCMStudent(self.base, network=self.base.model))

    def trainable_copy(self, extra_dims: int = 0) -> LoRAStudent:
        from fewstep.teachers.diffusers.students import _rewrap

        if extra_dims:
            raise FewstepError("a LoRA student cannot take extra scalar inputs")
        return LoRAStudent(_rewrap(self.base, self.base.model))


def _is_lora(name: str) -> bool:
    return "lora_" in name


class LoRAStudent(nn.Module):
    """A student whose trainable state is its network's LoRA adapters only: ``parameters()``,
    ``requires_grad_``, ``state_dict`` and ``load_state_dict`` see the adapters; the frozen base
    weights (shared with the teacher) stay out of optimizers, EMAs and checkpoints."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        copy_contract(self, student)

    @property
    def model(self) -> nn.Module:
        return self.student.model

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.student(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if _is_lora(name):
                yield name, p

    def requires_grad_(self, requires_grad: bool = True) -> LoRAStudent:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in full if k.startswith(prefix) and not _is_lora(k[len(prefix) :])]:
            del full[key]
        return full

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        if strict and set(state_dict) != set(self.state_dict()):
            diff = sorted(set(state_dict) ^ set(self.state_dict()))
            raise FewstepError(f"LoRA weights do not match this student's adapters (first mismatch: {diff[0]})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def load_lora_teacher(spec: str) -> LoRATeacher:
    """``lora:<rank>:<folder>`` -> a :class:`LoRATeacher` over the diffusers teacher in ``folder``
    (or a shipped one: ``lora:64:builtin:mnist-sd``)."""
    from fewstep.teachers.diffusers.loading import load_diffusers

    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise FewstepError(f"LoRA teacher spec {spec!r} must read lora:<rank>:<folder>, e.g. lora:64:models/sd")
    folder = parts[2]
    if folder.startswith("builtin:"):
        from fewstep.teachers import builtin_path

        folder = builtin_path(folder.split(":", 1)[1])
    return LoRATeacher(load_diffusers(folder), rank=int(parts[1]))
