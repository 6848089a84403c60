"""Export a student as a diffusers pipeline folder that stock ``DiffusionPipeline.from_pretrained``
loads and samples with a stock scheduler — no fewstep import needed.

| student                        | network               | pipeline                     | scheduler            |
|--------------------------------|-----------------------|------------------------------|----------------------|
| :class:`LCMStudent` (CD / LCM) | UNet2DModel           | ConsistencyModelPipeline     | LCMScheduler         |
| :class:`LCMStudent`            | UNet2DConditionModel  | StableDiffusion(XL)Pipeline  | LCMScheduler         |
| ODE student (``ode_student``)  | UNet2DModel           | ConsistencyModelPipeline     | Euler, trailing      |
| ODE student                    | UNet2DConditionModel  | StableDiffusion(XL)Pipeline  | Euler, trailing      |
| ODE student                    | SD3Transformer2DModel | StableDiffusion3Pipeline     | FlowMatchEuler       |

``ConsistencyModelPipeline`` is diffusers' one stock pixel-space pipeline that passes class labels;
its loop (``scale_model_input``, ``unet``, ``scheduler.step``) runs any scheduler.

fewstep's own students (EDM-preconditioned :class:`~fewstep.networks.UNet`) are refused, for two
reasons that no weight mapping removes: (1) EDM preconditioning feeds the network
``c_in(sigma) x`` and ``c_noise = ln(sigma)/4`` and mixes its output with ``c_skip(sigma) x`` —
stock schedulers pass ``x_t`` and a DDPM timestep (LCM), or ``250 ln sigma`` (CM), or
``ln(sigma)/4`` to sinusoids whose lowest frequency is 1 where fewstep's embedding uses 16; (2)
fewstep's residual blocks apply the conditioning embedding without diffusers' SiLU before the
per-block projection. Distil a diffusers teacher to get an exportable student.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.export.card import model_card
from fewstep.io import atomic_write_json, read_json
from fewstep.teachers.diffusers.adapter import DiffusersDenoiser
from fewstep.teachers.diffusers.students import EmbeddedInputStudent, LCMStudent

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def _network_of(student: Any) -> tuple[str, nn.Module, DiffusersDenoiser]:
    """``(kind, network, adapter)`` of an exportable student; a clear error otherwise."""
    from fewstep.teachers.diffusers.lora import LoRAStudent

    if isinstance(student, LoRAStudent):
        return _network_of(student.student)
    if isinstance(student, LCMStudent):
        return "lcm", student.model, student.inner
    if isinstance(student, DiffusersDenoiser):
        return "ode", student.model, student
    if isinstance(student, EmbeddedInputStudent):
        raise FewstepError(
            "a guided-distillation student (w as an input) samples with fewstep's DDIM on its own grid for each "
            "step count; no stock diffusers scheduler reproduces that grid, so it is not exported — sample it "
            "with `fewstep sample`"
        )
    raise FewstepError(
        f"a {type(student).__name__} student cannot be exported as a stock diffusers pipeline: fewstep's own "
        "EDM-preconditioned networks have no diffusers scheduler that reproduces them (see fewstep.export.diffusers); "
        "distil a diffusers teacher (fewstep.teachers.diffusers) to get an exportable student"
    )


def _merged(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with any peft LoRA adapters merged into its weights."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
        model.peft_config = {}
    return model.requires_grad_(False)


def scheduler_for(kind: str, adapter: DiffusersDenoiser) -> Any:
    """The stock scheduler that reproduces a student's sampler: ``LCMScheduler`` for consistency
    students; Euler (``timestep_spacing="trailing"``, so it starts at the last training timestep)
    for ODE students, or the flow-matching Euler for flow models."""
    import inspect

    import diffusers

    if adapter.formulation.kind == "flow":
        if kind == "lcm":
            raise FewstepError("LCM students need a VP teacher; flow students export with the flow-matching Euler")
        cls, overrides = diffusers.FlowMatchEulerDiscreteScheduler, {}
    else:
        cls = diffusers.LCMScheduler if kind == "lcm" else diffusers.EulerDiscreteScheduler
        overrides = {"clip_sample": False, "thresholding": False, "prediction_type": adapter.formulation.prediction}
        if kind != "lcm":
            overrides.update(timestep_spacing="trailing", final_sigmas_type="zero", use_karras_sigmas=False)
    # every value explicit: diffusers would replace the ones marked "_use_default_values" by the
    # new class's defaults (LCMScheduler's betas differ from DDPMScheduler's)
    accepted = set(inspect.signature(cls.__init__).parameters)
    cfg = {k: v for k, v in {**dict(adapter.scheduler.config), **overrides}.items() if k in accepted}
    return cls.from_config(cfg)


def sampler_sigmas(student: Any, steps: int) -> Tensor:
    """The sigma-space grid the exported pipeline's scheduler visits in ``steps`` steps."""
    kind, _, adapter = _network_of(student)
    return adapter.scheduler_sigmas(steps, scheduler_for(kind, adapter))


def _pipeline(kind: str, model: nn.Module, adapter: DiffusersDenoiser, scheduler: Any, vae: nn.Module | None):
    import diffusers

    net = type(model).__name__
    if net == "UNet2DModel":
        if vae is not None:
            raise FewstepError("latent UNet2DModel students have no stock pipeline with class labels; not exportable")
        return diffusers.ConsistencyModelPipeline(unet=model, scheduler=scheduler)
    if vae is None:
        raise FewstepError(f"a {net} student exports with its teacher's VAE; pass the teacher (with vae) to export")
    if net == "UNet2DConditionModel":
        if dict(model.config).get("addition_embed_type") == "text_time":
            return diffusers.StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=None,
                text_encoder_2=None,
                tokenizer=None,
                tokenizer_2=None,
                unet=model,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
            )
        return diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return diffusers.StableDiffusion3Pipeline(
        transformer=model,
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _declare_missing_components(pipe: Any, folder: Path) -> None:
    """List absent components (no text encoder, no safety checker) as ``[null, null]`` so that
    ``from_pretrained`` loads them as ``None`` instead of asking for them."""
    expected, _ = type(pipe)._get_signature_keys(pipe)
    index = read_json(folder / "model_index.json")
    missing = [name for name in expected if name not in index]
    if missing:
        index.update({name: [None, None] for name in missing})
        atomic_write_json(folder / "model_index.json", index)


def _copy_text_components(teacher_folder: Path | None, out: Path) -> list[str]:
    """Copy the teacher pipeline's text encoders/tokenizers (fewstep never changes them)."""
    if teacher_folder is None or not (teacher_folder / "model_index.json").is_file():
        return []
    src_index, index = read_json(teacher_folder / "model_index.json"), read_json(out / "model_index.json")
    copied = []
    for name in TEXT_COMPONENTS:
        entry = src_index.get(name)
        if name in index and isinstance(entry, list) and entry[1] and (teacher_folder / name).is_dir():
            shutil.copytree(teacher_folder / name, out / name)
            index[name] = entry
            copied.append(name)
    if copied:
        atomic_write_json(out / "model_index.json", index)
    return copied


def export_diffusers(
    student: Any,
    out: str | Path,
    *,
    teacher: DiffusersDenoiser | None = None,
    steps: int = 4,
    guidance: float | None = None,
    info: dict | None = None,
) -> Path:
    """Write ``student`` as a diffusers pipeline folder ``out`` (which must not exist yet).

    Args:
        student: an :class:`LCMStudent` or an ODE student (:func:`ode_student`) — LoRA adapters
            on it are merged; use :func:`fewstep.export.lora.export_lora` to ship them separately.
        teacher: the diffusers teacher: its VAE, text encoders and folder (``teacher.source``).
        steps: the number of sampling steps the student was distilled for (model card).
        guidance: the guidance scale to sample at (w-embedded students) or that was baked in.
        info: free-form facts for the model card (``teacher``, ``method``, ...).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FewstepError(f"{out} already exists and is not empty; choose a new --out or delete it")
    kind, model, adapter = _network_of(student)
    vae = getattr(teacher, "vae", None) if teacher is not None else None
    scheduler = scheduler_for(kind, adapter)
    pipe = _pipeline(kind, _merged(model), adapter, scheduler, vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _declare_missing_components(pipe, tmp)
        source = getattr(teacher, "source", None)
        copied = _copy_text_components(Path(source) if source else None, tmp)
        facts = {
            "format": "fewstep-diffusers-export",
            "pipeline": type(pipe).__name__,
            "network": type(model).__name__,
            "scheduler": type(scheduler).__name__,
            "student": kind,
            "steps": steps,
            "guidance": guidance,
            "guidance_embedded": bool(getattr(student, "guidance_embed_dim", 0)),
            "num_classes": adapter.num_classes,
            "null_class": adapter.num_classes if adapter.has_null_class else None,
            "text_components": copied,
            "text_slots": [c for c in TEXT_COMPONENTS if c in type(pipe)._get_signature_keys(pipe)[0]],
            **(info or {}),
        }
        atomic_write_json(tmp / "fewstep_export.json", facts)
        (tmp / "README.md").write_text(model_card(facts))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export(folder: str | Path) -> dict:
    """The facts fewstep wrote beside an exported pipeline."""
    return json.loads((Path(folder) / "fewstep_export.json").read_text())
