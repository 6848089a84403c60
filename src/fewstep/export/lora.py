"""Export a LoRA student as LoRA weights that diffusers' ``load_lora_weights`` accepts (the
LCM-LoRA distribution format): ``pytorch_lora_weights.safetensors`` (written by the pipeline's own
``save_lora_weights``, with the adapter config as metadata), the scheduler to sample it with in
``scheduler/``, and a model card.

    pipe = DiffusionPipeline.from_pretrained("the-teacher")              # the base model
    pipe.scheduler = LCMScheduler.from_pretrained("EXPORT", subfolder="scheduler")
    pipe.load_lora_weights("EXPORT")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

diffusers loads LoRA into Stable Diffusion (``UNet2DConditionModel``), SDXL and SD3 pipelines; a
``UNet2DModel`` LoRA has no diffusers loader, so it exports merged (``--format diffusers``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fewstep.errors import FewstepError
from fewstep.export.card import model_card
from fewstep.io import atomic_write_json


def _pipeline_class(model: Any) -> Any:
    import diffusers

    kind = type(model).__name__
    if kind == "UNet2DConditionModel":
        sdxl = dict(model.config).get("addition_embed_type") == "text_time"
        return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    if kind == "SD3Transformer2DModel":
        return diffusers.StableDiffusion3Pipeline
    raise FewstepError(
        f"diffusers has no LoRA loader for {kind}; export the merged student with --format diffusers instead"
    )


def lora_state_dict(model: Any) -> dict:
    """The adapters of ``model`` in peft's key format (``...to_q.lora_A.weight``), which
    ``load_lora_weights`` reads as it is (diffusers' LCM-LoRA script saves the same; the older
    ``convert_state_dict_to_diffusers`` names lose the attention layers on loading)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def export_lora(
    student: Any, out: str | Path, *, teacher: Any = None, steps: int = 4, info: dict | None = None
) -> Path:
    """Write the adapters of a :class:`~fewstep.teachers.diffusers.lora.LoRAStudent` to ``out``."""
    from fewstep.export.diffusers import _network_of, scheduler_for
    from fewstep.teachers.diffusers.lora import LoRAStudent

    if not isinstance(student, LoRAStudent):
        raise FewstepError(
            f"a {type(student).__name__} student has no LoRA adapters; export it with --format diffusers "
            "(train a LoRA student with the teacher spec lora:<rank>:<folder>)"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FewstepError(f"{out} already exists and is not empty; choose a new --out or delete it")
    kind, model, adapter = _network_of(student)
    pipeline = _pipeline_class(model)
    layers = lora_state_dict(model)
    config = model.peft_config["default"] if hasattr(model, "peft_config") else None
    metadata = config.to_dict() if config is not None else None
    key = "transformer" if pipeline.__name__ == "StableDiffusion3Pipeline" else "unet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipeline.save_lora_weights(
            str(tmp), **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )  # fmt: skip
        scheduler = scheduler_for(kind, adapter)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        facts = {
            "format": "fewstep-lora-export",
            "pipeline": pipeline.__name__,
            "network": type(model).__name__,
            "scheduler": type(scheduler).__name__,
            "student": f"{kind} (LoRA rank {config.r if config is not None else '?'})",
            "steps": steps,
            "lora": True,
            "num_classes": adapter.num_classes,
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
