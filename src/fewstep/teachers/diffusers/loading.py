"""Load a diffusers teacher from a local folder (never from the Hub).

Two layouts are recognised:

- a **pipeline folder** with ``model_index.json`` and ``unet/`` or ``transformer/``,
  ``scheduler/`` and, for latent models, ``vae/`` (what ``DiffusionPipeline.save_pretrained``
  writes);
- a **model folder** whose ``config.json`` has a diffusers ``_class_name``; its scheduler config is
  ``scheduler_config.json`` beside it or ``../scheduler/scheduler_config.json``, its VAE ``../vae``.

Weights must be safetensors. A text-conditioned teacher's unconditional embedding (for guidance)
can be passed as ``uncond=`` or stored once as ``fewstep_uncond.safetensors`` in the pipeline
folder (:func:`save_uncond`). A pipeline folder with ``text_encoder/``, ``tokenizer/`` and
``fewstep_prompts.json`` (``{"prompts": [...], "num_classes": C}``, what ``fewstep teacher train
--arch sd`` writes) loads with a prompt table: integer label ``k`` means prompt ``k``, encoded once
by the pipeline's own text encoder, and shows class ``k % C`` — so ``fewstep distill``/``eval`` run
on it with labels like any class-conditional teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewstep.errors import FewstepError
from fewstep.io import load_tensors, read_json, save_tensors
from fewstep.teachers.diffusers.adapter import MODELS, DiffusersDenoiser
from fewstep.teachers.diffusers.conditioning import TextConditioning

LATENT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel")
UNCOND_FILE = "fewstep_uncond.safetensors"
PROMPTS_FILE = "fewstep_prompts.json"


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a diffusers pipeline (``model_index.json``) or model (``config.json``
    with ``_class_name``)."""
    path = Path(path)
    return (path / "model_index.json").is_file() or (
        (path / "config.json").is_file() and _class_name(path / "config.json") is not None
    )


def _require_safetensors(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {pickles[0]}, a pickle fewstep refuses to load)" if pickles else ""
        raise FewstepError(
            f"{folder} has no .safetensors weights{hint}; re-save the model in a trusted session with "
            "`model.save_pretrained(folder, safe_serialization=True)`"
        )


def _load_model(folder: Path, class_name: str, torch_dtype: torch.dtype | None) -> Any:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise FewstepError(f"{folder}: unknown diffusers class {class_name!r}; upgrade diffusers or fix config.json")
    _require_safetensors(folder)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, **kwargs)


def _load_scheduler(config: Path) -> Any:
    import diffusers

    cfg = read_json(config)
    name = cfg.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not name.endswith("Scheduler"):
        raise FewstepError(f"{config}: {name!r} is not a diffusers scheduler; fix its _class_name")
    return cls.from_config(cfg)


def _components(folder: Path) -> tuple[Path, str, Path | None, Path | None]:
    """``(model_dir, model_class, scheduler_config, vae_dir)`` of a pipeline or model folder."""
    index = folder / "model_index.json"
    if index.is_file():
        comps = read_json(index)
        key = next((k for k in ("unet", "transformer") if isinstance(comps.get(k), list) and comps[k][1]), None)
        if key is None:
            raise FewstepError(f"{index} names no unet or transformer component; it is not a denoising pipeline")
        model_dir, cls = folder / key, comps[key][1]
        sched = folder / "scheduler" / "scheduler_config.json"
        vae = folder / "vae" if isinstance(comps.get("vae"), list) and comps["vae"][1] else None
        return model_dir, cls, (sched if sched.is_file() else None), vae
    cls = _class_name(folder / "config.json")
    if cls is None:
        raise FewstepError(
            f"{folder} is not a diffusers folder (no model_index.json, no config.json with _class_name); "
            "pass the folder DiffusionPipeline.save_pretrained wrote"
        )
    sched = next(
        (
            p
            for p in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json")
            if p.is_file()
        ),
        None,
    )
    vae = folder.parent / "vae"
    return folder, cls, sched, (vae if (vae / "config.json").is_file() else None)


def load_diffusers(
    folder: str | Path,
    *,
    vae: bool = True,
    null_class: bool = True,
    uncond: TextConditioning | None = None,
    sigma_data: float | None = None,
    sigma_max: float | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusersDenoiser:
    """Load a diffusers teacher folder as a frozen :class:`DiffusersDenoiser`.

    ``vae=False`` declares a pixel-space ``UNet2DConditionModel``/transformer (no VAE needed);
    the other options are those of :class:`DiffusersDenoiser`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FewstepError(f"{folder} is not a folder; pass a diffusers pipeline or model folder")
    model_dir, cls, sched_cfg, vae_dir = _components(folder)
    if cls not in MODELS:
        raise FewstepError(f"{model_dir}: {cls} is not supported as a teacher; use one of {', '.join(MODELS)}")
    if sched_cfg is None:
        raise FewstepError(
            f"{folder}: no scheduler config (scheduler/scheduler_config.json) found; copy the scheduler folder of the "
            "pipeline this model was trained with next to it"
        )
    autoencoder = None
    if vae and cls in LATENT_MODELS:
        if vae_dir is None or not (vae_dir / "config.json").is_file():
            raise FewstepError(
                f"{folder}: {cls} is a latent model but no vae/ folder was found; copy the pipeline's vae/ next to "
                "it (or load with vae=False for a pixel-space model)"
            )
    if vae and vae_dir is not None and (vae_dir / "config.json").is_file():
        vae_cls = _class_name(vae_dir / "config.json")
        if vae_cls != "AutoencoderKL":
            raise FewstepError(f"{vae_dir}: VAE class {vae_cls} is not supported; fewstep uses AutoencoderKL")
        autoencoder = _load_model(vae_dir, vae_cls, torch_dtype).eval().requires_grad_(False)
    model = _load_model(model_dir, cls, torch_dtype)
    scheduler = _load_scheduler(sched_cfg)
    if uncond is None and (folder / UNCOND_FILE).is_file():
        t = load_tensors(folder / UNCOND_FILE)
        uncond = TextConditioning(t["encoder_hidden_states"], t.get("pooled"), t.get("time_ids"))
    prompts, classes = _prompt_table(folder, torch_dtype) if uncond is not None else (None, None)
    den = DiffusersDenoiser(
        model,
        scheduler,
        vae=autoencoder,
        null_class=null_class,
        uncond=uncond,
        sigma_data=sigma_data,
        sigma_max=sigma_max,
        prompts=prompts,
        prompt_classes=classes,
    )
    den.source = str(folder)
    return den.eval().requires_grad_(False)


def _prompt_table(folder: Path, torch_dtype) -> tuple[TextConditioning | None, list[int] | None]:
    """The encoded prompts of ``fewstep_prompts.json`` and the class each shows, or ``(None, None)``."""
    if not (folder / PROMPTS_FILE).is_file():
        return None, None
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise FewstepError(f"{folder} has {PROMPTS_FILE} but no text_encoder/ and tokenizer/ to encode them; copy them")
    from transformers import CLIPTextModel, CLIPTokenizer

    from fewstep.teachers.text2image import encode_prompts

    record = read_json(folder / PROMPTS_FILE)
    prompts, classes = record.get("prompts"), int(record.get("num_classes", 0))
    if not prompts or classes < 1:
        raise FewstepError(f"{folder / PROMPTS_FILE} needs a non-empty 'prompts' list and 'num_classes' >= 1")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).eval()
    hidden = encode_prompts(tokenizer, encoder, prompts)
    hidden = hidden.to(torch_dtype) if torch_dtype is not None else hidden
    return TextConditioning(hidden), [k % classes for k in range(len(prompts))]


def save_uncond(folder: str | Path, uncond: TextConditioning) -> Path:
    """Store a text teacher's unconditional embedding in its folder so ``load_teacher`` finds it."""
    tensors = {"encoder_hidden_states": uncond.encoder_hidden_states[:1]}
    if uncond.pooled is not None:
        tensors["pooled"] = uncond.pooled[:1]
    if uncond.time_ids is not None:
        tensors["time_ids"] = uncond.time_ids[:1]
    path = Path(folder) / UNCOND_FILE
    save_tensors(path, tensors)
    return path
