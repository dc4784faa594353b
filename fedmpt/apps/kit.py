"""The provisioned kit: the one identity system of a federation and the protocol parameters no server can change.

A kit directory (``fedmpt secagg provision --out DIR``, or a per-run kit in the simulation) holds::

    masking/roster.bin            node id (= partition id) -> Ed25519 identity public key, the trust anchor
    masking/identity_<k>.key      node k's identity private key (0600), on node k only
    masking/protocol.json         run id, roster size N, threshold t, SecAgg+ degree k, graph seed
    ckks/client, ckks/server      (optional) the CKKS kits

The same identity signs a node's masking messages, its CKKS uploads and its epsilon-ledger entries; the server and
every verifier pin to ``roster.bin``. ``protocol.json`` fixes what :mod:`secagg.masking` clients refuse to take
from the server: the run id they are pinned to, t (default ``floor(2m/3) + 1`` for m share holders,
:func:`secagg.security.default_threshold`), k and the seed of the SecAgg+ graph. Node k keeps the last protocol
round it took part in on its own disk (:class:`RoundCounter`), so no round can be replayed or re-run to it, even
under the deployment engine where every message starts a fresh ClientApp process.

This module imports neither torch nor flwr.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmpt.errors import ConfigError, FederationError, SecureAggregationError
from secagg.keys import (
    ROSTER_FILE,
    Identity,
    Roster,
    identity_file_name,
    load_identity,
    load_roster,
    provision_identities,
    public_bytes,
)
from secagg.security import default_threshold, tolerated_corruptions

logger = logging.getLogger("flwr.fedmpt.secagg")

#: Sub-directory of a kit holding the identities, the roster and the protocol parameters.
MASKING_DIR = "masking"
#: Sub-directory of a kit holding the CKKS kits (``client/`` for nodes, ``server/`` for the server).
CKKS_DIR = "ckks"
#: Sub-directory of the run directory holding a per-run kit when 'secagg-dir' is empty (simulation only).
RUN_KIT_DIR = "secagg"
#: CKKS clip range of the apps' kits: CKKS encrypts weighted *states*, whose parameters must lie within it.
CKKS_STATE_RANGE = 64.0
#: The protocol parameters of a kit.
PROTOCOL_FILE = "protocol.json"
_FORMAT = "fedmpt-secagg-kit"
_VERSION = 1


@dataclass(frozen=True)
class ProtocolParams:
    """What provisioning fixes for a federation: every client compares the server's requests with these.

    Attributes:
        run_id: 16 bytes every protocol message of this federation is bound to (clients are pinned to it).
        roster_size: N, the number of provisioned identities.
        threshold: Shamir threshold t; also the least number of clients in any round.
        neighbours: even SecAgg+ degree k, or 0 for the complete graph.
        graph_seed: 32 bytes that place the roster on the SecAgg+ ring (drawn at provisioning, never by the server).
    """

    run_id: bytes
    roster_size: int
    threshold: int
    neighbours: int
    graph_seed: bytes

    def __post_init__(self) -> None:
        if len(self.run_id) != 16 or len(self.graph_seed) != 32:
            raise ConfigError(f"{PROTOCOL_FILE}: run_id must be 16 bytes and graph_seed 32, got "
                              f"{len(self.run_id)} and {len(self.graph_seed)}")  # fmt: skip
        for name, low in (("roster_size", 2), ("threshold", 2), ("neighbours", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{PROTOCOL_FILE}: {name} must be an int >= {low}, got {value!r}")
        if self.neighbours % 2 or self.neighbours == 1:
            raise ConfigError(f"{PROTOCOL_FILE}: neighbours must be 0 or an even int >= 2, got {self.neighbours}")
        if self.threshold > self.roster_size:
            raise ConfigError(f"{PROTOCOL_FILE}: threshold {self.threshold} exceeds the roster size {self.roster_size}")

    @property
    def neighbourhood_size(self) -> int | None:
        """k for :class:`secagg.config.MaskingConfig`: None on the complete graph."""
        return self.neighbours if self.neighbours and self.neighbours < self.roster_size - 1 else None

    @property
    def tolerated_corruptions(self) -> int:
        """Corrupt share holders per node tolerated against an active server (2t > m + c); see secagg.security."""
        return tolerated_corruptions(self.threshold, self.roster_size, self.neighbourhood_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "run_id": self.run_id.hex(),
            "roster_size": self.roster_size,
            "threshold": self.threshold,
            "neighbours": self.neighbours,
            "graph_seed": self.graph_seed.hex(),
        }

    @classmethod
    def from_json(cls, data: Any, where: Path) -> ProtocolParams:
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ConfigError(f"{where} is not a version-{_VERSION} {_FORMAT} protocol file")
        try:
            return cls(
                run_id=bytes.fromhex(data["run_id"]),
                roster_size=data["roster_size"],
                threshold=data["threshold"],
                neighbours=data["neighbours"],
                graph_seed=bytes.fromhex(data["graph_seed"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: malformed protocol parameters ({err})") from None


def new_protocol_params(roster_size: int, threshold: int = 0, neighbours: int = 0) -> ProtocolParams:
    """Fresh parameters for a roster of ``roster_size``: t = ``threshold`` or the default, random run id and seed.

    A threshold below the active-server bound (:func:`secagg.security.tolerated_corruptions` < 0) is allowed but
    logged: such a kit is secure only against a server that follows the protocol.
    """
    k = neighbours if neighbours and neighbours < roster_size - 1 else None
    t = threshold or default_threshold(roster_size, k)
    params = ProtocolParams(secrets.token_bytes(16), roster_size, t, neighbours, secrets.token_bytes(32))
    if params.tolerated_corruptions < 0:
        logger.warning(
            "secure aggregation: threshold %d on %d share holders is below the active-server bound (2t > m); "
            "this kit protects only against a server that follows the protocol",
            t,
            roster_size if k is None else k + 1,
        )
    return params


def write_protocol(masking_dir: Path, params: ProtocolParams) -> Path:
    """Write ``protocol.json`` (refusing to overwrite one: changing t or the run id under running nodes would let
    a server mix two parameter sets)."""
    path = Path(masking_dir) / PROTOCOL_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(params.to_json(), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


@dataclass(frozen=True)
class Kit:
    """A loaded kit: its directory, the roster and the protocol parameters (public material only)."""

    path: Path
    roster: Roster
    params: ProtocolParams

    @classmethod
    def load(cls, path: Path) -> Kit:
        """Read ``masking/roster.bin`` and ``masking/protocol.json``; the roster must match the declared size."""
        masking_dir = Path(path) / MASKING_DIR
        roster_path, protocol_path = masking_dir / ROSTER_FILE, masking_dir / PROTOCOL_FILE
        for needed in (roster_path, protocol_path):
            if not needed.exists():
                raise SecureAggregationError(
                    f"secure aggregation kit {path}: {needed.name} is missing (provision with 'fedmpt secagg "
                    "provision' and point 'secagg-dir' at it)"
                )
        roster = load_roster(roster_path)
        params = ProtocolParams.from_json(json.loads(protocol_path.read_text(encoding="utf-8")), protocol_path)
        if len(roster) != params.roster_size or sorted(roster) != list(range(params.roster_size)):
            raise ConfigError(
                f"kit {path}: the roster lists nodes {sorted(roster)}, {PROTOCOL_FILE} declares "
                f"0..{params.roster_size - 1}"
            )
        return cls(Path(path), roster, params)

    def identity(self, node_id: int) -> Identity:
        """Node ``node_id``'s identity key from this kit (present only on that node in a deployment)."""
        path = self.path / MASKING_DIR / identity_file_name(node_id)
        if not path.exists():
            raise SecureAggregationError(
                f"secure aggregation: no identity key for partition {node_id} at {path} (provision with 'fedmpt "
                "secagg provision', or enroll the node, and set 'secagg-dir')"
            )
        identity = load_identity(path, node_id)
        if node_id not in self.roster or public_bytes(self.roster[node_id]) != identity.public:
            raise SecureAggregationError(f"identity key {path} does not match the roster entry of node {node_id}")
        return identity

    def check_participants(self, client_ids: Iterable[int], server_round: int) -> None:
        """A round may only sample provisioned nodes: name the keys that fix a roster/federation mismatch."""
        strangers = sorted(set(client_ids) - set(self.roster))
        if strangers:
            raise FederationError(
                f"round {server_round}: partitions {strangers} are connected but the kit {self.path} provisions only "
                f"0..{self.params.roster_size - 1}: set 'num-clients' to the number of SuperNodes, or provision a kit "
                "for every partition"
            )

    @property
    def ckks_dir(self) -> Path:
        return self.path / CKKS_DIR


def ensure_run_kit(
    directory: Path,
    num_clients: int,
    *,
    threshold: int = 0,
    neighbours: int = 0,
    ckks_max_weight: int | None = None,
    ckks_state_range: float = CKKS_STATE_RANGE,
) -> Kit:
    """Simulation only: provision a kit for partitions 0..num_clients-1 once per run (reused on resume).

    Writes every client's secrets next to the run (the simulation's one process holds every key anyway); a warning
    says so. ``ckks_max_weight`` also creates the CKKS kits (states within +-``ckks_state_range``).
    """
    masking_dir = Path(directory) / MASKING_DIR
    if ckks_max_weight is not None and not (Path(directory) / CKKS_DIR / "server").exists():
        from secagg import ckks
        from secagg.config import CkksConfig

        logger.warning(
            "secure aggregation: provisioning per-run CKKS kits in %s, INCLUDING the clients' shared secret key; "
            "this is only acceptable for the simulation",
            Path(directory) / CKKS_DIR,
        )
        (Path(directory) / CKKS_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
        ckks.provision(
            CkksConfig(max_clients=num_clients, max_weight=ckks_max_weight, clip_range=ckks_state_range),
            Path(directory) / CKKS_DIR,
        )
    if not (masking_dir / ROSTER_FILE).exists():
        logger.warning(
            "secure aggregation: provisioning a per-run key kit in %s, INCLUDING every client's private identity "
            "key; this is only acceptable for the simulation (use 'fedmpt secagg provision' and 'secagg-dir' in a "
            "deployment)",
            directory,
        )
        masking_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        provision_identities(list(range(num_clients)), masking_dir)
    if not (masking_dir / PROTOCOL_FILE).exists():
        write_protocol(masking_dir, new_protocol_params(num_clients, threshold, neighbours))
    return Kit.load(Path(directory))


def load_run_kit(
    key_dir: str,
    run_path: Path,
    num_clients: int,
    *,
    threshold: int = 0,
    neighbours: int = 0,
    ckks_max_weight: int | None = None,
    ckks_state_range: float = CKKS_STATE_RANGE,
) -> Kit:
    """The server's kit of a run: the provisioned one at ``key_dir`` (run config 'secagg-dir'), or, when that is
    empty, the per-run kit under ``run_path`` (provisioned on first use; simulation only)."""
    if key_dir:
        return Kit.load(Path(key_dir).expanduser())
    return ensure_run_kit(
        Path(run_path) / RUN_KIT_DIR,
        num_clients,
        threshold=threshold,
        neighbours=neighbours,
        ckks_max_weight=ckks_max_weight,
        ckks_state_range=ckks_state_range,
    )


def run_kit_dir(runs_dir: str, run_name: str) -> Path:
    """Where a per-run kit lives when 'secagg-dir' is empty: ``<runs-dir>/<run-name>/secagg``."""
    if not run_name:
        raise ConfigError("run config 'secagg-dir' = \"\" (a per-run kit) needs 'run-name' so clients can find the kit")
    return Path(runs_dir).expanduser() / run_name / RUN_KIT_DIR


def node_kit_dir(node_config: Mapping[str, Any], key_dir: str, runs_dir: str, run_name: str) -> Path:
    """The kit a node reads: node config 'secagg-dir' (a deployment: the node's own copy, which no run config can
    redirect), else run config 'secagg-dir', else the per-run kit of the simulation."""
    own = node_config.get("secagg-dir", "")
    if not isinstance(own, str):
        raise ConfigError(f"node config 'secagg-dir' must be a path string, got {own!r}")
    if own:
        return Path(own).expanduser()
    return Path(key_dir).expanduser() if key_dir else run_kit_dir(runs_dir, run_name)


def node_state_dir(node_config: Mapping[str, Any], kit_path: Path) -> Path:
    """Where a node keeps its round counter: node config 'secagg-state-dir', else the kit's ``masking/``."""
    own = node_config.get("secagg-state-dir", "")
    if not isinstance(own, str):
        raise ConfigError(f"node config 'secagg-state-dir' must be a path string, got {own!r}")
    return Path(own).expanduser() if own else Path(kit_path) / MASKING_DIR


# ------------------------------------------------------------------------------------------ node-side counter


@dataclass(frozen=True)
class RoundCounter:
    """Node k's persistent record of the last protocol round it took part in, per pinned run id.

    ``state-dir/round_counter_<k>.json`` = ``{"run_id": hex, "last_round": r}``, replaced atomically (write, fsync,
    rename) *before* the node answers the round's first message, so a crash or a fresh ClientApp process can never
    make it answer the same round twice.
    """

    path: Path

    @classmethod
    def for_node(cls, state_dir: Path, node_id: int) -> RoundCounter:
        return cls(Path(state_dir) / f"round_counter_{node_id}.json")

    def last_round(self, run_id: bytes) -> int | None:
        """The last round taken part in for ``run_id``, or None if none (or the file is for another run)."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("run_id") != run_id.hex():
                return None
            last = data["last_round"]
        except (ValueError, KeyError, AttributeError) as err:
            raise SecureAggregationError(
                f"round counter {self.path} is unreadable ({err}); refusing to take part"
            ) from None
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise SecureAggregationError(f"round counter {self.path} holds last_round={last!r}; refusing to take part")
        return last

    def claim(self, run_id: bytes, round_number: int) -> None:
        """Record ``round_number`` as taken; refuses a round <= the recorded one (replayed or re-run round)."""
        last = self.last_round(run_id)
        if last is not None and round_number <= last:
            raise SecureAggregationError(
                f"round {round_number} refused: this node already took part in round {last} of run {run_id.hex()} "
                "(replayed or re-run round)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"run_id": run_id.hex(), "last_round": round_number}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
