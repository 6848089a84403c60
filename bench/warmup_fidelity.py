"""How close a warmed-up (``compress``) student's ODE is to the teacher's (issue 19).

    .venv/bin/python bench/warmup_fidelity.py runs/b19/compress_q runs/b19/compress_q_nofeat ...

RMSE between each run's student and its teacher, both sampled with Heun at 35 NFE (18 steps) from
the same 256 noises and labels (label i % num_classes): 0 means the student's ODE is the teacher's.
"""

from __future__ import annotations

import sys

import torch

from fewstep.runs import load_run
from fewstep.solvers import sample


def main() -> None:
    g = torch.Generator().manual_seed(0)
    reference = None
    for run in sys.argv[1:]:
        m = load_run(run)
        if reference is None:
            t = m.teacher
            z = torch.randn((256, *t.sample_shape), generator=g)
            y = torch.arange(256) % t.num_classes if t.num_classes else None
            reference = sample(t, z, "heun", 18, y)[0]
            print(f"teacher sample std {float(reference.std()):.3f}")
        x = sample(m.student, z, "heun", 18, y)[0]
        print(f"{run}: RMSE to the teacher at Heun 35 NFE {float((x - reference).pow(2).mean().sqrt()):.3f}")


if __name__ == "__main__":
    main()
