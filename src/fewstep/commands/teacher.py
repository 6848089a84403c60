"""``fewstep teacher train``: train a teacher from scratch (the EDM loss) into a run folder.

    fewstep teacher train --data digits --out runs/teacher --minutes 20
    fewstep teacher train --data ~/my_images --out runs/teacher --minutes 20   # a folder of images
    fewstep teacher train --out runs/teacher --resume --minutes 10            # train it further

The run folder holds checkpoints, metrics.jsonl and sample grids; its ``student/`` is the
teacher, and ``--teacher runs/teacher`` (or ``runs/teacher/student``) uses it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewstep.commands import Formatter, add_data_args, data_spec
from fewstep.errors import FewstepError


def run_train(args) -> int:
    from fewstep.data import load_dataset
    from fewstep.train.teacher import TeacherOptions, train_teacher

    try:
        net = json.loads(args.net) if args.net else {}
    except json.JSONDecodeError:
        raise FewstepError(f"--net must be a JSON object, e.g. '{{\"channels\": 32}}', got {args.net!r}") from None
    if args.steps is not None and args.steps < 1:
        raise FewstepError(f"--steps must be >= 1, got {args.steps}")
    if args.resume and (args.data or args.net or args.arch):
        raise FewstepError("--resume continues the run with its own data and network; drop --data/--net/--arch")
    spec = data_spec(args)
    if spec is None and not args.resume:
        raise FewstepError("give the data to train on: --data digits, moons, or a folder of images")
    if args.arch == "sd":
        return _train_sd(args, spec, net)
    options = TeacherOptions(
        arch=args.arch, net=net, batch=args.batch, lr=args.lr, max_steps=args.steps, minutes=args.minutes,
        label_dropout=args.label_dropout, ema_halflife_kimg=args.ema_halflife_kimg, ema_rampup=args.ema_rampup,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
    )  # fmt: skip
    data = load_dataset(spec) if spec is not None else None
    if data is not None:
        print(f"training a teacher on {data.name} ({len(data)} samples of shape {list(data.sample_shape)}, "
              f"{data.num_classes} classes) into {args.out}", flush=True)  # fmt: skip
    teacher = train_teacher(data, args.out, options, resume=args.resume, overwrite=args.overwrite)
    info = teacher.info
    print(f"teacher: {args.out}/student ({info.get('step')} steps, {info.get('minutes', 0):.1f} min; "
          f"use it with --teacher {args.out})")  # fmt: skip
    return 0


def _train_sd(args, spec, net: dict) -> int:
    """``--arch sd``: a latent text-to-image pipeline folder (VAE, CLIP text encoder, UNet)."""
    from fewstep.data import load_dataset
    from fewstep.train.latent_teacher import LatentTeacherOptions, train_latent_teacher

    if args.resume or net:
        raise FewstepError(
            "--arch sd trains with its own sizes and cannot --resume; continue a pipeline with --init FOLDER"
        )
    options = LatentTeacherOptions(
        minutes=args.minutes, steps=args.steps, batch=args.batch or 128, lr=args.lr if args.lr_given else 5e-4,
        empty_prompts=args.label_dropout, seed=args.seed, init=args.init,
    )  # fmt: skip
    if Path(args.out).exists() and not args.overwrite:
        raise FewstepError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out")
    data = load_dataset(spec)
    print(f"training a latent text-to-image teacher on {data.name} ({len(data)} images of shape "
          f"{list(data.sample_shape)}, {data.num_classes} classes) into {args.out}", flush=True)  # fmt: skip
    train_latent_teacher(data, args.out, options, overwrite=args.overwrite)
    print(f"teacher: {args.out} (a StableDiffusionPipeline folder; use it with --teacher {args.out})")
    return 0


class _Given(argparse.Action):
    """Store the value and note that it was given (``--arch sd`` has its own default learning rate)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.lr_given = True


def register(sub) -> None:
    p = sub.add_parser("teacher", help="train a teacher diffusion model")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser("train", help="train a teacher from scratch with the EDM loss", formatter_class=Formatter,
                        description=__doc__.split("\n\n", 1)[1])  # fmt: skip
    add_data_args(t, "digits, moons, gaussians8, checkerboard, or a folder of images (PATH, PATH:all)")
    t.add_argument("--out", required=True, help="the teacher's run folder")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (stops at whichever ends first)")
    t.add_argument("--steps", type=int, default=None, help="iteration budget")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    t.add_argument("--init", default=None, help="--arch sd: train the UNet of this pipeline folder further (new --out)")
    t.add_argument(
        "--arch", choices=("unet", "mlp", "sd"), default=None,
        help="default: unet for images, mlp for vectors; sd: a latent text-to-image diffusers pipeline "
        "(VAE + CLIP text encoder + UNet; captions from the classes)",
    )  # fmt: skip
    t.add_argument(
        "--net",
        default=None,
        help="network options as JSON over the preset for the data's shape, e.g. '{\"channels\": 64}'",
    )
    t.add_argument("--batch", type=int, default=None, help="default: the preset's (256 at 8 px, 128 to 32 px)")
    t.add_argument("--lr", type=float, default=2e-3, action=_Given,
                   help="Adam learning rate after the warm-up (--arch sd: 5e-4 unless given)")  # fmt: skip
    t.add_argument("--label-dropout", type=float, default=0.1, help="null-label (sd: empty-prompt) rate, for guidance")
    t.add_argument("--ema-halflife-kimg", type=float, default=500.0, help="EDM's EMA half-life, in 1000 images")
    t.add_argument("--ema-rampup", type=float, default=0.05, help="the half-life never exceeds this x images seen")
    t.add_argument("--checkpoint-every", type=int, default=200, help="iterations between checkpoints and grids")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.set_defaults(func=run_train, lr_given=False)
