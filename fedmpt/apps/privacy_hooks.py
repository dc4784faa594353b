"""Differential privacy inside the Flower federation: per-node accountant, signed ledger, budgets, epsilon per round.

The apps stay thin: the ClientApp calls :func:`private_update` instead of the plain local update when ``dp`` is
on, and the ServerApp wraps its ``Grid`` in :meth:`RunLedger.wrap` and writes :meth:`RunLedger.epsilon_record`
into every round line. All privacy logic lives in :mod:`privacy` (``dpsgd``, ``accounting``, ``ledger``,
``budget``); this module only moves its objects in and out of Flower records.

Client side, one ``train`` message (record-level (epsilon, delta)-DP of the node's data, add/remove-one):

1. the node's history is loaded from its on-disk ledger ``<ledger-dir>/node-<k>/epsilon_ledger.jsonl``, signed
   with the node's provisioned identity ``Kit.identity(k)`` (:mod:`fedmpt.apps.kit`; the kit is found by
   :func:`fedmpt.apps.kit.node_kit_dir`: node config ``secagg-dir``, else run config ``secagg-dir``, else the
   simulation's per-run kit ``<runs-dir>/<run-name>/secagg``; ledger node id ``str(k)``), and cross-checked
   against the copy in ``context.state`` (Flower keeps ``context.state`` per node across the rounds of a run; the
   ClientApp object itself is rebuilt for every message, so nothing may live in it). The ledger is
   authoritative: on disagreement the state is rebuilt from it and a warning is logged. The history is never
   reset per round;
2. the round's release ``(sigma, q, steps)`` is planned (:func:`privacy.dpsgd.plan_release`) and checked against
   the node's budget (``max-epsilon``; RDP epsilon, the larger of the two upper bounds, so the budget holds
   under either accountant). Over budget: no training, the reply carries no arrays and the privacy record says
   ``status = "budget-exhausted"`` with the spent and maximum epsilon;
3. DP-SGD (:func:`privacy.dpsgd.dp_client_update`), then the release is charged to the ledger (signed,
   fsynced) BEFORE the reply is built: epsilon is spent when the noisy update is computed, even if the reply
   is lost in transit;
4. the reply carries the node's whole ledger (canonical JSON lines); the server skips lines it already has, so
   entries whose reply was lost arrive with the next one.

Server side: :class:`RunLedger` sees every train reply and merges the signed entries into
``<run_dir>/epsilon_ledger.jsonl`` with :func:`privacy.ledger.merge_node_entries`, pinned to the kit's roster
that the caller passes in (never a key the server learnt from a reply: a node id outside the roster, a key other
than its roster key, a bad signature, a fork or a gap turns the reply into an error, and the update is not
aggregated), and replays each node's recorded history to report cumulative epsilon per client (and the
maximum) in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedmpt.apps import task
from fedmpt.apps.grid import GridProxy
from fedmpt.apps.kit import Kit, node_kit_dir
from fedmpt.apps.run_config import from_run_config, run_config_defaults
from fedmpt.errors import ConfigError
from privacy.accounting import AccountantKind, DpSgdEvent, PrivacyAccountant, epsilon_pld, epsilon_rdp
from privacy.budget import PrivacyBudget
from privacy.dpsgd import DPConfig, DPMode, dp_client_update, plan_release
from privacy.errors import BudgetExhausted, LedgerError, PrivacyError
from privacy.ledger import (
    Ledger,
    LedgerEntry,
    Release,
    TransportProtection,
    merge_node_entries,
    public_key_to_hex,
    roster_keys,
)
from secagg.keys import Identity, Roster

logger = logging.getLogger("flwr.fedmpt.privacy")

#: Name of the privacy record (a ``ConfigRecord``) in a train reply, and of the accountant state in ``context.state``.
PRIVACY_RECORD = "privacy"
ACCOUNTANT_STATE = "privacy-accountant"
#: Error code of a reply the server rejects because its ledger entries do not verify.
LEDGER_REJECTED_CODE = 4201


class PrivacyKey(StrEnum):
    """Keys of the privacy record of a train reply and of the accountant state."""

    STATUS = "status"
    NODE_ID = "node-id"
    ENTRIES = "ledger-entries"
    EPSILON_RDP = "epsilon-rdp"
    REQUESTED_EPSILON = "requested-epsilon"
    MAX_EPSILON = "max-epsilon"
    HISTORY = "history"


class ReplyStatus(StrEnum):
    """What a DP node did with a train message."""

    TRAINED = "trained"
    BUDGET_EXHAUSTED = "budget-exhausted"


class RunLedgerFile(StrEnum):
    """Files of the run directory written by the server's :class:`RunLedger` (read by ``fedmpt report``)."""

    LEDGER = "epsilon_ledger.jsonl"


# ----------------------------------------------------------------------------------------------------------
# Run config


@dataclass(frozen=True)
class PrivacyRunConfig:
    """The DP keys of the run config (kebab-case there: ``noise-multiplier``, ``max-epsilon`` ...).

    ``noise_multiplier = 0`` calibrates sigma from ``target_epsilon`` at ``delta`` for ``num-server-rounds``
    rounds of local steps, assuming (worst case) the node trains every round. ``expected_batch_size = 0`` uses
    ``batch-size``. ``max_epsilon = 0`` sets no per-node budget (a node config ``max-epsilon`` may set one).
    ``ledger_dir = ""`` puts node ledgers under ``<runs-dir>/<run-name>/nodes``. ``delta < 1/n_k`` is checked on
    each node, where its record count ``n_k`` is known.
    """

    dp: bool = False
    dp_mode: str = DPMode.FEATURE.value
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    expected_batch_size: int = 0
    accountant: str = AccountantKind.RDP.value
    max_epsilon: float = 0.0
    ledger_dir: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.dp, bool):
            raise ConfigError(f"run config 'dp' must be true or false, got {self.dp!r}")
        if self.dp_mode not in {m.value for m in DPMode}:
            raise ConfigError(f"run config 'dp-mode' must be 'feature' or 'exact', got {self.dp_mode!r}")
        _number("noise-multiplier", self.noise_multiplier, strict=False)
        _number("target-epsilon", self.target_epsilon, strict=True)
        _number("max-grad-norm", self.max_grad_norm, strict=True)
        _number("max-epsilon", self.max_epsilon, strict=False)
        if not _is_number(self.delta) or not 0.0 < float(self.delta) < 1.0:
            raise ConfigError(f"run config 'delta' must be a number in (0, 1), got {self.delta!r}")
        batch = self.expected_batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ConfigError(f"run config 'expected-batch-size' must be an integer >= 0, got {batch!r}")
        if self.accountant not in (AccountantKind.RDP.value, AccountantKind.PRV.value):
            raise ConfigError(f"run config 'accountant' must be 'rdp' or 'prv', got {self.accountant!r}")
        if not isinstance(self.ledger_dir, str):
            raise ConfigError(f"run config 'ledger-dir' must be a path string, got {self.ledger_dir!r}")

    def dp_config(self, rounds: int) -> DPConfig:
        """The library's :class:`~privacy.dpsgd.DPConfig`: sigma given, or calibrated for ``rounds`` rounds."""
        calibrate = self.noise_multiplier == 0.0
        return DPConfig(
            max_grad_norm=float(self.max_grad_norm),
            delta=float(self.delta),
            noise_multiplier=None if calibrate else float(self.noise_multiplier),
            target_epsilon=float(self.target_epsilon) if calibrate else None,
            rounds=rounds if calibrate else None,
            expected_batch_size=self.expected_batch_size or None,
            mode=self.dp_mode,
            accountant=self.accountant,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(key: str, value: object, *, strict: bool) -> None:
    if not _is_number(value) or (float(value) <= 0.0 if strict else float(value) < 0.0):  # type: ignore[arg-type]
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"run config {key!r} must be a finite number {bound}, got {value!r}")


PRIVACY_DEFAULTS: dict[str, Any] = run_config_defaults(PrivacyRunConfig)


def privacy_config_from(values: Mapping[str, Any]) -> PrivacyRunConfig:
    """Build the :class:`PrivacyRunConfig` from the run config (missing keys take :data:`PRIVACY_DEFAULTS`)."""
    return from_run_config(PrivacyRunConfig, values)


def transport_protection(run_config: Mapping[str, Any]) -> TransportProtection:
    """How updates travel, from the ``secure-aggregation`` run-config key (absent or "none": unprotected)."""
    value = str(run_config.get("secure-aggregation", "none") or "none").lower()
    try:
        return TransportProtection(value)
    except ValueError:
        return TransportProtection.CKKS if "ckks" in value else TransportProtection.MASKING


# ----------------------------------------------------------------------------------------------------------
# Client side


def node_ledger_path(ledger_root: Path, partition_id: int) -> Path:
    """``<ledger_root>/node-<k>/epsilon_ledger.jsonl``: node k's own ledger."""
    return ledger_root / f"node-{partition_id}" / RunLedgerFile.LEDGER.value


def ledger_root(privacy: PrivacyRunConfig, runs_dir: Path, run_name: str, flower_run_id: int) -> Path:
    """The folder of the node ledgers: ``ledger-dir``, else ``<runs-dir>/<run-name>/nodes``."""
    if privacy.ledger_dir:
        return Path(privacy.ledger_dir).expanduser()
    return runs_dir / (run_name or f"flower-run-{flower_run_id}") / "nodes"


def node_identity(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], runs_dir: Path, run_name: str, partition_id: int
) -> Identity:
    """Node k's ledger signing key: ``Kit.identity(k)`` of the kit at :func:`fedmpt.apps.kit.node_kit_dir`.

    One identity per site: the key that signs the node's secure-aggregation messages also signs its ledger, and
    the server and every verifier pin it to the kit's roster. Nothing is created here: a node without a
    provisioned (or, in the simulation, per-run) kit refuses to train.
    """
    if "identity-key" in node_config:
        raise ConfigError(
            "node config 'identity-key' is no longer read: the epsilon ledger is signed with the node's kit "
            "identity (masking/identity_<k>.key under the node config 'secagg-dir'); remove 'identity-key'"
        )
    key_dir = run_config.get("secagg-dir", "")
    if not isinstance(key_dir, str):
        raise ConfigError(f"run config 'secagg-dir' must be a path string, got {key_dir!r}")
    return Kit.load(node_kit_dir(node_config, key_dir, str(runs_dir), run_name)).identity(partition_id)


def node_budget(privacy: PrivacyRunConfig, node_config: Mapping[str, Any]) -> PrivacyBudget | None:
    """The node's budget: node config ``max-epsilon`` (a per-site budget) wins over the run config's; 0 = none."""
    value = node_config.get("max-epsilon", privacy.max_epsilon)
    if not _is_number(value) or float(value) < 0.0:
        raise ConfigError(f"node config 'max-epsilon' must be a finite number >= 0, got {value!r}")
    if float(value) == 0.0:
        return None
    return PrivacyBudget(max_epsilon=float(value), delta=float(privacy.delta), accountant=AccountantKind.RDP)


def restore_accountant(state: RecordDict, ledger: Ledger) -> PrivacyAccountant:
    """The node's accountant from ``context.state``, cross-checked against its ledger (which wins)."""
    from_ledger = PrivacyAccountant(ledger.history())
    record = state.config_records.get(ACCOUNTANT_STATE)
    if record is None:
        if len(from_ledger):
            logger.warning(
                "node state has no accountant but its ledger %s has %d entries; using the ledger",
                ledger.path,
                len(from_ledger),
            )
        return from_ledger
    try:
        stored = PrivacyAccountant.from_state_dict(json.loads(str(record[PrivacyKey.HISTORY])))
    except (KeyError, ValueError, TypeError, PrivacyError) as err:
        logger.warning("node accountant state is unreadable (%s); rebuilt from the ledger %s", err, ledger.path)
        return from_ledger
    if stored.history != from_ledger.history:
        logger.warning(
            "node accountant state (%d events) disagrees with its ledger %s (%d events); the ledger is authoritative",
            len(stored),
            ledger.path,
            len(from_ledger),
        )
        return from_ledger
    return stored


def save_accountant(state: RecordDict, accountant: PrivacyAccountant) -> None:
    """Persist the accountant's JSON state in ``context.state`` (kept per node across rounds by Flower)."""
    state.config_records[ACCOUNTANT_STATE] = ConfigRecord({PrivacyKey.HISTORY: json.dumps(accountant.state_dict())})


@dataclass(frozen=True)
class PrivateUpdate:
    """What a DP node replies: a trained update (``arrays`` set) or a refusal (``arrays`` None), plus its record."""

    arrays: dict[str, NDArray[np.float32]] | None
    num_examples: int
    metrics: dict[str, float]
    record: ConfigRecord

    @property
    def refused(self) -> bool:
        return self.arrays is None


def private_update(
    context: Context,
    run_config: Mapping[str, Any],
    privacy: PrivacyRunConfig,
    task_config: task.TaskConfig,
    *,
    global_arrays: Mapping[str, NDArray[Any]],
    data: task.ClientData,
    partition_id: int,
    server_round: int,
    num_rounds: int,
    run_seed: int,
    runs_dir: Path,
    run_name: str,
) -> PrivateUpdate:
    """One DP round of a node: budget check, DP-SGD, charge to the signed ledger, then the reply's content.

    Order (see :mod:`privacy.budget`): check the planned release, train, record (fsync), and only then return
    what may leave the node. Raises :class:`~privacy.errors.PrivacyParameterError` for ``delta >= 1/n_k``.
    """
    identity = node_identity(context.node_config, run_config, runs_dir, run_name, partition_id)
    path = node_ledger_path(ledger_root(privacy, runs_dir, run_name, context.run_id), partition_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(path, identity)
    accountant = restore_accountant(context.state, ledger)
    node_id = ledger.node_id
    dp_config = privacy.dp_config(num_rounds)
    train_config = task.train_config(task_config, task.client_seed(run_seed, server_round, partition_id))
    plan = plan_release(len(data.train), train_config, dp_config)
    release = Release(
        run_id=run_name or f"flower-run-{context.run_id}",
        node_id=node_id,
        round=server_round,
        event=plan.event,
        max_grad_norm=dp_config.max_grad_norm,
        delta=dp_config.delta,
        transport_protection=transport_protection(run_config),
    )
    budget = node_budget(privacy, context.node_config)

    def record(status: ReplyStatus, **extra: float) -> ConfigRecord:
        return ConfigRecord(
            {
                PrivacyKey.STATUS: status.value,
                PrivacyKey.NODE_ID: node_id,
                PrivacyKey.ENTRIES: [e.canonical_bytes().decode("utf-8") for e in ledger.entries()],
                PrivacyKey.EPSILON_RDP: ledger.epsilon(AccountantKind.RDP),
                **extra,
            }
        )

    if budget is not None:
        try:
            budget.check(ledger, release)
        except BudgetExhausted as err:
            logger.warning("node %s, round %d: %s; not training", node_id, server_round, err)
            save_accountant(context.state, accountant)
            refusal = record(
                ReplyStatus.BUDGET_EXHAUSTED,
                **{PrivacyKey.REQUESTED_EPSILON: err.requested_epsilon, PrivacyKey.MAX_EPSILON: err.max_epsilon},
            )
            return PrivateUpdate(None, len(data.train), {"epsilon": err.current_epsilon}, refusal)
    with task._METHOD_LOCK:
        method = task._method(task_config, run_seed)
        update, event = dp_client_update(
            method, task.to_state(global_arrays), data.train, train_config, dp_config, accountant
        )
    charged = Release(**{**{f.name: getattr(release, f.name) for f in fields(Release)}, "event": event})
    if budget is not None:
        budget.charge(ledger, charged)
    else:
        ledger.append(charged)
    accountant.compose(event)
    save_accountant(context.state, accountant)
    metrics = {"train_loss": float(update.metrics["loss"])}
    for name in ("epsilon", "epsilon_pld", "noise_multiplier", "sample_rate", "steps", "clipped_fraction"):
        value = float(update.metrics.get(name, math.nan))
        if math.isfinite(value):
            metrics[name] = value
    extra = {PrivacyKey.MAX_EPSILON: budget.max_epsilon} if budget is not None else {}
    return PrivateUpdate(
        task.to_arrays(update.state), update.num_examples, metrics, record(ReplyStatus.TRAINED, **extra)
    )


# ----------------------------------------------------------------------------------------------------------
# Server side


def refusal_reason(reply: Message) -> str | None:
    """``"budget exhausted (epsilon X of max Y)"`` if ``reply`` is a node's budget refusal, else None."""
    if reply.has_error() or PRIVACY_RECORD not in reply.content.config_records:
        return None
    record = reply.content.config_records[PRIVACY_RECORD]
    if record.get(PrivacyKey.STATUS) != ReplyStatus.BUDGET_EXHAUSTED.value:
        return None
    spent, cap = record.get(PrivacyKey.EPSILON_RDP), record.get(PrivacyKey.MAX_EPSILON)
    spent_text = f"{float(spent):.4g}" if _is_number(spent) else "?"  # type: ignore[arg-type]
    cap_text = f"{float(cap):.4g}" if _is_number(cap) else "?"  # type: ignore[arg-type]
    return f"budget exhausted (epsilon {spent_text} of max {cap_text})"


class RunLedger:
    """The server's run ledger: collects, verifies and merges the nodes' signed entries; replays epsilon.

    ``roster`` is the kit's roster (``Kit.roster``: the provisioned one in a deployment, the per-run kit's in the
    simulation). It is the only trust anchor: node k's entries must be signed by ``roster[k]``, so a reply signed
    by any other key is refused, and nothing the server learns from replies is ever pinned or written.
    """

    def __init__(self, run_dir: Path, privacy: PrivacyRunConfig, roster: Roster) -> None:
        self.privacy = privacy
        self.roster = roster
        self._keys = roster_keys(roster)  # ledger node id -> roster key; refuses anything but a Roster
        self.path = run_dir / RunLedgerFile.LEDGER.value
        self.entries: dict[str, list[LedgerEntry]] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
                entry = LedgerEntry.from_line(line)
                key = self._keys.get(entry.node_id)
                if key is None or entry.public_key != public_key_to_hex(key):
                    raise LedgerError(
                        f"run ledger {self.path}, line {number}: node {entry.node_id!r} is signed by "
                        f"{entry.key_id}, which is not its key in the roster given (resumed under another kit?)"
                    )
                self.entries.setdefault(entry.node_id, []).append(entry)

    def wrap(self, grid: Grid, partition_of: Callable[[int], int | None] | None = None) -> Grid:
        """``grid`` with every train reply passed through :meth:`collect` first.

        ``partition_of`` maps a Flower node id to the partition (roster node) the server knows it serves; a reply
        must then carry that partition's ledger, so a node cannot pass another node's valid chain off as its own.
        """
        return _LedgerGrid(grid, self, partition_of)

    def collect(self, reply: Message, expected_node: int | None = None) -> str | None:
        """Merge the signed entries of one train reply; returns why they were rejected, or None if merged.

        ``expected_node`` is the partition the replying Flower node serves, when the server knows it."""
        if reply.has_error() or PRIVACY_RECORD not in reply.content.config_records:
            return None
        record = reply.content.config_records[PRIVACY_RECORD]
        node_id = record.get(PrivacyKey.NODE_ID)
        lines = record.get(PrivacyKey.ENTRIES, [])
        if not isinstance(node_id, str) or not isinstance(lines, list):
            return "privacy record without node-id or ledger-entries"
        if node_id not in self._keys:
            return f"node {node_id!r} is not in the provisioned roster"
        if expected_node is not None and node_id != str(expected_node):
            return (
                f"the reply of the node serving partition {expected_node} carries the ledger of node {node_id!r} "
                "(another node's chain)"
            )
        parsed: list[LedgerEntry] = []
        try:
            for line in lines:
                if not isinstance(line, str):
                    return "ledger entries must be strings"
                entry = LedgerEntry.from_line(line.encode("utf-8"))
                if entry.node_id != node_id:
                    return f"ledger entry of node {entry.node_id!r} in the reply of node {node_id!r}"
                parsed.append(entry)
            merge_node_entries(self.path, parsed, self.roster)
        except PrivacyError as err:
            logger.error("ledger of node %s rejected: %s", node_id, err)
            return f"ledger rejected: {err}"
        known = self.entries.setdefault(node_id, [])
        known.extend(e for e in parsed if e.seq >= len(known))
        return None

    def history(self, node_id: str) -> tuple[DpSgdEvent, ...]:
        """The recorded DP-SGD events of ``node_id`` in the run ledger, oldest first."""
        return tuple(e.event() for e in self.entries.get(node_id, []))

    def epsilon_record(self, client_ids: Iterable[int]) -> dict[str, Any]:
        """The round line's ``epsilon`` object: cumulative epsilon of each client, replayed from the ledger.

        ``{"delta", "accountant", "clients": {id: {"epsilon_rdp", "epsilon_pld"}}, "max_epsilon_rdp",
        "max_epsilon_pld"}``; clients without ledger entries are left out (max over none is 0.0).
        """
        delta = float(self.privacy.delta)
        clients: dict[str, dict[str, float]] = {}
        for client_id in sorted(client_ids):
            entries = self.entries.get(str(client_id), [])
            if not entries:
                continue
            history = [e.event() for e in entries]
            clients[str(client_id)] = {
                "epsilon_rdp": epsilon_rdp(history, delta),
                "epsilon_pld": epsilon_pld(history, delta, entries[-1].pld_value_discretization),
            }
        return {
            "delta": delta,
            "accountant": self.privacy.accountant,
            "clients": clients,
            "max_epsilon_rdp": max((c["epsilon_rdp"] for c in clients.values()), default=0.0),
            "max_epsilon_pld": max((c["epsilon_pld"] for c in clients.values()), default=0.0),
        }


class _LedgerGrid(GridProxy):
    """A ``Grid`` that hands every train reply to a :class:`RunLedger` before the round loop sees it.

    A reply whose ledger entries do not verify becomes an error reply (code :data:`LEDGER_REJECTED_CODE`), so
    its update is not aggregated and the failure is recorded with the reason.
    """

    def __init__(self, grid: Grid, ledger: RunLedger, partition_of: Callable[[int], int | None] | None = None) -> None:
        super().__init__(grid)
        self._ledger = ledger
        self._partition_of = partition_of

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        sent = list(messages)
        by_node = {m.metadata.dst_node_id: m for m in sent}  # the round loop sends one message per node
        for reply in self._grid.send_and_receive(sent, timeout=timeout):
            if reply.metadata.message_type != MessageType.TRAIN:
                yield reply
                continue
            served = self._partition_of(reply.metadata.src_node_id) if self._partition_of is not None else None
            problem = self._ledger.collect(reply, served)
            original = by_node.get(reply.metadata.src_node_id)
            if problem is None or original is None:
                yield reply
            else:
                yield Message(Error(code=LEDGER_REJECTED_CODE, reason=problem), reply_to=original)
