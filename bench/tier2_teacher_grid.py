"""Samples of the tier-2 teacher per prompt and guidance scale, with the stock diffusers pipeline
(DPM-Solver++, 25 steps): for each scale a block of rows, one per evaluation template, one column per
digit (seed = the digit). Writes docs/images/mnist_sd_teacher.png.

    python bench/tier2_teacher_grid.py --guidance 1,3,5 --out docs/images/mnist_sd_teacher.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline

    import fewstep
    from fewstep.data.mnist import NAMES
    from fewstep.viz import save_grid

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(Path(fewstep.__file__).parent / "assets" / "mnist-sd"))
    p.add_argument("--guidance", default="1,3,5")
    p.add_argument("--out", default="docs/images/mnist_sd_teacher.png")
    args = p.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    from fewstep.data.mnist import EVAL_TEMPLATES

    rows = []
    for w in (float(v) for v in args.guidance.split(",")):
        for t in EVAL_TEMPLATES:
            prompts = [t.format(d=d, name=NAMES[d]) for d in range(10)]
            gens = [torch.Generator().manual_seed(d) for d in range(10)]
            img = pipe(prompts, num_inference_steps=25, guidance_scale=w, generator=gens, output_type="pt").images
            rows.append(img * 2 - 1)
            print(f"w={w:g} {t!r}", flush=True)
    save_grid(torch.cat(rows), args.out, nrow=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
