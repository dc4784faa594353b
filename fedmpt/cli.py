"""The ``fedmpt`` command line: one entry point, one sub-command per module in ``fedmpt.commands``.

Each module of :mod:`fedmpt.commands` exposes ``register(subparsers) -> None``, which adds its sub-command and
sets ``func`` (a callable taking the parsed namespace and returning an exit code) as a parser default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from fedmpt import __version__
from fedmpt.errors import FedMPTError


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every sub-command found in :mod:`fedmpt.commands`."""
    parser = argparse.ArgumentParser(prog="fedmpt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedmpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import fedmpt.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"fedmpt.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedmpt`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own loggers speak at INFO; dependencies (open_clip logs at INFO on the root logger) only warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("fedmpt", "privacy", "secagg"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except FedMPTError as err:
        print(f"fedmpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
