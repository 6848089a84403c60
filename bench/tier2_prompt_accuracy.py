"""Label accuracy of the tier-2 teacher per evaluation template and guidance scale, with the stock
diffusers pipeline (DPM-Solver++, 25 steps) and the shipped MNIST classifier: for each template, every
digit's prompt ``--n`` times (seeds 0..n-1), the share of images the classifier reads as the prompt's
digit. Prints one line per (scale, template) and the mean over templates (``fewstep eval``'s label
accuracy on the uniform prompt labels, at a smaller sample).

    python bench/tier2_prompt_accuracy.py --guidance 1,3 --n 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline

    import fewstep
    from fewstep.data.mnist import EVAL_TEMPLATES, NAMES
    from fewstep.networks.classifier import load_classifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(Path(fewstep.__file__).parent / "assets" / "mnist-sd"))
    p.add_argument("--guidance", default="3")
    p.add_argument("--n", type=int, default=40, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(Path(fewstep.__file__).parent / "assets" / "mnist-classifier").eval()
    for w in (float(v) for v in args.guidance.split(",")):
        accs = []
        for t in EVAL_TEMPLATES:
            prompts = [t.format(d=d, name=NAMES[d]) for d in range(10) for _ in range(args.n)]
            gens = [torch.Generator().manual_seed(s) for _ in range(10) for s in range(args.n)]
            with torch.no_grad():
                img = pipe(prompts, num_inference_steps=args.steps, guidance_scale=w, generator=gens,
                           output_type="pt").images  # fmt: skip
                read = classifier(img * 2 - 1).argmax(1)
            accs.append((read == torch.arange(10).repeat_interleave(args.n)).float().mean().item())
            print(f"w={w:g} {t!r}: {100 * accs[-1]:.1f} %", flush=True)
        print(f"w={w:g} mean over templates: {100 * sum(accs) / len(accs):.1f} %", flush=True)


if __name__ == "__main__":
    main()
