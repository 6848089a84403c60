"""``fewstep sample``: draw samples from a teacher (any solver) or from a distilled student (a run
directory, with its method's own sampler) as a PNG grid, scatter or .npz."""

from __future__ import annotations

import torch

from fewstep.errors import FewstepError


def _labels(seeds, num_classes: int, label: int | None):
    """The seeded labels of ``seeds`` (``label`` for all when given), checked."""
    from fewstep.seeding import seeded_labels

    if label is not None and not (0 <= label < max(num_classes, 1)):
        raise FewstepError(f"--label must lie in [0, {num_classes - 1}] for this model")
    y = seeded_labels(list(seeds), num_classes)
    return torch.full_like(y, label) if (y is not None and label is not None) else y


def generate(model, seeds, solver: str, steps: int, label: int | None, guidance: float, batch: int = 256):
    """Seeded samples of a denoiser: returns ``(samples, labels, nfe_per_sample)``."""
    from fewstep.eval.sampling import generate as seeded
    from fewstep.guidance import cfg
    from fewstep.solvers import sample

    if guidance != 1.0 and not model.num_classes:
        raise FewstepError("--guidance needs a class-conditional model; this one has no labels")
    labels = _labels(seeds, model.num_classes, label)
    den = cfg(model, guidance) if model.num_classes else model
    counted = [0]  # evaluations per sample, as counted (the adaptive reference solver has no formula)

    def fn(z, y):
        x, counted[0] = sample(den, z, solver, steps, y)
        return x

    x, _ = seeded(fn, seeds, model.sample_shape, model.num_classes, batch, labels)
    return x, labels, counted[0]


def generate_student(method, seeds, steps: int, label: int | None, batch: int = 256, guidance: float | None = None):
    """Seeded samples of a run's student with ``method.sample``: ``(samples, labels, steps)``; ``guidance``
    goes to a student with a guidance input (``method.guidance_input``)."""
    from fewstep.eval.sampling import generate as seeded

    t = method.teacher
    labels = _labels(seeds, t.num_classes, label)
    device = next(method.student.parameters()).device
    kw = {} if guidance is None else {"guidance": guidance}
    fn = lambda z, y: method.sample(z.to(device), steps, cond=None if y is None else y.to(device), **kw).cpu()  # noqa: E731
    x, _ = seeded(fn, seeds, t.sample_shape, t.num_classes, batch, labels)
    return x, labels, steps


def run_student(args) -> int:
    """The run-directory branch: a distilled student samples with its method's own sampler."""
    from fewstep.runs import load_run
    from fewstep.viz import save_samples

    if args.solver is not None:
        raise FewstepError("--solver applies to teachers; a run's student samples with its method's sampler")
    method = load_run(args.model)
    if args.guidance is not None and not method.guidance_input:
        raise FewstepError(
            f"--guidance: this {method.name} student has no guidance input (it samples at the scale it was "
            "distilled at); drop --guidance, or distil with guided, or lcm/cd with a guidance input"
        )
    args.steps = args.steps or method.default_steps[0]
    seeds = range(args.seed, args.seed + args.n)
    x, labels, steps = generate_student(method, seeds, args.steps, args.label, args.batch, args.guidance)
    path = save_samples(x, labels, seeds, args.out, model=method.teacher)
    print(f"wrote {args.n} samples ({method.name} student, {steps} step(s), step {method.run.step}) to {path}")
    return 0


def run(args) -> int:
    from fewstep.runs.folder import is_run_dir
    from fewstep.teachers import load_teacher
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
    guidance = 1.0 if args.guidance is None else args.guidance
    x, labels, nfe = generate(model, seeds, args.solver, args.steps, args.label, guidance, args.batch)
    path = save_samples(x, labels, seeds, args.out, model=model)
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
    p.add_argument(
        "--guidance", type=float, default=None,
        help="classifier-free guidance scale of a teacher (default 1 = conditional), or the scale a student with "
        "a guidance input (guided; lcm/cd with w input) samples at (default: its own)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(func=run)
