"""Text conditioning passed as tensors, and classifier-free guidance over it.

fewstep never runs a text encoder: a latent teacher's prompts arrive already encoded, as the
tensors its diffusers network takes. :class:`TextConditioning` holds them per sample; the
unconditional embedding (the encoding of the empty prompt) is given once and drives guidance.

| network                          | ``encoder_hidden_states`` | ``pooled``                 | ``time_ids``  |
|----------------------------------|---------------------------|----------------------------|---------------|
| UNet2DConditionModel (SD 1.x/2.x) | (B, L, cross_attention_dim) | —                        | —             |
| UNet2DConditionModel (SDXL)       | (B, L, cross_attention_dim) | ``text_embeds`` (B, P)   | (B, 6)        |
| SD3Transformer2DModel             | (B, L, joint_attention_dim) | ``pooled_projections`` (B, P) | —        |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import Denoiser, append_dims, as_sigma, copy_contract
from fewstep.errors import FewstepError


@dataclass
class TextConditioning:
    """Encoded prompts of a batch. A batch of one broadcasts against any batch size."""

    encoder_hidden_states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def _map(self, fn) -> TextConditioning:
        return TextConditioning(*(None if t is None else fn(t) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.encoder_hidden_states, self.pooled, self.time_ids

    def expand(self, n: int) -> TextConditioning:
        """This conditioning for a batch of ``n`` (it must hold 1 or ``n`` samples)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise FewstepError(f"conditioning holds {len(self)} prompts for a batch of {n}; pass 1 or {n} of them")
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def __getitem__(self, index: Any) -> TextConditioning:
        return self._map(lambda t: t[index])

    def to(self, *args: Any, **kwargs: Any) -> TextConditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch (every part must carry the same fields)."""
        fields = list(zip(*(p.tensors() for p in parts), strict=True))
        out = []
        for values in fields:
            if all(v is None for v in values):
                out.append(None)
            elif any(v is None for v in values):
                raise FewstepError(
                    "cannot batch conditionings with and without pooled/time_ids; give every prompt both"
                )
            else:
                out.append(torch.cat(values))
        return TextConditioning(*out)


def _shape(t: Tensor | None) -> str:
    return "missing" if t is None else str(tuple(t.shape))


def check_text_conditioning(cond: Any, batch: int, spec: dict[str, int | None], what: str) -> TextConditioning:
    """Validate ``cond`` against the network's expected sizes and broadcast it to ``batch``.

    ``spec`` gives ``hidden`` (last dim of encoder_hidden_states), ``pooled`` and ``time_ids``
    sizes (``None``: the network takes no such input).
    """
    if isinstance(cond, dict):
        cond = TextConditioning(**cond)
    if not isinstance(cond, TextConditioning):
        raise FewstepError(
            f"{what} takes text conditioning as fewstep.teachers.diffusers.TextConditioning(encoder_hidden_states, "
            f"pooled, time_ids), got {type(cond).__name__}; encode the prompts with the pipeline's text encoder"
        )
    h = cond.encoder_hidden_states
    if h.ndim != 3 or h.shape[-1] != spec["hidden"]:
        raise FewstepError(
            f"encoder_hidden_states has shape {_shape(h)} but {what} expects (batch, tokens, {spec['hidden']}); "
            "encode the prompts with this model's own text encoder"
        )
    for name in ("pooled", "time_ids"):
        t, size = getattr(cond, name), spec.get(name)
        if size is None:
            if t is not None:
                raise FewstepError(f"{what} takes no {name} conditioning; drop it (it is for SDXL/SD3 models)")
            continue
        if t is None or t.ndim != 2 or t.shape[-1] != size:
            raise FewstepError(f"{name} conditioning is {_shape(t)} but {what} expects (batch, {size}); pass it")
        if t.shape[0] != h.shape[0]:
            raise FewstepError(f"{name} holds {t.shape[0]} rows but encoder_hidden_states {h.shape[0]}; match them")
    return cond.expand(batch)


class TextGuidance(Denoiser):
    """``D_w = D_u + w (D_c - D_u)`` for a text-conditioned diffusers teacher, where ``D_u`` sees the
    teacher's unconditional embedding (Ho & Salimans 2022, arXiv 2207.12598; fewstep's convention,
    ``w = 1`` conditional). ``scale`` is a float or a per-sample ``(B,)`` tensor."""

    def __init__(self, inner: Denoiser, scale: float | Tensor) -> None:
        super().__init__()
        if getattr(inner, "uncond", None) is None:
            raise FewstepError(
                "guidance needs the unconditional embedding: load the teacher with "
                "uncond=TextConditioning(<the text encoder's output for the empty prompt>)"
            )
        self.inner, self.scale = inner, scale
        copy_contract(self, inner)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None, scale: float | Tensor | None = None) -> Tensor:
        w = self.scale if scale is None else scale
        if isinstance(w, (int, float)) and w == 1.0:
            return self.inner(x, sigma, cond)
        if cond is None:
            raise FewstepError("guidance needs the prompts' conditioning; pass cond=TextConditioning(...)")
        n = x.shape[0]
        cond = TextConditioning(**cond) if isinstance(cond, dict) else cond
        dt = cond.encoder_hidden_states.dtype
        uncond = self.inner.uncond.expand(n).to(device=x.device, dtype=dt)
        both = TextConditioning.cat([cond.expand(n).to(device=x.device), uncond])
        s = as_sigma(sigma, x)
        d_c, d_u = self.inner(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
        w = torch.as_tensor(w, dtype=x.dtype, device=x.device)
        return d_u + (append_dims(w, x.ndim) if w.ndim else w) * (d_c - d_u)
