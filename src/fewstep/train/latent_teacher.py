"""Train a Stable-Diffusion-shaped latent text-to-image teacher: ``fewstep teacher train --arch sd``.

Three stages, each a plain loop with a progress bar (loss, rate, ETA), then one stock diffusers
``StableDiffusionPipeline`` folder written atomically (a temporary folder renamed into place):

1. **VAE** (``AutoencoderKL``, :mod:`fewstep.teachers.text2image`): mean-squared reconstruction of
   a posterior sample plus ``kl_weight`` x KL (1e-6, the weight of SD's first-stage KL
   autoencoders; their LPIPS and patch-GAN terms are left out — no perceptual network offline and
   digits reconstruct within a few minutes without them). Then ``scaling_factor`` = 1 / the standard
   deviation of the training latents (SD's 0.18215 came from the same rule).
2. **Text encoder** (``CLIPTextModel``): CLIP's contrastive pre-training against the latents
   (:func:`_pretrain_text`, ``text_share`` of the budget), then frozen — the stand-in for the
   pre-trained CLIP that SD keeps frozen.
3. **UNet** (``UNet2DConditionModel``), diffusers' ``train_text_to_image.py`` recipe: latents =
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
    text_share: float = 0.05  # ... on the text encoder's contrastive pre-training
    batch: int = 128
    vae_batch: int = 64
    lr: float = 5e-4
    vae_lr: float = 1e-3
    text_batch: int = 128
    text_lr: float = 5e-4
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
    if not (0 < o.vae_share and 0 <= o.text_share and o.vae_share + o.text_share < 1) or not 0 <= o.empty_prompts < 1:
        raise FewstepError(
            "vae_share > 0 and text_share >= 0 must leave the UNet a share (sum < 1) and empty_prompts must be in "
            f"[0, 1), got {o.vae_share}, {o.text_share}, {o.empty_prompts}"
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

    # --- stage 2: the text encoder, CLIP-style -----------------------------------------------------
    text_share = 0.0 if o.init is not None else o.text_share
    text = {}
    if text_share:
        text = _pretrain_text(text_encoder, tokenizer, mean, y_all, names, o, gen, _budget(o, text_share))

    # --- stage 3: the UNet ------------------------------------------------------------------------
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

    unet_steps = _loop("unet", *_budget(o, 1 - share - text_share), unet_step)
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
        "vae_reconstruction_mse": rec_mse, **text,
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


def _pretrain_text(text_encoder, tokenizer, latents, labels, names, o, gen, budget) -> dict:
    """Contrastive (CLIP) pre-training of ``text_encoder`` on the training captions against the digits' VAE
    latents, then frozen; returns its record (steps, held-out retrieval before and after).

    SD's text encoder comes from CLIP, trained on other data than SD's captions, and carries a word's meaning
    into phrasings the UNet never saw; a frozen encoder at its random initialisation does not (the first
    ``builtin:mnist-sd``: 98-100 % label accuracy on a training phrasing, 55-65 % on "a photo of the digit
    {name}"). This stage is CLIP's recipe at this size: the pooled text feature (the end token's) and an
    image feature (a two-layer MLP on the latent, discarded afterwards), each linearly projected and
    L2-normalised, a learned temperature (initialised at 1 / 0.07, capped at 100), the symmetric
    cross-entropy over the batch, AdamW with weight decay 0.2. Captions of one digit are interchangeable,
    so the loss cannot fall below about log(batch / classes); what it teaches is which words name a digit."""
    from fewstep.data.mnist import eval_prompts, train_captions
    from fewstep.teachers.text2image import prompt_ids

    width = text_encoder.config.hidden_size
    image_tower = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(latents[0].numel(), 256), torch.nn.GELU(), torch.nn.Linear(256, width)
    )
    text_head = torch.nn.Linear(width, width, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text_encoder.parameters(), *image_tower.parameters(), *text_head.parameters()]
    opt = torch.optim.AdamW([{"params": params}, {"params": [log_scale], "weight_decay": 0.0}], lr=o.text_lr,
                            weight_decay=0.2)  # fmt: skip
    text_encoder.train().requires_grad_(True)
    n = len(latents)

    def features(captions):
        return F.normalize(text_head(text_encoder(prompt_ids(tokenizer, captions)).pooler_output), dim=-1)

    def retrieval() -> float:
        """Share of the held-out evaluation prompts whose nearest class (mean image feature) is their digit."""
        with torch.no_grad():
            img = F.normalize(image_tower(latents), dim=-1)
            classes = F.normalize(torch.stack([img[labels == c].mean(0) for c in range(int(labels.max()) + 1)]), dim=-1)
            prompts = eval_prompts(len(classes), names)
            hit = (features(prompts) @ classes.T).argmax(1) == torch.arange(len(prompts)) % len(classes)
        return hit.float().mean().item()

    before = retrieval()

    def step(_: int) -> float:
        idx = torch.randint(n, (o.text_batch,), generator=gen)
        t = features(train_captions(labels[idx], gen, names))
        v = F.normalize(image_tower(latents[idx]), dim=-1)
        logits = log_scale.exp().clamp(max=100.0) * t @ v.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    steps = _loop("text", *budget, step)
    text_encoder.eval().requires_grad_(False)
    return {"text_steps": steps, "text_eval_retrieval": {"before": before, "after": retrieval()}}


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
