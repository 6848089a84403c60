"""``fewstep export``: write a run's student for other tools.

    fewstep export runs/x --format diffusers --out exported/x     # a stock diffusers pipeline folder
    fewstep export runs/x --format lora --out exported/x-lora     # LoRA weights (LoRA students)

The run's student must be a diffusers network (a run distilled from a diffusers teacher, see
docs/diffusers.md); fewstep's own EDM networks are refused with the reason.
"""

from __future__ import annotations

from typing import Any

from fewstep.errors import FewstepError

FORMATS = ("diffusers", "lora")


def facts_of(method: Any, run: str) -> dict:
    """What the model card says about a run: teacher, method and its paper, training steps."""
    config = method.run.config
    teacher = config["teacher"].get("spec") or "a teacher object saved in the run"
    options = config["method"].get("options", {})
    return {
        "teacher": teacher,
        "method": f"{method.name} (arXiv {method.paper})" if method.paper else method.name,
        "run": run,
        "training_steps": method.run.step,
        "method_options": options,
    }


def run(args) -> int:
    from fewstep.runs import load_run
    from fewstep.runs.folder import is_run_dir

    if args.format not in FORMATS:
        raise FewstepError(f"--format {args.format!r} is not supported; use one of {', '.join(FORMATS)}")
    if not is_run_dir(args.run):
        raise FewstepError(f"{args.run} is not a fewstep run directory; pass the folder `fewstep distill --out` wrote")
    method = load_run(args.run, checkpoint=args.checkpoint)
    steps = args.steps or max(getattr(method, "default_steps", (4,)))
    guidance = args.guidance
    if guidance is None and getattr(method.config, "guidance", None) is not None:
        guidance = getattr(method.config, "sample_guidance", None)
    facts = facts_of(method, str(args.run))
    if args.format == "lora":
        from fewstep.export.lora import export_lora

        path = export_lora(method.student, args.out, teacher=method.teacher, steps=steps, info=facts)
    else:
        from fewstep.export import export_diffusers

        path = export_diffusers(method.student, args.out, teacher=method.teacher, steps=steps, guidance=guidance,
                                info=facts)  # fmt: skip
    print(f"wrote {args.format} export of {args.run} ({method.name}, {steps} steps) to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run's student (a stock diffusers pipeline or LoRA weights)")
    p.add_argument("run", help="the run directory (fewstep distill --out)")
    p.add_argument("--format", default="diffusers", help="diffusers (a pipeline folder) or lora (LoRA weights)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for the model card (default: the method's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale to recommend (w-embedded students)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint name instead of the newest (step-XXXXXXXX)")
    p.set_defaults(func=run)
