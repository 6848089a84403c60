"""Export students for other tools: stock diffusers pipelines (:mod:`.diffusers`) and LoRA
weights (:mod:`.lora`)."""

from fewstep.export.diffusers import export_diffusers, read_export

__all__ = ["export_diffusers", "read_export"]
