"""The README model card written beside an exported pipeline: teacher, method, steps and the
scheduler settings that reproduce fewstep's sampler."""

from __future__ import annotations


def _usage(f: dict) -> str:
    steps = f.get("steps", 4)
    if f.get("lora"):
        sched = f["scheduler"]
        return (
            f"import torch\nfrom diffusers import DiffusionPipeline, {sched}\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{f.get("teacher", "BASE-MODEL")}")  # the teacher\n'
            f'pipe.scheduler = {sched}.from_pretrained("PATH", subfolder="scheduler")\n'
            'pipe.load_lora_weights("PATH")\n'
            f'image = pipe(prompt="...", num_inference_steps={steps}, guidance_scale=1.0).images[0]\n'
        )
    missing = [c for c in f.get("text_slots", []) if c not in f.get("text_components", [])]
    extra = "".join(f", {c}=None" for c in missing)  # diffusers asks to be told a component is absent
    head = "import torch\nfrom diffusers import DiffusionPipeline\n\n"
    head += f'pipe = DiffusionPipeline.from_pretrained("PATH"{extra})\n'
    if f["pipeline"] == "ConsistencyModelPipeline":
        labels = ""
        if f.get("num_classes"):
            labels = "class_labels=[3] * 16, "
        return (
            head + "generators = [torch.Generator().manual_seed(i) for i in range(16)]  # one per image, as fewstep\n"
            f"images = pipe(batch_size=16, {labels}num_inference_steps={steps}, generator=generators).images\n"
        )
    text = 'prompt="..."' if f.get("text_components") else "prompt_embeds=prompt_embeds  # your text encoder's output"
    if f["pipeline"] == "StableDiffusionXLPipeline" and not f.get("text_components"):
        text += ", pooled_prompt_embeds=pooled"
    if f["pipeline"] == "StableDiffusion3Pipeline" and not f.get("text_components"):
        text += ", pooled_prompt_embeds=pooled"
    return (
        head + f"image = pipe({text}, num_inference_steps={steps}, guidance_scale={_pipeline_guidance(f)}).images[0]\n"
    )


def _pipeline_guidance(f: dict) -> float:
    """What to pass as the pipeline's ``guidance_scale``: the embedded w, else 1 (no extra CFG —
    guidance, if any, is baked into the student)."""
    if f.get("guidance_embedded"):
        return f.get("guidance") or 1.0
    return 1.0


def _settings(f: dict) -> list[str]:
    s = [f"- scheduler: `{f['scheduler']}` (stored in `scheduler/`), `num_inference_steps={f.get('steps', 4)}`"]
    if f["scheduler"] == "LCMScheduler":
        s.append("- multistep consistency sampling: `original_inference_steps=50` (the default); 1-4 steps")
    elif f["scheduler"] == "DDIMScheduler":
        s.append('- deterministic DDIM with `timestep_spacing="trailing"` (starts at the last training timestep)')
    if f.get("guidance_embedded"):
        s.append(
            f"- guidance is an input of the network (`time_cond_proj_dim`): `guidance_scale={f.get('guidance')}`"
            " selects it; no second (unconditional) pass is made"
        )
    elif f.get("guidance") not in (None, 1.0):
        s.append(f"- classifier-free guidance w={f['guidance']} is baked into the student: keep `guidance_scale=1`")
    if f.get("num_classes"):
        s.append(
            f"- class labels 0..{f['num_classes'] - 1}"
            + (
                f"; label {f['null_class']} is the null (unconditional) class"
                if f.get("null_class") is not None
                else ""
            )
        )
    return s


def model_card(f: dict) -> str:
    """Markdown model card from the export facts ``f``."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(f.items()) if k not in ("format",))
    return f"""---
library_name: diffusers
tags: [fewstep, distillation, few-step]
---

# A {f.get("steps", 4)}-step {"LoRA " if f.get("lora") else ""}student distilled with fewstep

- teacher: {f.get("teacher", "unknown")}
- method: {f.get("method", "unknown")}
- network: `{f["network"]}`, pipeline: `{f["pipeline"]}`

## Recommended sampling settings

{chr(10).join(_settings(f))}

## Usage (stock diffusers, no fewstep needed)

```python
{_usage(f)}```

## Export facts

| key | value |
|---|---|
{rows}
"""
