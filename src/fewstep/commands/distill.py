"""``fewstep distill``: distill a teacher with a method into a run directory.

    fewstep distill --teacher builtin:digits --method denoise --out runs/x --max-steps 2000
    fewstep distill --out runs/x --resume                 # continue from the newest checkpoint
    fewstep distill ... --set lr=1e-4 --set ema_decay=0.99 --dry-run   # print the resolved config
    fewstep distill --teacher builtin:digits --method dmd2 --init runs/kd --out runs/kd-dmd2   # a chain
    fewstep distill --teacher builtin:digits --method cd --student-net quarter --out runs/cd-q   # a smaller student
    fewstep distill --teacher analytic:image --method dmd --out runs/dmd-a    # the analytic teacher's default net
    fewstep distill --teacher builtin:digits --method cd --lora-rank 16 --out runs/cd-lora

Method options are the fields of the method's ``Config`` (``--set key=value`` or ``options:`` in a
``--config`` YAML file); engine options are the fields of :class:`fewstep.train.TrainConfig`.
Precedence: the config file, then flags, then ``--set``.
"""

from __future__ import annotations

import json
import sys

from fewstep.commands import Formatter, add_data_args


def run(args) -> int:
    from fewstep.commands import data_spec
    from fewstep.train import TrainingInterrupted
    from fewstep.train.api import execute, plan_run
    from fewstep.train.config import Sources, parse_sets, read_config_file

    file = read_config_file(args.config) if args.config else {}
    spec = data_spec(args)
    flags = {
        "teacher": args.teacher,
        "method": args.method,
        "data": spec.to_dict() if spec is not None else None,
        "max_steps": args.max_steps,
        "minutes": args.minutes,
        "seed": args.seed,
        "batch": args.batch,
        "checkpoint_every": args.checkpoint_every,
        "init": args.init,
        "snapshot_minutes": args.snapshot_minutes,
        "student_net": args.student_net,
        "lora_rank": args.lora_rank,
        "warmup_minutes": args.warmup_minutes,
        "warmup_steps": args.warmup_steps,
    }
    out = args.out or file.pop("out", None)
    plan = plan_run(Sources(file, flags, parse_sets(args.set)), out, resume=args.resume, overwrite=args.overwrite)
    if args.dry_run:
        print(json.dumps(plan.config(), indent=2))
        return 0
    c = plan.cfg
    budget = " and ".join(b for b in (c.max_steps and f"{c.max_steps} steps", c.minutes and f"{c.minutes:g} min") if b)
    verb = "resuming" if plan.resume else "distilling"
    print(f"{verb} {plan.method_cls.name} into {plan.out} (budget: {budget}); metrics in {plan.out}/metrics.jsonl",
          flush=True)  # fmt: skip
    try:
        method = execute(plan, eval_hook=default_eval_hook())
    except TrainingInterrupted as e:
        print(e.message, file=sys.stderr)
        return 128 + int(e.signum)
    leave_process_group()  # after a finished run only: a failed process must not wait at a barrier
    s = method.run.summary
    print(f"{method.name}: {s['step']} steps in {s['minutes']:.1f} min (stopped by {s['stopped_by']}, "
          f"{s['nonfinite']} non-finite skipped); student in {plan.out}/student")  # fmt: skip
    return 0


def default_eval_hook():
    """``fewstep.eval.training_hook`` if the evaluation package provides one, else ``None`` (the
    command line sits above both the engine and evaluation, so it connects them)."""
    import fewstep.eval as ev

    return getattr(ev, "training_hook", None)


def leave_process_group() -> None:
    """Under a multi-process launch, leave together and close the process group: a process that
    exits with gloo's threads still running can abort ("terminate called without an active
    exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher into a few-step student (a run directory)",
                       formatter_class=Formatter)  # fmt: skip
    p.add_argument("--teacher", help="builtin:digits, analytic:gaussians8, a model folder or a teacher run")
    p.add_argument("--method", help="a method name (`fewstep methods` lists them)")
    p.add_argument("--out", help="run directory, e.g. runs/x")
    add_data_args(p, "data for methods that need it (default: what the teacher was trained on)")
    p.add_argument(
        "--init",
        metavar="RUN",
        help="start the student from this run's student (a chain: "
        "--method dmd2 --init runs/kd); the report counts the whole chain's minutes",
    )
    p.add_argument(
        "--snapshot-minutes",
        metavar="M,M,...",
        default=None,
        help="also keep a checkpoint at these minutes of training (for quality-vs-time curves)",
    )
    p.add_argument(
        "--student-net",
        metavar="NET",
        help="a student that is not a teacher copy: half, quarter (of the teacher's parameters) or network "
        "options as JSON, e.g. '{\"channels\": 16}'; methods that start at the teacher first warm it up "
        "with compress into OUT.warmup",
    )
    p.add_argument("--warmup-minutes", type=float, default=None, help="the warm-up's budget (default: a quarter)")
    p.add_argument("--warmup-steps", type=int, default=None, help="the warm-up's iterations (default: a quarter)")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (peft) instead")
    p.add_argument("--max-steps", type=int, default=None, help="iterations to train (default 1000)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (stops at whichever ends first)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--batch", type=int, default=None, help="global batch per iteration (default 64)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="iterations between checkpoints (default 500)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("--config", help="YAML/JSON file of options (method options under 'options:')")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an engine or method option (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=run)
