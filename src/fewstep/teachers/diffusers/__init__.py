"""Hugging Face diffusers models as fewstep teachers (and, in :mod:`.students`, as students).

    from fewstep.teachers.diffusers import load_diffusers
    teacher = load_diffusers("path/to/pipeline")      # or fewstep.teachers.load_teacher(path)
    x0_hat = teacher(x, sigma, cond)                    # the sigma-space denoiser contract

See :mod:`.adapter` for the formulations (VP epsilon / v / sample, flow matching) and networks
(``UNet2DModel``, ``UNet2DConditionModel``, ``SD3Transformer2DModel``) supported.
"""

from fewstep.teachers.diffusers.adapter import MODELS, DiffusersDenoiser, Formulation
from fewstep.teachers.diffusers.conditioning import TextConditioning, TextGuidance
from fewstep.teachers.diffusers.loading import is_diffusers_folder, load_diffusers, save_uncond

__all__ = [
    "MODELS",
    "DiffusersDenoiser",
    "Formulation",
    "TextConditioning",
    "TextGuidance",
    "is_diffusers_folder",
    "load_diffusers",
    "save_uncond",
]
