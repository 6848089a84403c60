"""``fewstep sample``: draw samples from a teacher (any solver) or from a distilled student (a run
directory, with its method's own sampler) as a PNG grid, scatter or .npz."""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError


def generate(model, seeds, solver: str, steps: int, label: int | None, guidance: float, batch: int = 256):
    """Seeded samples of a denoiser: returns ``(samples, labels, nfe_per_sample)``."""
    from fewstep.guidance import cfg
    from fewstep.seeding import batches, seeded_labels, seeded_noise
    from fewstep.solvers import sample

    if guidance != 1.0 and not model.num_classes:
        raise FewstepError("--guidance needs a class-conditional model; this one has no labels")
    if label is not None and not (0 <= label < max(model.num_classes, 1)):
        raise FewstepError(f"--label must lie in [0, {model.num_classes - 1}] for this model")
    den = cfg(model, guidance) if model.num_classes else model
    xs, ys, nfe = [], [], 0
    for chunk in batches(seeds, batch):
        noise = seeded_noise(chunk, model.sample_shape)
        y = seeded_labels(chunk, model.num_classes)
        if y is not None and label is not None:
            y = torch.full_like(y, label)
        x, nfe = sample(den, noise, solver, steps, y)
        xs.append(x)
        ys.append(y)
    labels = torch.cat(ys) if ys and ys[0] is not None else None
    return torch.cat(xs), labels, nfe


def generate_student(method, seeds, steps: int, label: int | None, batch: int = 256):
    """Seeded samples of a run's student with ``method.sample``: ``(samples, labels, steps)``."""
    from fewstep.seeding import batches, seeded_labels, seeded_noise

    num_classes = method.teacher.num_classes
    if label is not None and not (0 <= label < max(num_classes, 1)):
        raise FewstepError(f"--label must lie in [0, {num_classes - 1}] for this model")
    device = next(method.student.parameters()).device
    xs, ys = [], []
    for chunk in batches(seeds, batch):
        noise = seeded_noise(chunk, method.teacher.sample_shape).to(device)
        y = seeded_labels(chunk, num_classes)
        if y is not None and label is not None:
            y = torch.full_like(y, label)
        xs.append(method.sample(noise, steps, cond=None if y is None else y.to(device)).cpu())
        ys.append(y)
    labels = torch.cat(ys) if ys and ys[0] is not None else None
    return torch.cat(xs), labels, steps


def run_student(args) -> int:
    """The run-directory branch: a distilled student samples with its method's own sampler."""
    from fewstep.train import load_run
    from fewstep.viz import save_samples

    if args.solver is not None or args.guidance != 1.0:
        raise FewstepError(
            "--solver and --guidance apply to teachers; a run's student samples with its method's sampler"
        )
    method = load_run(args.model)
    args.steps = args.steps or method.default_steps[0]
    seeds = range(args.seed, args.seed + args.n)
    x, labels, steps = generate_student(method, seeds, args.steps, args.label, args.batch)
    path = save_samples(x, labels, seeds, args.out)
    print(f"wrote {args.n} samples ({method.name} student, {steps} step(s), step {method.run['step']}) to {path}")
    return 0


def run(args) -> int:
    from fewstep.teachers import load_teacher
    from fewstep.train.rundir import is_run_dir
    from fewstep.viz import save_samples

    if args.steps is not None and args.steps < 1:
        raise FewstepError(f"--steps must be >= 1, got {args.steps}")
    if args.n < 1:
        raise FewstepError(f"-n must be >= 1, got {args.n}")
    if not str(args.out).lower().endswith((".png", ".npz")):
        raise FewstepError(f"--out {args.out}: use a .png (picture) or .npz (raw samples) path")
    if is_run_dir(args.model):
        return run_student(args)
    args.solver, args.steps = args.solver or "heun", args.steps or 18
    model = load_teacher(args.model)
    seeds = range(args.seed, args.seed + args.n)
    x, labels, nfe = generate(model, seeds, args.solver, args.steps, args.label, args.guidance, args.batch)
    path = save_samples(x, labels, seeds, args.out)
    print(f"wrote {args.n} samples ({args.solver}, {nfe} NFE) to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a model to a PNG grid / scatter plot or an .npz file")
    p.add_argument("--model", required=True, help="builtin:digits, builtin:moons, analytic:NAME, or a model/run folder")
    p.add_argument("--solver", default=None, help="euler (=ddim), heun (default), dpmpp_2m, reference; teachers only")
    p.add_argument(
        "--steps", type=int, default=None, help="solver steps (teacher, default 18) or student steps (run folder)"
    )
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="a .png (grid or scatter) or .npz (raw samples and labels) path")
    p.add_argument("--label", type=int, default=None, help="class label for every sample (default: random per seed)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(func=run)
