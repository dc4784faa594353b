"""A self-describing run directory: resolved config, environment, per-round metrics, checkpoints, resume.

Layout of ``<root>/<run-name>/``::

    config.json                      the resolved run config (sorted keys) and its sha256
    environment.json                 python, platform, package versions, git revision (+ dirty flag), seed
    metrics.jsonl                    one JSON object per completed round (see :class:`RoundRecord`)
    checkpoints/round_0001.safetensors   trainable state after each completed round
    final.safetensors                trainable state when the run finished
    state.json                       last completed round, the RNG state to continue from, finished flag

Crash consistency: every file except ``metrics.jsonl`` is written to a temporary file, fsynced and moved into
place with ``os.replace`` (atomic on POSIX). A round is *completed* when ``state.json`` says so; it is written
last (checkpoint, then the metrics line with fsync, then the state). A crash between the metrics line and the
state leaves a metrics line for an uncompleted round; :meth:`RunDirectory.resume` drops such lines, so the
directory always describes exactly the completed rounds.

Checkpoints are safetensors (loading cannot execute code, unlike pickle) with metadata ``round`` and
``config_sha256``; a checkpoint made under another config is refused on resume.

This module never imports ``flwr``: the Flower apps hand it plain numpy arrays and dicts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_save

from fedmpt.errors import ConfigError, RunDirectoryError

logger = logging.getLogger(__name__)

RUN_FORMAT = "fedmpt-run"
RUN_FORMAT_VERSION = 1
DEFAULT_RUNS_ROOT = Path("runs")
ENVIRONMENT_PACKAGES = ("torch", "flwr", "opacus", "tenseal", "open_clip_torch", "numpy", "fedmpt")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_GIT_TIMEOUT_S = 5.0

JSONValue = Any  # what ``json.dumps`` accepts; kept loose on purpose (nested dicts/lists of scalars)


class RunFile(StrEnum):
    """File names inside a run directory."""

    CONFIG = "config.json"
    ENVIRONMENT = "environment.json"
    METRICS = "metrics.jsonl"
    STATE = "state.json"
    FINAL = "final.safetensors"
    CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class ClientFailure:
    """A sampled client that did not contribute to a round: its node id, partition (if known) and why."""

    node_id: int
    reason: str
    client_id: int | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {"node_id": int(self.node_id), "client_id": self.client_id, "reason": self.reason}


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``: what happened in one federated round.

    ``clients_sampled``/``clients_replied`` are client (partition) ids; ``clients_failed`` lists every sampled
    client that errored or timed out (never silently dropped); ``bytes_down`` is the serialized size of the
    arrays the server sent, ``bytes_up`` what came back; ``global_metrics`` (written as ``global``) are
    evaluated on the global test split, ``clients`` maps a client id to its metrics on its own split.
    ``epsilon`` stays ``None`` until the privacy ledger fills it; ``extra`` holds anything else
    (e.g. ``status``).
    """

    round: int
    wall_time_s: float
    clients_sampled: tuple[int, ...]
    clients_replied: tuple[int, ...]
    clients_failed: tuple[ClientFailure, ...]
    bytes_down: int
    bytes_up: int
    global_metrics: Mapping[str, float]
    clients: Mapping[str, Mapping[str, float]]
    epsilon: float | Mapping[str, JSONValue] | None = None  # per-client object of fedmpt.apps.privacy_hooks
    extra: Mapping[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            raise ConfigError(f"RoundRecord.round must be an integer >= 1, got {self.round!r}")
        if self.wall_time_s < 0:
            raise ConfigError(f"RoundRecord.wall_time_s must be >= 0, got {self.wall_time_s!r}")
        if self.bytes_down < 0 or self.bytes_up < 0:
            raise ConfigError(f"RoundRecord bytes must be >= 0, got down={self.bytes_down} up={self.bytes_up}")
        overlap = set(self.extra) & _RECORD_KEYS
        if overlap:
            raise ConfigError(f"RoundRecord.extra may not redefine the keys {sorted(overlap)}")

    def to_json(self) -> dict[str, JSONValue]:
        """The JSON object written to ``metrics.jsonl`` (key ``global`` for :attr:`global_metrics`)."""
        return {
            "round": self.round,
            "wall_time_s": float(self.wall_time_s),
            "clients_sampled": [int(c) for c in self.clients_sampled],
            "clients_replied": [int(c) for c in self.clients_replied],
            "clients_failed": [f.to_json() for f in self.clients_failed],
            "bytes_down": int(self.bytes_down),
            "bytes_up": int(self.bytes_up),
            "global": {k: _json_float(v) for k, v in self.global_metrics.items()},
            "clients": {str(k): {m: _json_float(v) for m, v in ms.items()} for k, ms in self.clients.items()},
            "epsilon": _epsilon_json(self.epsilon),
            **dict(self.extra),
        }


def _epsilon_json(value: float | Mapping[str, JSONValue] | None) -> JSONValue:
    """The round's ``epsilon``: null without DP, a number, or the per-client object (copied as a dict)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    return float(value)


def _json_float(value: float) -> float | None:
    """``value`` as a float, or ``None`` (JSON null) if not finite (e.g. mAP of a split without positives)."""
    number = float(value)
    return number if math.isfinite(number) else None


_RECORD_KEYS = frozenset(
    {
        "round",
        "wall_time_s",
        "clients_sampled",
        "clients_replied",
        "clients_failed",
        "bytes_down",
        "bytes_up",
        "global",
        "clients",
        "epsilon",
    }
)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run stands: the last completed round, its trainable state, metrics so far, and RNG state.

    ``round == 0`` means nothing was completed yet (``arrays`` is then ``None``).
    """

    round: int
    arrays: dict[str, NDArray[Any]] | None
    metrics: tuple[dict[str, JSONValue], ...]
    rng_state: dict[str, JSONValue] | None
    finished: bool


def config_sha256(config: Mapping[str, JSONValue]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace): the config's identity."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def default_run_name(now: dt.datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: UTC timestamp plus 6 random hex digits (``secrets``)."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe single path component (letters, digits, ``._-``, <= 128 chars)."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in {".", ".."}:
        raise ConfigError(
            f"run name must be 1-128 characters of letters, digits, '.', '_' or '-' (not starting with "
            f"'.', '_' or '-'), got {name!r}"
        )
    return name


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem supports fsync on a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same directory, fsync, ``os.replace``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _atomic_write_json(path: Path, obj: JSONValue) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RunDirectoryError(f"{path} is missing") from err
    except json.JSONDecodeError as err:
        raise RunDirectoryError(f"{path} is not valid JSON: {err}") from err


def _git_revision(start: Path) -> tuple[str | None, bool | None]:
    """(commit sha, dirty flag) of the git work tree containing ``start``, or (None, None) without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=start,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def environment_record(seed: int, *, include_hostname: bool = False) -> dict[str, JSONValue]:
    """What produced a run: python, platform, versions of :data:`ENVIRONMENT_PACKAGES`, git revision, seed.

    The hostname is left out unless asked for (it can identify a site in a consortium).
    """
    versions: dict[str, str | None] = {}
    for package in ENVIRONMENT_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    revision, dirty = _git_revision(Path(__file__).resolve().parent)
    record: dict[str, JSONValue] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": revision,
        "git_dirty": dirty,
        "seed": int(seed),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if include_hostname:
        record["hostname"] = socket.gethostname()
    return record


def _check_arrays(arrays: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    if not arrays:
        raise ConfigError("a checkpoint needs at least one array, got an empty mapping")
    out: dict[str, NDArray[Any]] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"checkpoint array names must be non-empty strings, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise ConfigError(f"checkpoint array {name!r} must be a numpy array, got {type(value).__name__}")
        out[name] = np.ascontiguousarray(value)
    return out


class RunDirectory:
    """One run's directory; create it with :meth:`create` (new run) or :meth:`open` (resume).

    Not safe for concurrent writers: one server process owns a run directory.
    """

    def __init__(self, path: Path, config: Mapping[str, JSONValue], seed: int) -> None:
        self.path = path
        self.config: dict[str, JSONValue] = dict(config)
        self.config_sha256 = config_sha256(self.config)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"RunDirectory(path={str(self.path)!r}, config_sha256={self.config_sha256[:12]!r})"

    # ------------------------------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        config: Mapping[str, JSONValue],
        seed: int,
        *,
        root: Path | str = DEFAULT_RUNS_ROOT,
        name: str | None = None,
        include_hostname: bool = False,
    ) -> RunDirectory:
        """Make ``<root>/<name>/`` for a new run; write ``config.json``, ``environment.json``, ``state.json``.

        Raises:
            ConfigError: bad run name or a config that is not JSON-serializable.
            RunDirectoryError: the directory already holds a run (resume it with :meth:`open`).
        """
        run_name = check_run_name(name) if name is not None else default_run_name()
        path = Path(root) / run_name
        if path.exists() and any(path.iterdir()):
            raise RunDirectoryError(
                f"run directory {path} already exists and is not empty; pick another run name or resume it"
            )
        try:
            sha = config_sha256(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config is not JSON-serializable: {err}") from err
        (path / RunFile.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        run = cls(path, config, seed)
        _atomic_write_json(
            path / RunFile.CONFIG,
            {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "config_sha256": sha, "config": run.config},
        )
        _atomic_write_json(path / RunFile.ENVIRONMENT, environment_record(seed, include_hostname=include_hostname))
        run._write_state(last_round=0, rng_state=None, finished=False)
        (path / RunFile.METRICS).touch()
        logger.info("run directory %s created", path)
        return run

    @classmethod
    def open(cls, path: Path | str, config: Mapping[str, JSONValue] | None = None) -> RunDirectory:
        """Open an existing run directory to resume it; ``config``, if given, must equal the stored one.

        Raises:
            RunDirectoryError: missing or malformed files, or a config that differs from the stored one.
        """
        run_path = Path(path)
        stored = _read_json(run_path / RunFile.CONFIG)
        if not isinstance(stored, dict) or stored.get("format") != RUN_FORMAT or "config" not in stored:
            raise RunDirectoryError(f"{run_path / RunFile.CONFIG} is not a {RUN_FORMAT} config file")
        if stored.get("version") != RUN_FORMAT_VERSION:
            raise RunDirectoryError(
                f"{run_path} has run format version {stored.get('version')!r}, this code reads {RUN_FORMAT_VERSION}"
            )
        if config is not None and config_sha256(config) != stored["config_sha256"]:
            differing = sorted(
                k
                for k in set(stored["config"]) | set(config)
                if stored["config"].get(k, "<absent>") != config.get(k, "<absent>")
            )
            raise RunDirectoryError(
                f"cannot resume {run_path}: the run config differs from the stored one in keys {differing}"
            )
        environment = _read_json(run_path / RunFile.ENVIRONMENT)
        return cls(run_path, stored["config"], int(environment.get("seed", 0)))

    @classmethod
    def create_or_resume(
        cls,
        config: Mapping[str, JSONValue],
        seed: int,
        *,
        root: Path | str = DEFAULT_RUNS_ROOT,
        name: str | None = None,
        resume: bool = False,
    ) -> RunDirectory:
        """:meth:`open` ``<root>/<name>`` when ``resume`` and it exists, else :meth:`create` it."""
        if resume:
            if name is None:
                raise ConfigError("resuming needs the run name of the directory to continue")
            path = Path(root) / check_run_name(name)
            if (path / RunFile.CONFIG).exists():
                return cls.open(path, config)
        return cls.create(config, seed, root=root, name=name)

    # ------------------------------------------------------------------------------------------- writing

    def checkpoint_path(self, server_round: int) -> Path:
        """``checkpoints/round_XXXX.safetensors`` of round ``server_round``."""
        return self.path / RunFile.CHECKPOINTS / f"round_{server_round:04d}.safetensors"

    def _save_arrays(self, path: Path, arrays: Mapping[str, NDArray[Any]], server_round: int) -> None:
        metadata = {"round": str(server_round), "config_sha256": self.config_sha256, "format": RUN_FORMAT}
        atomic_write_bytes(path, safetensors_save(_check_arrays(arrays), metadata=metadata))

    def _write_state(self, *, last_round: int, rng_state: Mapping[str, JSONValue] | None, finished: bool) -> None:
        _atomic_write_json(
            self.path / RunFile.STATE,
            {
                "last_completed_round": int(last_round),
                "rng_state": None if rng_state is None else dict(rng_state),
                "finished": bool(finished),
                "config_sha256": self.config_sha256,
                "updated_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )

    def _read_state(self) -> dict[str, JSONValue]:
        state = _read_json(self.path / RunFile.STATE)
        if not isinstance(state, dict) or not isinstance(state.get("last_completed_round"), int):
            raise RunDirectoryError(f"{self.path / RunFile.STATE} is malformed: {state!r}")
        if state.get("config_sha256") != self.config_sha256:
            raise RunDirectoryError(f"{self.path / RunFile.STATE} belongs to another config")
        return state

    @property
    def last_completed_round(self) -> int:
        """The last round whose checkpoint, metrics line and state were all written."""
        return int(self._read_state()["last_completed_round"])

    def complete_round(
        self,
        record: RoundRecord,
        arrays: Mapping[str, NDArray[Any]],
        rng_state: Mapping[str, JSONValue] | None = None,
    ) -> None:
        """Record round ``record.round``: checkpoint, one fsynced ``metrics.jsonl`` line, then ``state.json``.

        Raises:
            RunDirectoryError: the run is finished, or ``record.round`` is not the next round.
        """
        state = self._read_state()
        if state.get("finished"):
            raise RunDirectoryError(f"run {self.path} is finished; it takes no more rounds")
        expected = int(state["last_completed_round"]) + 1
        if record.round != expected:
            raise RunDirectoryError(f"run {self.path}: expected round {expected}, got round {record.round}")
        self._save_arrays(self.checkpoint_path(record.round), arrays, record.round)
        line = json.dumps(record.to_json(), sort_keys=False, allow_nan=False)
        with open(self.path / RunFile.METRICS, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_state(last_round=record.round, rng_state=rng_state, finished=False)

    def finish(self, arrays: Mapping[str, NDArray[Any]]) -> Path:
        """Write ``final.safetensors`` and mark the run finished; returns the final checkpoint's path."""
        state = self._read_state()
        final = self.path / RunFile.FINAL
        self._save_arrays(final, arrays, int(state["last_completed_round"]))
        self._write_state(
            last_round=int(state["last_completed_round"]), rng_state=state.get("rng_state"), finished=True
        )
        return final

    # ------------------------------------------------------------------------------------------- reading

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, NDArray[Any]]]:
        """(round, arrays) of a checkpoint of this run; refuses one written under another config."""
        try:
            with safe_open(str(path), framework="np") as handle:
                metadata = handle.metadata() or {}
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as err:
            raise RunDirectoryError(f"cannot read checkpoint {path}: {err}") from err
        if metadata.get("config_sha256") != self.config_sha256:
            raise RunDirectoryError(f"checkpoint {path} was written under another config")
        try:
            return int(metadata["round"]), arrays
        except (KeyError, ValueError) as err:
            raise RunDirectoryError(f"checkpoint {path} has no valid 'round' metadata") from err

    def metrics(self) -> list[dict[str, JSONValue]]:
        """Every line of ``metrics.jsonl`` parsed, in order."""
        lines = (self.path / RunFile.METRICS).read_text(encoding="utf-8").splitlines()
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):  # a torn last line from a crash mid-write: not a completed round
                    logger.warning("ignoring a truncated last line of %s", self.path / RunFile.METRICS)
                    continue
                raise RunDirectoryError(f"{self.path / RunFile.METRICS} line {number} is not JSON") from err
        return out

    def resume(self) -> ResumePoint:
        """The last completed round's checkpoint and metrics; metrics of uncompleted rounds are dropped.

        Raises:
            RunDirectoryError: the checkpoint of the last completed round is missing or inconsistent.
        """
        state = self._read_state()
        last = int(state["last_completed_round"])
        kept = [m for m in self.metrics() if isinstance(m.get("round"), int) and m["round"] <= last]
        if [m["round"] for m in kept] != list(range(1, last + 1)):
            raise RunDirectoryError(
                f"{self.path / RunFile.METRICS} does not hold exactly rounds 1..{last}: "
                f"{[m.get('round') for m in kept]}"
            )
        text = "".join(json.dumps(m, allow_nan=False) + "\n" for m in kept)
        if text != (self.path / RunFile.METRICS).read_text(encoding="utf-8"):
            logger.warning("dropping metrics lines of uncompleted rounds from %s", self.path / RunFile.METRICS)
            atomic_write_bytes(self.path / RunFile.METRICS, text.encode("utf-8"))
        arrays = None
        if last > 0:
            checkpoint_round, arrays = self.load_checkpoint(self.checkpoint_path(last))
            if checkpoint_round != last:
                raise RunDirectoryError(
                    f"{self.checkpoint_path(last)} says round {checkpoint_round}, state says {last}"
                )
        rng_state = state.get("rng_state")
        return ResumePoint(
            round=last,
            arrays=arrays,
            metrics=tuple(kept),
            rng_state=dict(rng_state) if isinstance(rng_state, dict) else None,
            finished=bool(state.get("finished")),
        )
