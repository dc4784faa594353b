#!/usr/bin/env python3
"""Run fedmpt on a real Flower deployment on this machine: one SuperLink and N SuperNodes over loopback.

What it does, in order (``docs/deployment.md`` explains each step for a multi-site consortium):

1. makes a CA, the SuperLink's TLS certificate and one EC P-384 authentication key pair per SuperNode
   (``scripts/make_certs.py``) in a private work directory;
2. starts ``flower-superlink`` with TLS and SuperNode authentication (``--enable-supernode-auth``), runtime
   dependency installation off, on a free loopback port;
3. registers each SuperNode's public key with ``flwr supernode register`` (the SuperLink then accepts only
   those SuperNodes);
4. starts N ``flower-supernode`` processes, SuperNode k with ``--node-config "partition-id=k
   num-partitions=N"``, its private key and the CA certificate, and waits until all are online;
5. runs ``flwr run <app> fedmpt-local --stream`` against it, the run config overrides passed through;
6. stops every process it started, and their descendants (SuperExec, ServerApp and ClientApp processes),
   on success, on error and on Ctrl-C: SIGTERM to each process group, then SIGKILL after a grace period.

``FLWR_HOME`` points into the work directory for every process, so the user's ``~/.flwr`` is untouched;
Flower's telemetry is switched off (``FLWR_TELEMETRY_ENABLED=0``).

Usage: ``python scripts/deploy_local.py [--supernodes 3] [--work-dir DIR] [--run-config "k=v ..."]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_certs  # noqa: E402  (a sibling script, not a package)

logger = logging.getLogger("deploy_local")

CONNECTION = "fedmpt-local"
STOP_GRACE_S = 10.0
READY_TIMEOUT_S = 90.0


class DeploymentError(RuntimeError):
    """A process of the deployment failed to start or to become ready (the message says which, and its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bind to port 0 and read back the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """The console script ``name`` next to this Python interpreter (the project's venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"cannot find the {name!r} executable next to {sys.executable} or on PATH")
    return found


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[Any]
    log_path: Path
    descendants: set[int] = field(default_factory=set)

    def refresh_descendants(self) -> None:
        """Remember descendants now: once the parent dies, orphans are re-parented and cannot be found."""
        with contextlib.suppress(psutil.Error):
            self.descendants |= {c.pid for c in psutil.Process(self.popen.pid).children(recursive=True)}

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "<no log>"


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes with TLS and SuperNode authentication on loopback.

    Use as a context manager (``with LocalDeployment(...) as d: d.run_app(...)``): every process is stopped
    on exit, whatever happened.
    """

    work_dir: Path
    num_supernodes: int = 3
    app_dir: Path = Path(".")
    processes: list[_Proc] = field(default_factory=list)
    supernodes: dict[int, _Proc] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)
    port: int = 0

    def __post_init__(self) -> None:
        if self.num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {self.num_supernodes}")
        self.work_dir = self.work_dir.resolve()
        self.app_dir = self.app_dir.resolve()
        self.certs = self.work_dir / "certs"
        self.logs = self.work_dir / "logs"
        self.flwr_home = self.work_dir / "flwr-home"

    # ------------------------------------------------------------------------------------- environment

    def env(self) -> dict[str, str]:
        """The environment of every process: private FLWR_HOME, no telemetry, no runtime installs."""
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1",
                # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name from PATH
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            }
        )
        return env

    def _spawn(self, name: str, argv: Sequence[str]) -> _Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.app_dir,
                start_new_session=True,  # its own process group, so that we can signal the whole group
            )
        proc = _Proc(name, popen, log_path)
        self.processes.append(proc)
        logger.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return proc

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("flwr"), *args],
            env=self.env(),
            cwd=self.app_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # ------------------------------------------------------------------------------------------ start

    def start(self) -> None:
        """Certificates, SuperLink, registration, SuperNodes; returns when every SuperNode is online."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        make_certs.make_all(self.certs, self.num_supernodes, make_certs.DEFAULT_SANS, days=2)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        superlink = self._spawn(
            "superlink",
            [
                _bin("flower-superlink"),
                "--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "superlink.crt"),
                "--ssl-keyfile", str(self.certs / "superlink.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--database", str(self.work_dir / "superlink-state.db"),
            ],
        )  # fmt: skip
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self._wait_for_port(superlink)
        for k in range(self.num_supernodes):
            self.node_ids[k] = self._register(k)
        for k in range(self.num_supernodes):
            self.supernodes[k] = self._spawn(
                f"supernode-{k}",
                [
                    _bin("flower-supernode"),
                    "--superlink", f"127.0.0.1:{self.port}",
                    "--root-certificates", str(self.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(self.certs / f"supernode-{k}.key"),
                    "--node-config", f"partition-id={k} num-partitions={self.num_supernodes}",
                    "--host", "127.0.0.1",
                    "--port", str(free_port()),
                ],
            )  # fmt: skip
        self._wait_online(set(self.node_ids.values()))
        for proc in self.processes:
            proc.refresh_descendants()

    def _wait_for_port(self, proc: _Proc) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise DeploymentError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.3)
        raise DeploymentError(f"{proc.name} not listening on {self.port} after {READY_TIMEOUT_S:.0f} s")

    def _register(self, k: int) -> int:
        result = self._flwr(
            "supernode", "register", str(self.certs / f"supernode-{k}.pub"), CONNECTION, "--format", "json"
        )
        try:
            payload = json.loads(result.stdout)
            return int(payload["node-id"])
        except (ValueError, KeyError, TypeError) as err:
            raise DeploymentError(
                f"registering supernode-{k} failed (exit {result.returncode}): {result.stdout} {result.stderr}"
            ) from err

    def node_status(self) -> dict[int, str]:
        """node id -> status ("registered", "online", "offline", ...) as the SuperLink reports it."""
        result = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return {int(n["node-id"]): str(n["status"]) for n in json.loads(result.stdout)["nodes"]}
        except (ValueError, KeyError, TypeError) as err:
            raise DeploymentError(f"cannot list SuperNodes: {result.stdout} {result.stderr}") from err

    def _wait_online(self, node_ids: set[int]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            for proc in self.supernodes.values():
                if proc.popen.poll() is not None:
                    raise DeploymentError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            status = self.node_status()
            if all(status.get(n) == "online" for n in node_ids):
                logger.info("all %d SuperNodes online", len(node_ids))
                return
            time.sleep(1.0)
        raise DeploymentError(f"SuperNodes not online after {READY_TIMEOUT_S:.0f} s: {status}")

    # -------------------------------------------------------------------------------------------- run

    def start_run(self, run_config: Sequence[str] = ()) -> subprocess.Popen[str]:
        """Start ``flwr run <app> fedmpt-local --stream`` (with ``--run-config`` items); output is piped."""
        argv = [_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        for item in run_config:
            argv += ["--run-config", item]
        popen = subprocess.Popen(
            argv,
            env=self.env(),
            cwd=self.app_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.processes.append(_Proc("flwr-run", popen, self.logs / "flwr-run.log"))
        return popen

    def kill_supernode(self, k: int) -> None:
        """Kill SuperNode k and its descendants at once (SIGKILL), as a crashed site would vanish."""
        proc = self.supernodes[k]
        proc.refresh_descendants()
        _signal_all(proc, signal.SIGKILL)
        proc.popen.wait(timeout=STOP_GRACE_S)
        logger.info("killed %s (node id %d)", proc.name, self.node_ids[k])

    # ------------------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Stop every process (SuperNodes and runs first, the SuperLink last) and all their descendants."""
        for proc in self.processes:
            proc.refresh_descendants()
        for proc in reversed(self.processes):
            _signal_all(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in reversed(self.processes):
            _signal_all(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        leftovers = self.leftover_pids()
        if leftovers:
            logger.warning("processes still alive after stop: %s", sorted(leftovers))

    def leftover_pids(self) -> set[int]:
        """Pids of started processes or their remembered descendants that are still running (not zombies)."""
        alive = set()
        for proc in self.processes:
            for pid in {proc.popen.pid} | proc.descendants:
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.add(pid)
        return alive

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_all(proc: _Proc, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of ``proc`` and to every remembered descendant (own groups too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, sig)
    for pid in proc.descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """Turn the first SIGTERM/SIGHUP into SystemExit so that ``finally`` blocks stop the deployment.

    Later ones are ignored: a second signal (``timeout`` and ``pkill`` both sending one, say) must not cut the
    cleanup short and leave SuperNodes running.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_EXIT_CODE = re.compile(r"ERROR\b.*\bExit Code: (\d+)")


def serverapp_exit_code(line: str) -> int:
    """Flower's exit code from a streamed ``flwr run`` line such as ``ERROR : Exit Code: 201``, else 0.

    ``flwr run --stream`` (flwr 1.41) exits 0 even when the ServerApp raised; the log stream is where the
    failure shows.
    """
    match = _EXIT_CODE.search(line)
    return int(match.group(1)) if match else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument("--work-dir", type=Path, help="certificates, logs, FLWR_HOME (default: a temp dir)")
    parser.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (default .)")
    parser.add_argument("--run-config", action="append", default=[], help='"key=value ..." or a .toml file; repeatable')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deploy_local: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fedmpt-deploy-"))
    print(f"work directory (certificates, logs, FLWR_HOME): {work_dir}", flush=True)
    with _terminate_on_signals():
        try:
            with LocalDeployment(work_dir, args.supernodes, args.app) as deployment:
                run = deployment.start_run(args.run_config)
                app_exit = 0
                for line in run.stdout or ():
                    print(line, end="", flush=True)
                    app_exit = app_exit or serverapp_exit_code(line)
                code = run.wait()
                if code == 0 and app_exit:
                    print(f"deploy_local: the ServerApp failed (Flower exit code {app_exit})", file=sys.stderr)
                    return app_exit
                return code
        except DeploymentError as err:
            print(f"deploy_local: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("deploy_local: interrupted; all processes stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
