"""How straight is each reflow round? Liu et al.'s straightness per flow (issue 17).

``S = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt`` (pixel mean; 0 for straight trajectories) of
the teacher (round 0) and of each run's student read as a flow (the evaluation-EMA weights), Euler
on 64 uniform flow-time steps from the same noise and labels; beside it the one-Euler-step error
against the flow's own 64-step answer (what a straight flow makes zero).

    python bench/reflow_straightness.py runs/b17/reflow runs/b17/reflow2 [--n 512]
"""

import argparse

import torch

from fewstep.conversions import uniform_flow_sigmas
from fewstep.methods.reflow import straightness
from fewstep.runs import load_run
from fewstep.solvers import euler
from fewstep.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="reflow run folders, in round order")
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    teacher = load_teacher(args.teacher)
    g = torch.Generator().manual_seed(0)
    z = torch.randn((args.n, *teacher.sample_shape), generator=g)
    cond = torch.randint(0, teacher.num_classes, (args.n,), generator=g) if teacher.num_classes else None
    flows = [("teacher (round 0)", teacher)] + [(r, load_run(r, teacher=teacher).student.eval()) for r in args.runs]
    print("| flow | straightness S | one-step RMSE to its own 64-step answer |")
    print("|---|---|---|")
    for name, flow in flows:
        with torch.no_grad():
            s = straightness(flow, z, args.steps, cond)
            many = euler(flow, z * teacher.sigma_max, uniform_flow_sigmas(args.steps, teacher.sigma_max), cond)
            one = euler(flow, z * teacher.sigma_max, uniform_flow_sigmas(1, teacher.sigma_max), cond)
        rmse = float((one - many).pow(2).mean().sqrt())
        print(f"| {name} | {s:.4f} | {rmse:.4f} |")


if __name__ == "__main__":
    main()
