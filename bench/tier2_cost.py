"""The cost side of tier 2, per method (docs/benchmarks.md, "Tier 2"): what a run of each method
costs before you run it — teacher evaluations per iteration (forward calls of the frozen teacher
denoiser on a batch; a guided call runs both halves as one doubled batch; a discriminator's reads of
the teacher's encoder are not counted), trainable
parameters (full copy vs LoRA), and the peak resident memory of a process that trains 12 iterations
at the benchmark's batch on builtin:mnist-sd (each method in a fresh process, so peaks do not mix).

    python bench/tier2_cost.py --guidance 3 lcm_lora lcm dmd2 sid
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

RUNS = {  # the rows of bench/tier2_methods.sh: teacher, method, batch, options
    "lcm_lora": ("lora:64:builtin:mnist-sd", "lcm", 16, {"lr": 1e-4, "target_decay": 0.0, "distance": "l2"}),
    "lcm": ("builtin:mnist-sd", "lcm", 32, {"lr": 1e-4}),
    "cd": ("builtin:mnist-sd", "cd", 32, {"guidance_input": False}),
    "dmd2": ("builtin:mnist-sd", "dmd2", 32, {"lr": 1e-5, "fake_lr": 1e-5}),
    "sid": ("builtin:mnist-sd", "sid", 32, {}),
}
STEPS = 12  # iterations measured (two-time-scale methods update the generator every few)
GUIDED = {"lcm_lora": "range", "lcm": "range", "cd": "range", "dmd2": "scale", "sid": "scale"}


def measure(name: str, w: float) -> dict:
    import torch

    from fewstep.teachers import load_teacher
    from fewstep.train import distill

    spec, method, batch, options = RUNS[name]
    options = {**options, "guidance": (w, w) if GUIDED[name] == "range" else w}
    teacher = load_teacher(spec)
    calls = [0]

    def count(_m, _i, _o):
        calls[0] += 1

    hook = teacher.register_forward_hook(count)  # the frozen teacher denoiser (a guided call batches both halves)
    m = distill(teacher, method, max_steps=STEPS, data="mnist", batch=batch, options=options, sample_n=0)
    hook.remove()
    trainable = sum(p.numel() for p in m.student.parameters())  # a LoRA student exposes its adapters only
    return {"run": name, "batch": batch, "teacher_calls_per_iteration": calls[0] / STEPS, "trainable_params": trainable,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", choices=sorted(RUNS))
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.runs[0], args.guidance)))
        return
    print("| run | batch | teacher calls / iteration | trainable parameters | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name in args.runs:
        cmd = [sys.executable, __file__, name, "--guidance", str(args.guidance), "--one"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {name} | {r['batch']} | {r['teacher_calls_per_iteration']:.1f} | {r['trainable_params']:,} | "
              f"{r['peak_rss_mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
