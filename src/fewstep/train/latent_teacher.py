"""Train a Stable-Diffusion-shaped latent text-to-image teacher: ``fewstep teacher train --arch sd``.

Two stages, each a plain loop with a progress bar (loss, rate, ETA), then one stock diffusers
``StableDiffusionPipeline`` folder written atomically (a temporary folder renamed into place):

1. **VAE** (``AutoencoderKL``, :mod:`fewstep.teachers.text2image`): mean-squared reconstruction of
   a posterior sample plus ``kl_weight`` x KL (1e-6, the weight of SD's first-stage KL
   autoencoders; their LPIPS and patch-GAN terms are left out — no perceptual network offline and
   digits reconstruct within a few minutes without them). Then ``scaling_factor`` = 1 / the standard
   deviation of the training latents (SD's 0.18215 came from the same rule).
2. **UNet** (``UNet2DConditionModel``), diffusers' ``train_text_to_image.py`` recipe: latents =
   posterior sample x scaling factor, uniform timesteps of the ``scaled_linear`` DDPM schedule,
   epsilon prediction, MSE; the frozen text encoder on the captions with ``empty_prompts`` (10 %)
   of them replaced by the empty prompt (what guidance needs); AdamW (1e-2 weight decay), a linear
   warm-up, gradient clipping at 1, and diffusers' ``EMAModel`` (decay warm-up, power 2/3) whose
   weights are what is saved. Deviation: lr 5e-4 (the script fine-tunes SD at 1e-4; this UNet
   starts from scratch).

Captions: MNIST digits get templates naming the digit (:mod:`fewstep.data.mnist`); a folder's class
sub-folders get templates with the class name. The folder also holds ``fewstep_uncond.safetensors``
(the empty prompt's embedding, for fewstep's guidance) and ``fewstep_prompts.json`` (the
evaluation prompts: what ``--teacher FOLDER`` labels stand for, see
:mod:`fewstep.teachers.diffusers.prompts`).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError


@dataclass
class LatentTeacherOptions:
    minutes: float | None = 45.0
    steps: int | None = None
    vae_share: float = 0.15  # of the budget (minutes or steps) spent on the VAE
    batch: int = 128
    vae_batch: int = 64
    lr: float = 5e-4
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    empty_prompts: float = 0.1
    warmup_steps: int = 200
    ema_power: float = 2 / 3
    seed: int = 0
    sizes: dict | None = None  # per part, over fewstep.teachers.text2image.SIZES
    init: str | None = (
        None  # a pipeline folder this trainer wrote: keep its VAE and text encoder, train its UNet further
    )


def _budget(o: LatentTeacherOptions, share: float) -> tuple[float | None, int | None]:
    minutes = None if o.minutes is None else o.minutes * share
    steps = None if o.steps is None else max(1, round(o.steps * share))
    return minutes, steps


def _loop(name: str, minutes: float | None, steps: int | None, step_fn) -> int:
    """Call ``step_fn(i) -> loss`` until the budget ends; a bar shows loss, rate and ETA."""
    from tqdm.auto import tqdm

    total = steps if steps is not None else None
    start, i, shown = time.monotonic(), 0, math.nan
    with tqdm(total=total, desc=name, unit="it", dynamic_ncols=True, mininterval=5) as bar:
        while True:
            elapsed = time.monotonic() - start
            if (steps is not None and i >= steps) or (minutes is not None and elapsed >= 60 * minutes):
                break
            loss = step_fn(i)
            i += 1
            shown = loss if math.isnan(shown) else 0.98 * shown + 0.02 * loss
            bar.update(1)
            if minutes is not None:
                bar.set_postfix(
                    loss=f"{shown:.4f}", left=f"{max(0.0, 60 * minutes - elapsed) / 60:.1f} min", refresh=False
                )
            else:
                bar.set_postfix(loss=f"{shown:.4f}", refresh=False)
    return i


def train_latent_teacher(data, out: str | Path, options: LatentTeacherOptions | None = None, overwrite: bool = False):
    """Train VAE then UNet on ``data`` (a :class:`fewstep.data.Dataset` of images in [-1, 1] with
    labels) and save a ``StableDiffusionPipeline`` folder at ``out``. Returns the pipeline."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    from fewstep.data.mnist import (
        EVAL_TEMPLATES,
        FOLDER_EVAL_TEMPLATES,
        FOLDER_TEMPLATES,
        NAMES,
        TRAIN_TEMPLATES,
        eval_prompts,
        train_captions,
    )
    from fewstep.io import atomic_write_json
    from fewstep.teachers.diffusers.conditioning import TextConditioning
    from fewstep.teachers.diffusers.loading import save_uncond
    from fewstep.teachers.text2image import BETAS, build_components, encode_prompts

    o = options or LatentTeacherOptions()
    if o.minutes is None and o.steps is None:
        raise FewstepError("give a budget: --minutes M and/or --steps N")
    if not 0 < o.vae_share < 1 or not 0 <= o.empty_prompts < 1:
        raise FewstepError(
            f"vae_share must be in (0, 1) and empty_prompts in [0, 1), got {o.vae_share}, {o.empty_prompts}"
        )
    if data.labels is None or data.x.dim() != 4:
        raise FewstepError(
            f"a text-to-image teacher needs images with classes (captions come from them); {data.name} has "
            "none: put the images in class sub-folders"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise FewstepError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    names = None if data.spec is not None and data.spec.kind == "mnist" else tuple(_class_names(data))
    templates = (FOLDER_TEMPLATES + FOLDER_EVAL_TEMPLATES) if names else (TRAIN_TEMPLATES + EVAL_TEMPLATES)
    words = " ".join(t.format(d=c, name=(names or NAMES)[c]) for t in templates for c in range(data.num_classes))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = build_components(data.x.shape[-1], data.x.shape[1], words.split(), tmp, o.seed, o.sizes)
    before = {}
    if o.init is not None:
        parts, before = _continue(Path(o.init), tmp, parts["scheduler"])
    vae, unet, text_encoder, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    gen = torch.Generator().manual_seed(o.seed + len(before))
    x_all, y_all = data.x, data.labels
    n = len(x_all)

    # --- stage 1: the VAE -------------------------------------------------------------------------
    opt = torch.optim.AdamW(vae.parameters(), lr=o.vae_lr, weight_decay=0.0)
    vae.train()

    def vae_step(_: int) -> float:
        x = x_all[torch.randint(n, (o.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + o.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    share = 0.0 if o.init is not None else o.vae_share
    vae_steps = _loop("vae", *_budget(o, share), vae_step) if share else 0
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        stats = [vae.encode(x_all[i : i + 256]).latent_dist for i in range(0, n, 256)]
        mean = torch.cat([s.mean for s in stats])
        std = torch.cat([s.std for s in stats])
        recon = torch.cat([vae.decode(m[None]).sample for m in mean[:256]])
        rec_mse = F.mse_loss(recon, x_all[:256]).item()
    scaling = 1.0 / torch.cat([mean + std * torch.randn(mean.shape, generator=gen)]).std().item()
    if o.init is not None:
        scaling = vae.config.scaling_factor  # the UNet learned latents at this scale
    vae.register_to_config(scaling_factor=scaling)

    # --- stage 2: the UNet ------------------------------------------------------------------------
    noise_sched = DDPMScheduler(**BETAS, prediction_type="epsilon")
    abar = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=o.lr, weight_decay=1e-2)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / o.warmup_steps))
    ema = EMAModel(unet.parameters(), use_ema_warmup=True, inv_gamma=1.0, power=o.ema_power)
    empty = encode_prompts(tokenizer, text_encoder, [""])[0]
    unet.train()

    def unet_step(_: int) -> float:
        idx = torch.randint(n, (o.batch,), generator=gen)
        y = y_all[idx]
        captions = train_captions(y, gen, names)
        cond = encode_prompts(tokenizer, text_encoder, captions)
        drop = torch.rand(o.batch, generator=gen) < o.empty_prompts
        cond[drop] = empty
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(BETAS["num_train_timesteps"], (o.batch,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        warm.step()
        ema.step(unet.parameters())
        return loss.item()

    unet_steps = _loop("unet", *_budget(o, 1 - share), unet_step)
    ema.copy_to(unet.parameters())
    unet.eval()

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=parts["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_uncond(tmp, TextConditioning(empty[None]))
    prompts = eval_prompts(data.num_classes, names)
    atomic_write_json(tmp / "fewstep_prompts.json", {"prompts": prompts, "num_classes": data.num_classes})
    info = {
        "data": data.spec.to_dict() if data.spec is not None else data.name, "options": asdict(o),
        "vae_steps": vae_steps + before.get("vae_steps", 0), "unet_steps": unet_steps + before.get("unet_steps", 0),
        "stages": [*before.get("stages", [before] if before else []), {"unet_steps": unet_steps, "options": asdict(o)}],
        "vae_reconstruction_mse": rec_mse,
        "scaling_factor": scaling, "unet_params": sum(p.numel() for p in unet.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "class_names": list(names) if names else None,
    }  # fmt: skip
    atomic_write_json(tmp / "fewstep_teacher.json", info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return pipe


def _continue(init: Path, tmp: Path, scheduler) -> tuple[dict, dict]:
    """The parts of a pipeline this trainer wrote (its tokenizer copied into ``tmp``) and its record."""
    from diffusers import StableDiffusionPipeline

    from fewstep.io import read_json

    if not (init / "fewstep_teacher.json").is_file():
        raise FewstepError(f"--init {init} is not a pipeline that `fewstep teacher train --arch sd` wrote")
    pipe = StableDiffusionPipeline.from_pretrained(init)
    pipe.tokenizer.save_pretrained(tmp / "tokenizer")
    parts = {"vae": pipe.vae, "text_encoder": pipe.text_encoder.eval().requires_grad_(False),
             "tokenizer": pipe.tokenizer, "unet": pipe.unet, "scheduler": scheduler}  # fmt: skip
    record = read_json(init / "fewstep_teacher.json")
    record.pop("options", None)
    return parts, record


def _class_names(data) -> list[str]:
    """A folder's class names (its sub-folders, sorted as the labels are)."""
    from fewstep.data import _folder_files

    if data.spec is None or data.spec.kind != "folder":
        return [str(c) for c in range(data.num_classes)]
    return _folder_files(Path(data.spec.path))[1]
