"""``fewstep teacher train``: train a teacher with the EDM loss and save it as safetensors + JSON."""

from __future__ import annotations

import json
from pathlib import Path

from fewstep.errors import FewstepError


def run_train(args) -> int:
    from fewstep.data import load_dataset
    from fewstep.teachers.train import TeacherConfig, train_teacher

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FewstepError(f"{out} already exists and is not empty; pick another --out or pass --overwrite")
    data = load_dataset(args.data, args.resolution, args.channels)
    arch = args.arch or ("unet" if len(data.sample_shape) == 3 else "mlp")
    net = json.loads(args.net) if args.net else {}
    if args.steps < 1:
        raise FewstepError(f"--steps must be >= 1, got {args.steps}")
    cfg = TeacherConfig(
        arch=arch,
        net=net,
        batch=args.batch,
        lr=args.lr,
        max_steps=args.steps,
        minutes=args.minutes,
        label_dropout=args.label_dropout,
        ema_halflife_kimg=args.ema_halflife_kimg,
        seed=args.seed,
    )
    train_teacher(data, cfg, out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("teacher", help="train a teacher diffusion model")
    tsub = p.add_subparsers(dest="teacher_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser("train", help="train a teacher with the EDM loss")
    t.add_argument("--data", required=True, help="digits, moons, gaussians8, checkerboard, or an image folder")
    t.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    t.add_argument("--resolution", type=int, default=None, help="image size for an image folder")
    t.add_argument("--channels", type=int, default=None, help="1 (grey) or 3 (RGB) for an image folder")
    t.add_argument("--arch", choices=("unet", "mlp"), default=None, help="default: unet for images, mlp for vectors")
    t.add_argument("--net", default=None, help="architecture options as JSON, e.g. '{\"channels\": 32}'")
    t.add_argument("--steps", type=int, default=10000)
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (stops at whichever ends first)")
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--label-dropout", type=float, default=0.1)
    t.add_argument("--ema-halflife-kimg", type=float, default=100.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=run_train)
