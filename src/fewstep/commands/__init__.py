"""CLI sub-commands, one module each (each defines ``register(subparsers)``), and the data
options every command that reads data shares."""

from __future__ import annotations

import argparse


class Formatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default where there is one (and the help does not say it),
    and the command's description with its example lines as written."""

    def _get_help_string(self, action):
        d, text = action.default, action.help or ""
        if d in (None, False, (), []) or d is argparse.SUPPRESS or "default" in text or action.nargs == 0:
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (tuple, list)) else d
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_data_args(p, data_help: str) -> None:
    """``--data`` with ``--resolution``/``--channels``/``--convert`` for image folders."""
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image size of a folder (default: read from the images; differing needs --convert)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="1 (grey) or 3 (RGB) for a folder (default: read from the images)",
    )
    p.add_argument("--convert", action="store_true",
                   help="resize / convert a folder's images to --resolution/--channels instead of refusing "
                   "images of another size or colour mode")  # fmt: skip


def data_spec(args):
    """The :class:`~fewstep.data.DataSpec` the data options name (``None`` without ``--data``)."""
    from fewstep.data import parse_data
    from fewstep.errors import FewstepError

    if args.data is None:
        if args.resolution is not None or args.channels is not None or args.convert:
            raise FewstepError("--resolution/--channels/--convert describe a data folder; give it with --data")
        return None
    return parse_data(args.data, args.resolution, args.channels, args.convert)
