"""Tier-2 GPU check (issue 16): the shipped SD-shaped teacher and two methods (LCM-LoRA, DMD2) on one
GPU in bfloat16 at a realistic batch. Run it whenever a GPU machine is lent (fewstep never depends on one):

    python bench/gpu_check.py --out gpu_check.json                    # the GPU run, under 8 minutes

and, as the tests run it, on the CPU at a toy size (the same code path, float32):

    python bench/gpu_check.py --device cpu --dtype fp32 --batch 4 --steps 3 --teacher-batch 4 --teacher FOLDER

What it measures:
1. the teacher: guided (w = --guidance) DPM-Solver++(2M), 25 steps (50 UNet calls per image), then the VAE
   decode, at --teacher-batch under autocast: images/s and peak memory;
2. each method, with the options of bench/tier2_methods.sh:
   (a) the start check: the losses of the first iteration (initial weights) on the CPU in float32 and on the
       device under --dtype, with identical random draws (every torch.rand*/randn*/randint*/randperm call
       draws from the CPU generator and is then moved), must agree within --tol (relative);
   (b) --steps iterations of ``fewstep.distill`` at --batch with accelerate's mixed precision: iterations/s
       (median of the logged windows after the first) and peak memory;
   (c) the FLOPs of one iteration (torch.utils.flop_counter over the method's losses and backward, averaged
       over one cycle of its optimizer schedule) and the model FLOP utilisation, FLOPs x it/s / the
       device's dense peak (--peak-tflops, or a table of known GPUs).
Exit status 1 when a start check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

METHODS = ("lcm_lora", "dmd2")  # rows of bench/tier2_methods.sh, as bench/tier2_cost.py lists them
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # dense bf16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RANDOM = ("rand", "randn", "randint", "randperm")


@contextmanager
def cpu_draws():
    """Every ``torch.rand*``/``randn*``/``randint*``/``randperm`` call draws on the CPU (float32 for
    floating draws) and is moved to the device it asked for: a CPU run and a device run seeded alike
    then see the same numbers."""
    saved = {n: getattr(torch, n) for n in RANDOM + tuple(f"{n}_like" for n in RANDOM[:3])}

    def direct(name):
        def draw(*args, device=None, dtype=None, **kw):
            floating = name in ("rand", "randn") and (dtype is None or dtype.is_floating_point)
            out = saved[name](*args, device="cpu", dtype=torch.float32 if floating else dtype, **kw)
            return out.to(device=device or "cpu", dtype=dtype or out.dtype)

        return draw

    def like(name):
        def draw(t, *args, device=None, dtype=None, **kw):
            dtype = dtype or t.dtype
            probe = torch.empty(t.shape, dtype=torch.float32 if dtype.is_floating_point else dtype)
            return saved[name](probe, *args, **kw).to(device=device or t.device, dtype=dtype)

        return draw

    for n in saved:
        setattr(torch, n, like(n) if n.endswith("_like") else direct(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch, n, f)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)


def teacher_speed(args) -> dict:
    from fewstep.eval.sampling import teacher_sampler
    from fewstep.teachers import load_teacher

    teacher = load_teacher(args.teacher).to(args.device).eval()
    sampler = teacher_sampler(teacher, "dpmpp_2m", 25, guidance=args.guidance)
    n, g = args.teacher_batch, torch.Generator().manual_seed(0)
    z = torch.randn(n, *teacher.sample_shape, generator=g).to(args.device)
    y = torch.randint(0, teacher.num_classes, (n,), generator=g).to(args.device)
    times = []
    with torch.no_grad(), autocast(args.device, DTYPES[args.dtype]):
        for _ in range(1 + args.teacher_repeats):  # the first pass warms up (kernels, allocator)
            reset_peak(args.device)
            sync(args.device)
            t0 = time.perf_counter()
            images = teacher.decode(sampler.fn(z, y))
            sync(args.device)
            times.append(time.perf_counter() - t0)
    ok = bool(torch.isfinite(images).all())
    return {"images_per_s": n / statistics.median(times[1:]), "batch": n, "unet_calls_per_image": sampler.nfe * 2,
            "peak_mb": peak_mb(args.device), "finite": ok}  # fmt: skip


def first_losses(run: tuple, args, device: str, dtype: str, out: Path) -> dict[str, float]:
    from fewstep.train import distill

    teacher, method, options = run
    with cpu_draws():
        distill(teacher, method, max_steps=1, out=out, overwrite=True, data="mnist", options=options,
                batch=args.batch, seed=0, log_every=1, sample_n=0, ema_decay=0.0, cpu=device == "cpu",
                mixed_precision="no" if dtype == "fp32" else dtype)  # fmt: skip
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {k: v for k, v in row.items() if k.startswith("loss/")}


def iteration_flops(m, batch: int, device: str) -> float:
    """FLOPs of one training iteration (forward and backward of every due loss), averaged over one
    cycle of the method's optimizer schedule."""
    from torch.utils.flop_counter import FlopCounterMode

    from fewstep.data import load_dataset
    from fewstep.methods import Batch

    x = load_dataset("mnist").x[:batch].to(device)
    x = m.teacher.encode(x) if hasattr(m.teacher, "decode") else x  # latents, as the engine feeds them
    y = torch.randint(0, m.teacher.num_classes, (batch,), device=device)
    specs = m.optimizers()
    cycle = math.lcm(*(s.every for s in specs.values()))
    for net in m.networks().values():  # distill returns the student frozen, with its EMA weights
        net.train().requires_grad_(True)
    total = 0
    for i in range(cycle):
        due = {k for k, s in specs.items() if s.due(i)}
        with FlopCounterMode(display=False) as count:
            losses = m.losses(Batch(batch, x, y), i, due)
            sum(losses[k] for k in due if k in losses).backward()
        total += count.get_total_flops()
        for net in m.networks().values():
            net.zero_grad(set_to_none=True)
    return total / cycle


def method_check(name: str, args, peak: float | None) -> dict:
    from tier2_cost import RUNS, with_scale  # bench/ is on the path when this script runs

    from fewstep.train import distill

    spec, method, _, options = RUNS[name]
    options = {k: with_scale(v, args.guidance) for k, v in options.items()}
    run = (spec.replace("builtin:mnist-sd", args.teacher), method, options)
    with tempfile.TemporaryDirectory() as tmp:
        cpu = first_losses(run, args, "cpu", "fp32", Path(tmp) / "cpu")
        dev = first_losses(run, args, args.device, args.dtype, Path(tmp) / "dev")
        rel = {k: abs(dev[k] - v) / max(abs(v), 1e-12) for k, v in cpu.items()}
        reset_peak(args.device)
        m = distill(run[0], method, max_steps=args.steps, out=Path(tmp) / "speed", data="mnist", options=options,
                    batch=args.batch, seed=0, log_every=max(1, args.steps // 6), sample_n=0, ema_decay=0.0,
                    checkpoint_every=10**9, cpu=args.device == "cpu",
                    mixed_precision="no" if args.dtype == "fp32" else args.dtype)  # fmt: skip
        sync(args.device)
        memory = peak_mb(args.device)
        rows = [json.loads(line) for line in (Path(tmp) / "speed" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["it_per_s"] for r in rows if "it_per_s" in r]
        it_s = statistics.median(rates[1:] or rates)
        flops = iteration_flops(m, args.batch, args.device)
    return {"start_losses_cpu": cpu, "start_losses_device": dev, "start_rel_diff": rel,
            "start_ok": all(r <= args.tol for r in rel.values()), "it_per_s": it_s, "batch": args.batch,
            "images_per_s": it_s * args.batch, "peak_mb": memory, "flops_per_iter": flops,
            "mfu": flops * it_s / (peak * 1e12) if peak else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--teacher", default="src/fewstep/assets/mnist-sd", help="the tier-2 teacher (a pipeline folder)")
    p.add_argument("--guidance", type=float, default=3.0, help="w of the guided setting (docs/benchmarks.md)")
    p.add_argument("--methods", default="lcm_lora,dmd2")
    p.add_argument("--batch", type=int, default=256, help="training batch (default 256)")
    p.add_argument("--steps", type=int, default=60, help="timed iterations per method")
    p.add_argument("--teacher-batch", type=int, default=1024)
    p.add_argument("--teacher-repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=0.05, help="relative tolerance of the start check (bf16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: a table)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in args.methods.split(","):
        if name not in METHODS:
            p.error(f"unknown method row {name!r}; use some of {', '.join(METHODS)}")
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    t0 = time.time()
    result = {"device": gpu, "dtype": args.dtype, "torch": torch.__version__, "peak_tflops": peak,
              "teacher": teacher_speed(args), "methods": {}}  # fmt: skip
    print(f"teacher (guided DPM-Solver++ 25 steps + VAE decode): {result['teacher']['images_per_s']:.1f} images/s "
          f"at batch {args.teacher_batch}, peak {result['teacher']['peak_mb']:.0f} MB", flush=True)  # fmt: skip
    for name in args.methods.split(","):
        r = result["methods"][name] = method_check(name, args, peak)
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in r["start_rel_diff"].items())
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        print(f"{name}: start check {'ok' if r['start_ok'] else 'FAILED'} ({diffs}); {r['it_per_s']:.2f} it/s at "
              f"batch {args.batch}; peak {r['peak_mb']:.0f} MB; {r['flops_per_iter'] / 1e9:.1f} GFLOP/it; MFU {mfu}",
              flush=True)  # fmt: skip
    result["minutes"] = (time.time() - t0) / 60
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if all(r["start_ok"] for r in result["methods"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
