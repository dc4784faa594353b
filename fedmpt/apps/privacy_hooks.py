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
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
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
from fedmpt.apps.messages import Key, RecordName, from_array_record
from fedmpt.apps.run_config import from_run_config, run_config_defaults
from fedmpt.apps.secagg_config import Stage
from fedmpt.errors import ConfigError
from fedmpt.methods.base import TRAIN_GROUPS
from fedmpt.training import TrainConfig
from privacy.accounting import AccountantKind, DpSgdEvent, PrivacyAccountant, epsilon_pld, epsilon_rdp
from privacy.budget import PrivacyBudget
from privacy.consistency import HEADS_KEY, chain_heads
from privacy.dpsgd import PUBLIC_METRICS, DPConfig, DPMode, dp_client_update, plan_release
from privacy.errors import BudgetExhausted, LedgerError, PrivacyError, PrivacyParameterError
from privacy.ledger import (
    Ledger,
    LedgerEntry,
    Release,
    SamplingBasis,
    TransportProtection,
    merge_node_entries,
    public_key_to_hex,
    roster_keys,
    update_commitment,
    utc_timestamp,
)
from privacy.site import DEFAULT_MAX_EPSILON, SiteLedger, dataset_fingerprint
from secagg.keys import Identity, Roster

logger = logging.getLogger("flwr.fedmpt.privacy")

#: Name of the privacy record (a ``ConfigRecord``) in a train reply, and of the accountant state in ``context.state``.
PRIVACY_RECORD = "privacy"
ACCOUNTANT_STATE = "privacy-accountant"
#: Error code of a reply the server rejects because its ledger entries do not verify.
LEDGER_REJECTED_CODE = 4201
#: The FedAvg weight of every DP reply: a site's record count is private, so under DP the average is uniform.
UNIFORM_WEIGHT = 1


class PrivacyKey(StrEnum):
    """Keys of the privacy record of a train reply and of the accountant state."""

    STATUS = "status"
    NODE_ID = "node-id"
    ENTRIES = "ledger-entries"
    EPSILON_RDP = "epsilon-rdp"
    REQUESTED_EPSILON = "requested-epsilon"
    SITE_EPSILON_RDP = "site-epsilon-rdp"
    UPDATE_NONCE = "update-nonce"
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
    ``batch-size``. ``dataset_size`` (``dp-dataset-size``) is the declared, public per-site dataset-size bound
    ``N``: ``q = B / N``, the steps per round and sigma depend on it and never on a site's own count; 0 uses
    ``train-per-client``. ``delta < 1/N`` is checked at start-up. Under DP the local optimiser uses
    ``dp-momentum`` (default 0: momentum accumulates the noise of earlier steps) and ``dp-learning-rate`` (0 =
    ``learning-rate``) instead of ``momentum`` / ``learning-rate``, and trains the groups ``dp-train`` names
    (default ``"prompts"``: prompt vectors and logit biases; FedMPT's adapters stay the identity and its gate
    uniform; ``"all"``: every trainable group). It becomes the method option ``train_groups`` unless
    ``method-options`` sets one. ``max_epsilon`` (> 0) is the budget the run asks
    for; a site enforces the smaller of it and its own (node config ``max-epsilon``, default
    :data:`privacy.site.DEFAULT_MAX_EPSILON`), over every run on its dataset. ``ledger_dir = ""`` keeps site
    ledgers under ``<runs-dir>/site-ledgers`` (a node config ``ledger-dir`` wins: a site's ledger is its own).
    """

    dp: bool = False
    dp_mode: str = DPMode.FEATURE.value
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    expected_batch_size: int = 0
    dp_dataset_size: int = 0
    dp_momentum: float = 0.0
    dp_learning_rate: float = 0.0
    dp_train: str = "prompts"
    accountant: str = AccountantKind.RDP.value
    max_epsilon: float = DEFAULT_MAX_EPSILON
    ledger_dir: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.dp, bool):
            raise ConfigError(f"run config 'dp' must be true or false, got {self.dp!r}")
        if self.dp_mode not in {m.value for m in DPMode}:
            raise ConfigError(f"run config 'dp-mode' must be 'feature' or 'exact', got {self.dp_mode!r}")
        _number("noise-multiplier", self.noise_multiplier, strict=False)
        _number("target-epsilon", self.target_epsilon, strict=True)
        _number("max-grad-norm", self.max_grad_norm, strict=True)
        _number("max-epsilon", self.max_epsilon, strict=True)
        if not _is_number(self.delta) or not 0.0 < float(self.delta) < 1.0:
            raise ConfigError(f"run config 'delta' must be a number in (0, 1), got {self.delta!r}")
        batch = self.expected_batch_size
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ConfigError(f"run config 'expected-batch-size' must be an integer >= 0, got {batch!r}")
        _number("dp-learning-rate", self.dp_learning_rate, strict=False)
        if self.dp_train not in TRAIN_GROUPS:
            raise ConfigError(f"run config 'dp-train' must be one of {TRAIN_GROUPS}, got {self.dp_train!r}")
        if not _is_number(self.dp_momentum) or not 0.0 <= float(self.dp_momentum) < 1.0:
            raise ConfigError(f"run config 'dp-momentum' must be a number in [0, 1), got {self.dp_momentum!r}")
        size = self.dp_dataset_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"run config 'dp-dataset-size' must be an integer >= 0, got {size!r}")
        if self.accountant not in (AccountantKind.RDP.value, AccountantKind.PRV.value):
            raise ConfigError(f"run config 'accountant' must be 'rdp' or 'prv', got {self.accountant!r}")
        if not isinstance(self.ledger_dir, str):
            raise ConfigError(f"run config 'ledger-dir' must be a path string, got {self.ledger_dir!r}")

    def dp_config(self, rounds: int, default_dataset_size: int) -> DPConfig:
        """The library's :class:`~privacy.dpsgd.DPConfig`: sigma given, or calibrated for ``rounds`` rounds, with
        the declared dataset size (``dp-dataset-size``, else ``default_dataset_size``: ``train-per-client``).

        Raises :class:`ConfigError` naming the keys when ``delta >= 1/N`` or the expected batch exceeds ``N``."""
        calibrate = self.noise_multiplier == 0.0
        size = self.dp_dataset_size or default_dataset_size
        try:
            return self._dp_config(rounds, size, calibrate)
        except PrivacyParameterError as err:
            raise ConfigError(
                f"DP settings do not fit the declared per-site dataset size N={size}: {err} (run config keys "
                "'dp-dataset-size', 'expected-batch-size' / 'batch-size', 'delta')"
            ) from err

    def _dp_config(self, rounds: int, size: int, calibrate: bool) -> DPConfig:
        return DPConfig(
            max_grad_norm=float(self.max_grad_norm),
            delta=float(self.delta),
            noise_multiplier=None if calibrate else float(self.noise_multiplier),
            target_epsilon=float(self.target_epsilon) if calibrate else None,
            rounds=rounds if calibrate else None,
            expected_batch_size=self.expected_batch_size or None,
            dataset_size=size,
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


def planned_event(privacy: PrivacyRunConfig, task_config: task.TaskConfig, num_rounds: int) -> DpSgdEvent:
    """The release every site makes in a round, ``(sigma, q, steps)``: a function of public configuration only.

    The server computes it at start-up (a bad combination of ``delta``, ``dp-dataset-size`` and the batch size
    fails there, naming the keys) and refuses any trained entry that records another one."""
    dp_config = privacy.dp_config(num_rounds, task_config.train_per_client)
    try:
        return plan_release(0, task.train_config(task_config, 0), dp_config).event
    except PrivacyParameterError as err:
        raise ConfigError(f"DP settings: {err} (run config keys 'dp-dataset-size', 'batch-size')") from err


def transport_protection(run_config: Mapping[str, Any]) -> TransportProtection:
    """How updates travel, from the ``secure-aggregation`` run-config key (absent or "none": unprotected)."""
    value = str(run_config.get("secure-aggregation", "none") or "none").lower()
    try:
        return TransportProtection(value)
    except ValueError:
        return TransportProtection.CKKS if "ckks" in value else TransportProtection.MASKING


# ----------------------------------------------------------------------------------------------------------
# Client side


#: Folder of the site ledgers under ``runs-dir`` when neither the node nor the run names one (the simulation).
SITE_LEDGERS_DIR = "site-ledgers"


def ledger_root(privacy: PrivacyRunConfig, node_config: Mapping[str, Any], runs_dir: Path) -> Path:
    """The site's ledger folder: node config ``ledger-dir`` (the site's own), else run config ``ledger-dir``,
    else ``<runs-dir>/site-ledgers``; chains are filed under it by dataset fingerprint (:mod:`privacy.site`)."""
    value = node_config.get("ledger-dir", "") or privacy.ledger_dir
    if not isinstance(value, str):
        raise ConfigError(f"node config 'ledger-dir' must be a path string, got {value!r}")
    return Path(value).expanduser() if value else runs_dir / SITE_LEDGERS_DIR


def site_fingerprint(node_config: Mapping[str, Any], data: task.ClientData) -> str:
    """The site's dataset fingerprint: of node config ``dataset-id`` when set, else of its training records."""
    dataset_id = node_config.get("dataset-id", "")
    if not isinstance(dataset_id, str):
        raise ConfigError(f"node config 'dataset-id' must be a string, got {dataset_id!r}")
    return dataset_fingerprint(data.train, dataset_id=dataset_id)


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


def node_budget(privacy: PrivacyRunConfig, node_config: Mapping[str, Any]) -> PrivacyBudget:
    """The site's budget over every run on its dataset: the smaller of its own (node config ``max-epsilon``,
    default :data:`privacy.site.DEFAULT_MAX_EPSILON`) and the run's ``max-epsilon``. Always finite; a run
    config cannot raise a site's budget."""
    value = node_config.get("max-epsilon", DEFAULT_MAX_EPSILON)
    if not _is_number(value) or float(value) <= 0.0:
        raise ConfigError(f"node config 'max-epsilon' must be a finite number > 0 (a site budget), got {value!r}")
    cap = min(float(value), float(privacy.max_epsilon))
    return PrivacyBudget(max_epsilon=cap, delta=float(privacy.delta), accountant=AccountantKind.RDP)


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
    """One DP round of a node: budget check, DP-SGD, charge to the site ledger, then the reply's content.

    Order (see :mod:`privacy.budget`): check the planned release against the site's budget over every run on
    its dataset, train, record (fsync), and only then return what may leave the node. Everything returned is a
    function of public configuration, the ledger and the noisy update: the FedAvg weight is 1 (uniform), the
    metrics are :data:`privacy.dpsgd.PUBLIC_METRICS`, the ledger entry's timestamp is the round's arrival.
    """
    received = utc_timestamp()  # before training: the entry's timestamp must not carry the training time
    identity = node_identity(context.node_config, run_config, runs_dir, run_name, partition_id)
    run_id = run_name or f"flower-run-{context.run_id}"
    fingerprint = site_fingerprint(context.node_config, data)
    site = SiteLedger(ledger_root(privacy, context.node_config, runs_dir), fingerprint, run_id, identity)
    accountant = restore_accountant(context.state, site.run_ledger)
    node_id = site.node_id
    dp_config = privacy.dp_config(num_rounds, task_config.train_per_client)
    train_config = dp_train_config(privacy, task_config, task.client_seed(run_seed, server_round, partition_id))
    plan = plan_release(len(data.train), train_config, dp_config)
    if len(data.train) > plan.expected_batch_size / plan.event.sample_rate:
        logger.warning(  # a local log line only: the site's count never leaves it
            "node %s holds more records than the declared dp-dataset-size; its expected batch exceeds the "
            "declared one (privacy unaffected: q is public)",
            node_id,
        )
    release = Release(
        run_id=run_id,
        node_id=node_id,
        round=server_round,
        event=plan.event,
        max_grad_norm=dp_config.max_grad_norm,
        delta=dp_config.delta,
        transport_protection=transport_protection(run_config),
        sampling_basis=plan.basis,
        declared_dataset_size=int(dp_config.dataset_size or 0),
        dp_mode=DPMode(dp_config.mode).value,
        noise_source=dp_config.noise_source,
        dataset_label=site.label,
        timestamp=received,
    )
    budget = node_budget(privacy, context.node_config)

    def record(status: ReplyStatus, **extra: str | float) -> ConfigRecord:
        return ConfigRecord(
            {
                PrivacyKey.STATUS: status.value,
                PrivacyKey.NODE_ID: node_id,
                PrivacyKey.ENTRIES: [e.canonical_bytes().decode("utf-8") for e in site.entries()],
                PrivacyKey.EPSILON_RDP: site.run_ledger.epsilon(AccountantKind.RDP),
                PrivacyKey.SITE_EPSILON_RDP: site.epsilon(dp_config.delta),
                PrivacyKey.MAX_EPSILON: budget.max_epsilon,
                **extra,
            }
        )

    try:
        budget.check(site, release)
    except BudgetExhausted as err:
        logger.warning("node %s, round %d: %s; not training", node_id, server_round, err)
        save_accountant(context.state, accountant)
        refusal = record(ReplyStatus.BUDGET_EXHAUSTED, **{PrivacyKey.REQUESTED_EPSILON: err.requested_epsilon})
        return PrivateUpdate(None, UNIFORM_WEIGHT, {}, refusal)
    with task._METHOD_LOCK:
        method = task._method(task_config, run_seed)
        update, event = dp_client_update(
            method, task.to_state(global_arrays), data.train, train_config, dp_config, accountant
        )
    arrays = task.to_arrays(update.state)
    nonce = secrets.token_bytes(32)
    charged = replace(release, event=event, update_commitment=update_commitment(nonce, arrays))
    entry = budget.charge(site, charged)
    save_opening(site.path, entry.seq, nonce)
    accountant.compose(event)
    save_accountant(context.state, accountant)
    metrics = {name: float(update.metrics[name]) for name in PUBLIC_METRICS if math.isfinite(update.metrics[name])}
    extra: dict[str, str | float] = {}
    if release.transport_protection is TransportProtection.NONE:  # the server sees the update: let it check
        extra[PrivacyKey.UPDATE_NONCE] = nonce.hex()
    return PrivateUpdate(arrays, UNIFORM_WEIGHT, metrics, record(ReplyStatus.TRAINED, **extra))


def dp_train_config(privacy: PrivacyRunConfig, task_config: task.TaskConfig, seed: int) -> TrainConfig:
    """The local optimiser under DP: the task's, with ``dp-momentum`` and ``dp-learning-rate`` (if set)."""
    base = task.train_config(task_config, seed)
    return replace(base, momentum=float(privacy.dp_momentum), lr=float(privacy.dp_learning_rate) or base.lr)


def save_opening(chain: Path, seq: int, nonce: bytes) -> None:
    """Keep the nonce that opens entry ``seq``'s update commitment at the site: ``openings/<chain name>`` (0600)."""
    path = chain.parent / "openings" / chain.name
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps({"seq": seq, "nonce": nonce.hex()}) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def __init__(
        self,
        run_dir: Path,
        privacy: PrivacyRunConfig,
        roster: Roster,
        *,
        planned: DpSgdEvent | None = None,
        transport: TransportProtection = TransportProtection.NONE,
    ) -> None:
        self.privacy = privacy
        self.roster = roster
        self.planned = planned  # the public plan every trained entry must record (None: not checked)
        self.transport = transport
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

    def collect(
        self,
        reply: Message,
        expected_node: int | None = None,
        *,
        server_round: int | None = None,
        carries_update: bool = False,
    ) -> str | None:
        """Merge the signed entries of one train reply; returns why they were rejected, or None if merged.

        ``expected_node`` is the partition the replying Flower node serves, when the server knows it. A reply to a
        message that asked for an update (``carries_update``: plain train, masking advertise, CKKS) must carry a
        privacy record; a trained one must add this round's entry (``server_round``) recording the public plan and
        transport, and under plain transport open its update commitment against the arrays it carries."""
        if reply.has_error():
            return None
        if PRIVACY_RECORD not in reply.content.config_records:
            missing = "ledger rejected: a DP run's train reply without a privacy record (no ledger entry)"
            return missing if carries_update else None
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
            merge_node_entries(self.path, parsed, self.roster)  # signed by the roster key, extends the chain
        except PrivacyError as err:
            logger.error("ledger of node %s rejected: %s", node_id, err)
            return f"ledger rejected: {err}"
        known = self.entries.setdefault(node_id, [])
        before = len(known)
        known.extend(e for e in parsed if e.seq >= len(known))
        if carries_update and record.get(PrivacyKey.STATUS) == ReplyStatus.TRAINED.value:
            # the entries are genuine (the node spent that privacy, so they stay in the run ledger), but the
            # update is aggregated only if this round's entry records the run's public plan and commits to it
            problem = self._check_new_entry(reply, record, node_id, parsed, before, server_round)
            if problem is not None:
                logger.error("update of node %s rejected: %s", node_id, problem)
                return f"ledger rejected: {problem}"
        return None

    def _check_new_entry(
        self,
        reply: Message,
        record: ConfigRecord,
        node_id: str,
        parsed: list[LedgerEntry],
        known: int,
        server_round: int | None,
    ) -> str | None:
        if len(parsed) <= known:
            return f"node {node_id} sent an update without a new ledger entry (it has {known}, sent {len(parsed)})"
        last = parsed[-1]
        if server_round is not None and last.round != server_round:
            return f"node {node_id}'s newest ledger entry is for round {last.round}, not this round {server_round}"
        if last.transport_protection != self.transport.value:
            return f"node {node_id}'s entry records transport {last.transport_protection!r}, run uses {self.transport}"
        if last.sampling_basis != SamplingBasis.DECLARED_SIZE.value:
            return f"node {node_id}'s entry was sampled from its own record count (sampling_basis local-count)"
        if self.planned is not None and last.event() != self.planned:
            return f"node {node_id}'s entry records {last.event()}, not the run's public plan {self.planned}"
        if self.transport is TransportProtection.NONE:
            nonce = record.get(PrivacyKey.UPDATE_NONCE)
            arrays = reply.content.array_records.get(RecordName.ARRAYS)
            if not isinstance(nonce, str) or arrays is None:
                return f"node {node_id}'s plain reply does not open its update commitment"
            try:
                opened = update_commitment(bytes.fromhex(nonce), from_array_record(arrays))
            except (ValueError, PrivacyError):
                return f"node {node_id}'s update nonce is malformed"
            if opened != last.update_commitment:
                return f"node {node_id}'s update does not match the commitment in its ledger entry"
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
            # every node's chain head as the server holds it now: the report checks the ledger still holds them
            HEADS_KEY: chain_heads(e for chain in self.entries.values() for e in chain),
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
            original = by_node.get(reply.metadata.src_node_id)
            server_round, carries = _train_request(original)
            problem = self._ledger.collect(reply, served, server_round=server_round, carries_update=carries)
            if problem is None or original is None:
                yield reply
            else:
                yield Message(Error(code=LEDGER_REJECTED_CODE, reason=problem), reply_to=original)


def _train_request(message: Message | None) -> tuple[int | None, bool]:
    """(server round, whether it asks for a local update) of a train message the server sent."""
    from fedmpt.apps.secure_aggregation import stage_of

    if message is None:
        return None, False
    config = message.content.config_records.get(RecordName.CONFIG)
    value = config.get(Key.SERVER_ROUND) if config is not None else None
    server_round = int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    return server_round, stage_of(message) in (None, Stage.ADVERTISE.value, Stage.CKKS.value)
