"""End-to-end latency of tier 2's pipelines in stock diffusers: text encoding, the UNet steps and the
VAE decode, per image, at batch 1 and 64 (medians of 5 after a warm-up), on this machine's CPU.

The teacher: ``StableDiffusionPipeline`` with DPM-Solver++ at 25 steps and guidance W (two UNet
passes per step). Students are copies of the teacher's UNet, so a k-step student costs the teacher
pipeline at k steps without guidance (``LCMScheduler``, guidance 1); a LoRA student fused into the
UNet costs the same. Prints a markdown table.

    python bench/tier2_latency.py --teacher src/fewstep/assets/mnist-sd --guidance 1.25
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--batches", default="1,64")
    args = p.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    dpm = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    rows = [(f"teacher, DPM-Solver++ 25 steps, guidance {args.guidance:g}", dpm, 25, args.guidance)]
    rows += [(f"student, {k} step{'s' if k > 1 else ''}", lcm, k, 1.0) for k in (1, 2, 4)]
    batches = [int(b) for b in args.batches.split(",")]
    heads = " | ".join(f"ms / image at batch {b}" for b in batches)
    print(f"| pipeline | {heads} | × faster (batch {batches[-1]}) |")
    print("|---|" + "---|" * (len(batches) + 1))
    base = None
    with torch.no_grad():
        for name, sched, steps, w in rows:
            pipe.scheduler = sched
            ms = []
            for b in batches:
                prompts = [f"a handwritten {i % 10}" for i in range(b)]
                run = functools.partial(pipe, prompts, num_inference_steps=steps, guidance_scale=w, output_type="np")
                sec = timed(run)
                ms.append(1000 * sec / b)
            base = base or ms[-1]
            print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {base / ms[-1]:.1f} |")


if __name__ == "__main__":
    main()
