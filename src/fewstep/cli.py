"""The ``fewstep`` command line.

Each sub-command lives in a module of :mod:`fewstep.commands` that defines
``register(subparsers)``; modules are discovered automatically. A :class:`FewstepError` prints as
one line ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fewstep.errors import FewstepError
from fewstep.version import __version__


def build_parser() -> argparse.ArgumentParser:
    import fewstep.commands as commands

    parser = argparse.ArgumentParser(prog="fewstep", description="Distill diffusion models into 1-4 step generators.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"fewstep.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
