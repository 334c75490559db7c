"""The ``deepssm`` command. Each subcommand lives in ``DeepSSMLogic.commands.<name>`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this module only dispatches and turns
:class:`DeepSSMError` into one readable line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import CancelledError, DeepSSMError

COMMANDS = ("synth", "validate", "augment", "train", "predict", "evaluate", "analyze", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepssm",
        description="DeepSSM: predict dense 3D correspondences (a statistical shape model) straight from images.",
        epilog="Run `deepssm COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"deepssm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{name}"):
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    try:
        return int(args.run(args) or 0)
    except CancelledError as e:
        print(f"deepssm {args.command}: {e}", file=sys.stderr)
        return 130
    except DeepSSMError as e:
        print(f"deepssm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepssm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
