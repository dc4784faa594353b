"""Run the fedmpt Flower apps on Flower's simulation engine, in this process (``fedmpt run``).

Why in-process and not ``flwr run .``: on flwr 1.41, ``flwr run`` against the local simulation federation
starts a managed SuperLink and SuperExec in the background that outlive the command, installs the app's
dependencies per run unless ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, executes a copy of the
package from the FAB (which leaves out non-code files) and needs ``--stream`` to show progress. Driving the
simulation engine here (``flwr.simulation.run_simulation``, Ray backend) uses the installed package, installs
nothing, needs no Flower home directory and leaves no process behind when it returns. Measurements are in
``docs/deployment.md``.

The run config is Flower's: the defaults of :mod:`fedmpt.apps.config` (equal to ``[tool.flwr.app.config]``)
updated with the overrides, validated before the engine starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmpt.apps.config import read_app_config
from fedmpt.errors import ConfigError
from fedmpt.rundir import default_run_name

logger = logging.getLogger("flwr.fedmpt.simulation")

DEFAULT_NUM_SUPERNODES = 5


def shutdown_ray(grace_s: float = 5.0) -> None:
    """Stop the local Ray cluster of this process and every process it started (GCS, raylet, agents, actors).

    ``ray.shutdown()`` alone is not enough when the interrupt came during Ray's start-up: its dashboard and
    runtime-env agents then outlive the driver. So the descendants are listed first, Ray is shut down, and
    whatever still runs gets SIGTERM, then SIGKILL after ``grace_s``.
    """
    import psutil

    try:
        descendants = psutil.Process().children(recursive=True)
    except psutil.Error:  # pragma: no cover
        descendants = []
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        pass
    alive = [p for p in descendants if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, still_alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in still_alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def run_local_simulation(
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int = DEFAULT_NUM_SUPERNODES,
    cpus_per_client: float = 1.0,
) -> Path:
    """Run the federation on ``num_supernodes`` simulated SuperNodes (partition k on node k); returns the run dir.

    A run without ``run-name`` gets a fresh one (timestamp + random suffix) so that its path is known before
    the first round. Raises :class:`~fedmpt.errors.ConfigError` on a bad config before anything starts.
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ConfigError(f"num-supernodes must be an integer >= 1, got {num_supernodes!r}")
    if not cpus_per_client > 0:
        raise ConfigError(f"cpus-per-client must be > 0, got {cpus_per_client!r}")
    fixed = dict(overrides)
    if not fixed.get("run-name"):
        fixed["run-name"] = default_run_name()
    config = read_app_config(fixed)
    if config.federation.min_clients > num_supernodes:
        raise ConfigError(
            f"min-clients={config.federation.min_clients} exceeds num-supernodes={num_supernodes}; "
            "lower min-clients or simulate more SuperNodes"
        )
    path = (config.federation.runs_path / config.federation.run_name).resolve()
    logger.info("fedmpt simulation: %d SuperNodes, run directory %s", num_supernodes, path)

    # Flower sends usage telemetry unless told not to; a privacy-hardened run sends nothing anywhere.
    # (Read when flwr is first imported: effective unless the caller imported flwr already.)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation  # the engine, only when a simulation actually runs

    from fedmpt.apps.client_app import build_client_app
    from fedmpt.apps.server_app import build_server_app

    try:
        run_simulation(
            server_app=build_server_app(fixed),
            client_app=build_client_app(fixed),
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
        )
    except KeyboardInterrupt:
        logger.warning(
            "interrupted; stopping Ray. %s keeps every completed round: continue it with "
            "--run-config 'run-name=\"%s\" resume=true'",
            path,
            config.federation.run_name,
        )
        shutdown_ray()
        raise
    logger.info("fedmpt simulation done: %s", path)
    return path
