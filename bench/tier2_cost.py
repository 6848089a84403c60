"""The cost side of tier 2, per method (docs/benchmarks.md, "Tier 2"): what a run of each method
costs before you run it — teacher evaluations per iteration (forward calls of the frozen teacher
denoiser on a batch; a guided call runs both halves as one doubled batch; a discriminator's reads of
the teacher's encoder are not counted), trainable
parameters (full copy vs LoRA), and the peak resident memory of a process that trains 12 iterations
at the benchmark's batch on builtin:mnist-sd (each method in a fresh process, so peaks do not mix).

    python bench/tier2_cost.py --guidance 1.25 lcm_lora lcm cd guided ufogen dmd2 sid
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

W = "W"  # replaced by --guidance
RUNS = {  # the rows of bench/tier2_methods.sh: teacher, method, batch, options
    "lcm_lora": ("lora:64:builtin:mnist-sd", "lcm", 16, {"guidance": (W, W), "distance": "l2", "weight_decay": 0.01}),
    "lcm_lora_readme": ("lora:64:builtin:mnist-sd", "lcm", 16, {"guidance": (W, W)}),
    "lcm": ("builtin:mnist-sd", "lcm", 32, {"guidance": (W, W), "sample_guidance": W, "lr": 1e-4}),
    "cd": ("builtin:mnist-sd", "cd", 32, {"guidance": (W, W), "guidance_input": False}),
    "dmd2": ("builtin:mnist-sd", "dmd2", 32, {"guidance": W, "lr": 1e-5, "fake_lr": 1e-5}),
    "sid": ("builtin:mnist-sd", "sid", 32, {"guidance": W, "fake_guidance": W, "fake_eval_guidance": W}),
    "guided": ("builtin:mnist-sd", "guided", 32,
               {"stage_one_steps": 300, "start_steps": 16, "steps_per_round": 250, "guidance": W}),
    "ufogen": ("builtin:mnist-sd", "ufogen", 32, {}),
    "add": ("builtin:mnist-sd", "add", 32, {"guidance": W}),
    "progressive": ("builtin:mnist-sd", "progressive", 32, {"start_steps": 16, "steps_per_round": 300}),
    "lightning": ("builtin:mnist-sd", "lightning", 32, {"start_steps": 16, "steps_per_round": 300}),
    "progressive_w": ("builtin:mnist-sd", "progressive", 32,
                      {"start_steps": 16, "steps_per_round": 300, "guidance": W}),
    "lightning_w": ("builtin:mnist-sd", "lightning", 32, {"start_steps": 16, "steps_per_round": 300, "guidance": W}),
}  # fmt: skip
STEPS = 12  # iterations measured (two-time-scale methods update the generator every few)


def with_scale(value, w: float):
    if isinstance(value, tuple):
        return tuple(with_scale(v, w) for v in value)
    return w if value == W else value


def measure(name: str, w: float) -> dict:
    import torch

    from fewstep.teachers import load_teacher
    from fewstep.train import distill

    spec, method, batch, options = RUNS[name]
    options = {k: with_scale(v, w) for k, v in options.items()}
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
