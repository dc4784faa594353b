"""``fedmpt run``: the federated run on Flower's simulation engine, in this process (the main command).

``fedmpt run [--run-config "k=v k2=v2" | --run-config experiments/conf/<file>.toml] [--num-supernodes N]``
runs the Flower ServerApp and ClientApp of :mod:`fedmpt.apps` on N simulated SuperNodes (default 5), prints
the run directory at the start and the end and a progress line per round, and leaves no process behind. The
run-config keys and their defaults are those of ``[tool.flwr.app.config]`` in ``pyproject.toml``; the same
overrides work with ``flwr run .``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

# fedmpt.apps imports flwr (and Ray when the simulation starts); import it only when this command runs.


def _run(args: argparse.Namespace) -> int:
    from fedmpt.apps.config import parse_run_config_overrides
    from fedmpt.apps.simulation import run_local_simulation

    overrides = parse_run_config_overrides(args.run_config or [])
    # Flower's logger has its own console handler; stop it from also reaching the CLI's root handler.
    logging.getLogger("flwr").propagate = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        path = run_local_simulation(overrides, num_supernodes=args.num_supernodes, cpus_per_client=args.cpus_per_client)
    except KeyboardInterrupt:
        # Ray is stopped by now; Flower's ServerApp thread is not a daemon and would keep the interpreter
        # waiting for its message timeouts, so leave at once. Every file of the run directory is written
        # atomically, so nothing is left half-written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"run directory: {path}")
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM takes the same path as Ctrl-C: stop Ray, then exit."""
    raise KeyboardInterrupt


def register(subparsers: Any) -> None:
    """Add the ``run`` sub-command."""
    parser = subparsers.add_parser(
        "run",
        help="run the federation on Flower's simulation engine (in-process)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        metavar="OVERRIDES",
        help='run-config overrides: "key=value key2=value2" (TOML values) or a .toml file; repeatable',
    )
    parser.add_argument("--num-supernodes", type=int, default=5, help="simulated SuperNodes (default 5)")
    parser.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="CPU cores Ray reserves per client (default 1)"
    )
    parser.set_defaults(func=_run)
