"""Is MeanFlow's regression target a better one-step velocity than the student's own?

At the start of distillation (the student is a teacher copy, so ``u(z, r, t) = v(z, t)``), for a
jump ``t -> 0`` from several noise levels, compare with the true average velocity
``u* = (z_t - z_0) / t`` (``z_0`` from the teacher's ODE, Heun 64 steps): the student's ``u`` and the
MeanFlow target ``v - t du/dt``. A target further from ``u*`` than ``u`` itself pushes training the
wrong way (docs/benchmarks.md, issue 18).

    python bench/meanflow_target.py [--n 128] [--sigmas 80,20,5,1]
"""

import argparse

import torch

from fewstep import solvers
from fewstep.methods import get_method
from fewstep.methods.meanflow import flow_velocity
from fewstep.schedules import karras_sigmas
from fewstep.teachers import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--sigmas", default="80,20,5,1")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    method = get_method("meanflow")(teacher)
    n = args.n
    cond = torch.randint(0, teacher.num_classes, (n,)) if teacher.num_classes else None
    eps = torch.randn(n, *teacher.sample_shape)

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((a - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).median())

    for sigma in (float(s) for s in args.sigmas.split(",")):
        t = sigma / (1 + sigma)
        with torch.no_grad():
            x0 = solvers.heun(teacher, eps * sigma, karras_sigmas(64, teacher.sigma_min, sigma).float(), cond)
        z, tt, r = eps * sigma / (1 + sigma), torch.full((n,), t), torch.zeros(n)
        u_star = (z - x0) / t
        with torch.no_grad():
            v = flow_velocity(teacher, z, tt, cond)
            u, dudt = torch.func.jvp(lambda a, b, c: method.student(a, b, c, cond), (z, r, tt),
                                     (v, torch.zeros_like(r), torch.ones_like(tt)))  # fmt: skip
        target = v - t * dudt
        print(f"sigma {sigma:5.1f} (t = {t:.4f}): |u - u*| / |u*| = {rel(u, u_star):.3f}, "
              f"|target - u*| / |u*| = {rel(target, u_star):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
