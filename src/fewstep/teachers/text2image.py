"""The parts of a small Stable-Diffusion-shaped pipeline, built from configs (nothing downloaded).

A latent text-to-image teacher is the stock diffusers ``StableDiffusionPipeline``:

- ``vae``: ``AutoencoderKL``, three levels (4x down: 32x32 images -> 4x8x8 latents; SD's four are 8x), its
  ``scaling_factor`` set from the data (1 / the latents' standard deviation, as SD's 0.18215);
- ``text_encoder`` + ``tokenizer``: a small transformers ``CLIPTextModel`` (2 layers, width 64)
  and a ``CLIPTokenizer`` whose byte-level BPE vocabulary fewstep writes itself
  (:func:`write_tokenizer`): the 256 byte symbols with and without the end-of-word mark, and
  merges that spell every word of the captions whole — any other text still tokenises (into
  smaller pieces). The trainer pre-trains the encoder CLIP-style on the captions, then freezes it, as SD
  keeps its pre-trained CLIP frozen (:func:`fewstep.train.latent_teacher._pretrain_text`);
- ``unet``: ``UNet2DConditionModel`` with cross-attention on the text (4x8x8 latents);
- ``scheduler``: SD's ``scaled_linear`` DDPM betas (0.00085 -> 0.012, 1000 steps, epsilon
  prediction) in a ``DPMSolverMultistepScheduler`` (DPM-Solver++, what SD users run).

:func:`build_components` makes fresh parts from :data:`SIZES` presets; the trainer is
:mod:`fewstep.train.latent_teacher`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from fewstep.errors import FewstepError

DOWN = 4  # the VAE's downsampling: three levels, two halvings
MAX_TOKENS = 16  # prompts are short; the pipeline pads every prompt to this many tokens
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# sizes measured on the 2-core CPU: unet 3.9 M parameters, 0.44 s per step at batch 128 (8x8 latents)
SIZES: dict[str, dict[str, Any]] = {
    "vae": {
        "block_out_channels": [32, 32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16,
    },
    "unet": {
        "block_out_channels": [64, 128], "layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": 8,
        "norm_num_groups": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}  # fmt: skip


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each of the 256 bytes."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tokenizer(words: list[str], folder: str | Path):
    """A ``CLIPTokenizer`` saved in ``folder`` whose merges spell each of ``words`` whole.

    Returns the tokenizer (loaded back from the folder, so what is returned is what is shipped)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in words}):
        enc = [symbols[b] for b in word.encode()]
        parts = enc[:-1] + [enc[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=MAX_TOKENS)
        tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_components(
    resolution: int, channels: int, words: list[str], folder: str | Path, seed: int = 0, sizes: dict | None = None
) -> dict:
    """Fresh ``vae``, ``text_encoder``, ``tokenizer`` (written to ``folder/tokenizer``), ``unet`` and
    ``scheduler`` for images of ``resolution`` x ``resolution`` x ``channels``; ``sizes`` updates
    :data:`SIZES` per part (tests build tiny pipelines this way)."""
    size = {k: {**v, **(sizes or {}).get(k, {})} for k, v in SIZES.items()}
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if resolution % DOWN:
        raise FewstepError(f"a latent teacher needs a resolution divisible by {DOWN} (the VAE's), got {resolution}")
    tokenizer = write_tokenizer(words, Path(folder) / "tokenizer")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, sample_size=resolution,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, **size["vae"],
    )  # fmt: skip
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size["text"],
    )  # fmt: skip
    text_encoder = CLIPTextModel(text_cfg).eval().requires_grad_(False)
    unet = UNet2DConditionModel(sample_size=resolution // DOWN, in_channels=4, out_channels=4, **size["unet"])
    scheduler = DPMSolverMultistepScheduler(
        **BETAS, prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, steps_offset=1
    )
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids as ``StableDiffusionPipeline.encode_prompt`` makes them (padded to the max length)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """``(len(prompts), MAX_TOKENS, width)``: the text encoder's last hidden state, as
    ``StableDiffusionPipeline.encode_prompt`` computes it (padded to the tokenizer's max length)."""
    return text_encoder(prompt_ids(tokenizer, prompts).to(text_encoder.device))[0]
