"""Distil a diffusers UNet2DModel digits teacher with fewstep and measure the exported student in
stock diffusers (docs/diffusers.md; the "diffusers" section of docs/benchmarks.md).

    .venv/bin/python bench/diffusers_digits.py --out runs/diffusers-digits \
        --teacher-minutes 4 --distill-minutes 3 --n 2000

1. trains a class-conditional ``UNet2DModel`` (10 digits + a null class for guidance) with
   diffusers' DDPM recipe (v-prediction MSE, uniform timesteps, 10% label dropout, EMA) and saves
   it as a ``DDPMPipeline`` folder — the kind of teacher a diffusers user already has;
2. ``fewstep distill --teacher <folder> --method cd`` (an LCM-parameterised consistency student);
3. ``fewstep export RUN --format diffusers``;
4. loads the export with ``DiffusionPipeline.from_pretrained`` (no fewstep) and measures FID in
   the shipped digits classifier's feature space (fewstep.eval) at 1/2/4 steps, against the
   teacher (Heun 18 steps = 35 NFE, and Euler/DDIM at 1/2/4 NFE), plus samples per second.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def train_teacher(folder: Path, minutes: float, channels: tuple[int, int], seed: int = 0, batch: int = 128) -> dict:
    import diffusers

    from fewstep.data import load_dataset

    torch.manual_seed(seed)
    data = load_dataset("digits")
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=channels[1],
        num_class_embeds=11,
    )
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    while time.time() - t0 < 60 * minutes:
        idx = torch.randint(len(data), (batch,), generator=g)
        x0, y = data.x[idx], data.labels[idx].clone()
        y[torch.rand(batch, generator=g) < 0.1] = 10  # the null class, for classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sched.add_noise(x0, noise, t)
        loss = (unet(x_t, t, class_labels=y).sample - sched.get_velocity(x0, noise, t)).square().mean()
        lr = 2e-3 * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
    diffusers.DDPMPipeline(unet=ema, scheduler=sched).save_pretrained(folder)
    return {"steps": step, "minutes": (time.time() - t0) / 60, "params": sum(p.numel() for p in unet.parameters())}


def pipeline_samples(pipe, seeds, labels, steps: int, batch: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(seeds), batch):
        s, y = seeds[i : i + batch], labels[i : i + batch]
        gens = [torch.Generator().manual_seed(int(k)) for k in s]
        images = pipe(batch_size=len(s), class_labels=y.tolist(), num_inference_steps=steps, generator=gens,
                      output_type="pt").images  # fmt: skip
        out.append(images * 2 - 1)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/diffusers-digits")
    p.add_argument("--teacher-minutes", type=float, default=4.0)
    p.add_argument("--distill-minutes", type=float, default=3.0)
    p.add_argument("--n", type=int, default=2000, help="samples per FID (the protocol uses 10,000)")
    p.add_argument("--channels", default="32,64", help="block_out_channels of the teacher UNet2DModel")
    p.add_argument("--set", action="append", default=[], help="CD options, e.g. lr=1e-4")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two
    import diffusers

    from fewstep.cli import main as fewstep
    from fewstep.data import load_dataset
    from fewstep.eval.features import get_extractor
    from fewstep.eval.metrics import fid
    from fewstep.seeding import seeded_labels, seeded_noise
    from fewstep.solvers import sample
    from fewstep.teachers import load_teacher

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts: dict = {"n": args.n}
    teacher_dir, run, exported = out / "teacher", out / "run", out / "exported"
    if not teacher_dir.exists():
        channels = tuple(int(c) for c in args.channels.split(","))
        facts["teacher"] = train_teacher(teacher_dir, args.teacher_minutes, channels)
    if not run.exists():
        t0 = time.time()
        sets = sum((["--set", s] for s in ["sample_n=16", *args.set]), [])
        fewstep(["distill", "--teacher", str(teacher_dir), "--method", "cd", "--data", "digits", "--out", str(run),
                 "--minutes", str(args.distill_minutes), "--batch", "64", *sets])  # fmt: skip
        facts["distill_minutes"] = (time.time() - t0) / 60
    if not exported.exists():
        fewstep(["export", str(run), "--format", "diffusers", "--out", str(exported)])

    feats = get_extractor("digits", (1, 8, 8))
    real = feats.features(load_dataset("digits").x)
    seeds = list(range(args.n))
    labels = seeded_labels(seeds, 10)
    teacher = load_teacher(teacher_dir)
    rows = []

    def row(name: str, nfe: int, x: torch.Tensor, seconds: float) -> None:
        rows.append({"sampler": name, "nfe": nfe, "fid": fid(real, feats.features(x.clamp(-1, 1)), min_samples=500),
                     "samples_per_s": len(x) / seconds})  # fmt: skip
        print(rows[-1], flush=True)

    with torch.no_grad():
        for solver, steps in (("heun", 18), ("euler", 1), ("euler", 2), ("euler", 4), ("dpmpp_2m", 4)):
            t0 = time.time()
            xs = [sample(teacher, seeded_noise(seeds[i : i + 500], (1, 8, 8)), solver, steps, labels[i : i + 500])[0]
                  for i in range(0, args.n, 500)]  # fmt: skip
            row(
                f"teacher {solver} (fewstep)",
                2 * steps - 1 if solver == "heun" else steps,
                torch.cat(xs),
                time.time() - t0,
            )
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(exported))
        pipe.set_progress_bar_config(disable=True)
        for steps in (1, 2, 4):
            t0 = time.time()
            x = pipeline_samples(pipe, seeds, labels, steps)
            row(f"student {type(pipe).__name__} + {type(pipe.scheduler).__name__}", steps, x, time.time() - t0)
    teacher_fid = rows[0]["fid"]
    for r in rows:
        r["fid_ratio"] = r["fid"] / teacher_fid
    facts["rows"] = rows
    (out / "results.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
