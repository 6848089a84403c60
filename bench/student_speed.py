"""Latency of smaller students against the teacher at 35 NFE, measured in one process (issue 19).

    .venv/bin/python bench/student_speed.py runs/b19/cd_q runs/b19/cd_h runs/cd_snap [--batch 256] [--rounds 5]

For each round, the teacher (Heun, 35 NFE) and every run's student at 1 NFE are timed back to back
with ``fewstep.eval.speed.measure_speed`` (median of its repeats); the table gives, per sampler,
the median over rounds of the latency per batch and the speed-up against the teacher of the same
round (ratios measured side by side: timings on shared CPUs drift, ratios less so). Parameter
counts are the student networks'.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fewstep.eval.sampling import student_sampler, teacher_sampler
from fewstep.eval.speed import measure_speed
from fewstep.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    methods = [load_run(r) for r in args.runs]
    teacher = methods[0].teacher
    shape, classes = tuple(teacher.sample_shape), teacher.num_classes
    samplers = {"teacher Heun @ 35 NFE": teacher_sampler(teacher, "heun", 35)}
    params = {"teacher Heun @ 35 NFE": sum(q.numel() for q in teacher.parameters())}
    for r, m in zip(args.runs, methods, strict=True):
        samplers[f"{r} @ 1 NFE"] = student_sampler(m, 1)
        params[f"{r} @ 1 NFE"] = sum(q.numel() for q in m.student.parameters())
    lat: dict[str, list[float]] = {k: [] for k in samplers}
    ratio: dict[str, list[float]] = {k: [] for k in samplers}
    with torch.inference_mode():
        for _ in range(args.rounds):
            t = measure_speed(samplers["teacher Heun @ 35 NFE"], shape, classes, args.batch, args.repeats).latency_s
            for k, s in samplers.items():
                v = (
                    t
                    if k.startswith("teacher")
                    else measure_speed(s, shape, classes, args.batch, args.repeats).latency_s
                )
                lat[k].append(v)
                ratio[k].append(t / v)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} rounds x {args.repeats} repeats")
    print("| sampler | parameters | latency per batch (median) | speed-up vs teacher @ 35 NFE (median) |")
    print("|---|---|---|---|")
    for k in samplers:
        print(f"| {k} | {params[k]:,} | {statistics.median(lat[k]) * 1000:.1f} ms | "
              f"{statistics.median(ratio[k]):.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
