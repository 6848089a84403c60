"""Can LADD's discriminator tell teacher samples from the student's? A probe, not a test.

Builds LADD on ``builtin:digits`` with the student frozen at its initialisation (the teacher) and
trains only the discriminator heads for ``--steps`` iterations with Adam (``--d-lr``, betas (0, 0.99),
LADD's), printing the hinge loss (chance: 2.0) every 50 iterations. Used to find why LADD's
discriminator sat at chance in the full runs (docs/benchmarks.md, "Adversarial: tuning")::

    OMP_NUM_THREADS=1 .venv/bin/python bench/disc_probe.py --disc-m -1 --d-lr 1e-4
    OMP_NUM_THREADS=1 .venv/bin/python bench/disc_probe.py --disc-m -1 --d-lr 1e-3
    OMP_NUM_THREADS=1 .venv/bin/python bench/disc_probe.py --disc-m -1 --d-lr 1e-4 --level 7.3  # fakes from one level
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.methods.ladd import LADD, LADDConfig
from fewstep.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disc-m", type=float, default=1.0, help="logit-normal location of t_hat (paper: 1)")
    ap.add_argument("--d-lr", type=float, default=1e-4)
    ap.add_argument("--level", type=float, default=None, help="one student level instead of ADD's four")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LADDConfig(disc_m=a.disc_m, d_lr=a.d_lr)
    if a.level is not None:
        config.student_sigmas = (a.level,)
    method = LADD(load_teacher("builtin:digits"), config)
    opt = torch.optim.Adam(method.discriminator.parameters(), lr=a.d_lr, betas=config.betas)
    t0, losses = time.time(), []
    for step in range(a.steps + 1):
        _, x0, labels = method.pairs.batch(a.batch, "cpu")
        with torch.no_grad():
            fake = method.generate(x0, labels)
        loss = method.discriminator_loss(x0, fake, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            recent = losses[-50:]
            print(f"step {step}: hinge loss {sum(recent) / len(recent):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
