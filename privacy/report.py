"""The audit report of a run: what was trained, how useful it is, what privacy it claims and how that checks out.

:func:`write_audit_report` reads a run directory (:mod:`fedmpt.rundir`) and the privacy artefacts next to it,
and writes ``report.md``, ``report.html``, ``report.json`` and the PNG plots ``epsilon.png`` / ``map.png``
into ``<run_dir>/report/`` (or another directory). Inputs, each optional except the first two:

* ``config.json``, ``environment.json`` (the run directory itself) and ``metrics.jsonl`` (one object per round;
  its ``epsilon`` is ``null`` without DP, or ``{"delta", "accountant", "clients": {id: {"epsilon_rdp",
  "epsilon_pld"}}, ...}`` with DP);
* ``epsilon_ledger.jsonl``: the run's signed ledger, verified here with :func:`privacy.ledger.verify_ledger`
  (every signature, hash link and epsilon replayed), pinned to ``roster.json`` when that file exists;
* ``audit.json``: ``{"canary": {"trials", "epsilon_lb", "claimed_epsilon", "alpha", "delta", ...},
  "one_run": {"m", "r", "v", "epsilon_lb", "claimed_epsilon", ...}}`` from the canary audits
  (:mod:`privacy.canary`).

A missing piece is reported as "not available", never guessed. The final epsilon per client comes from the
ledger replay (the ledger is authoritative, ``docs/privacy.md`` §3); ``metrics.jsonl`` is only cross-checked
against it and plotted.

The report is built once as a small document model (sections of paragraphs, tables, lists, alerts and figures
holding *plain text*), then rendered to Markdown and to HTML. Every string is escaped by the renderer, so run
names, config values and client ids (all user input) cannot inject markup: HTML through :func:`html.escape`,
Markdown by :func:`markdown_escape` (HTML-special characters as entities, link/code/table syntax
backslash-escaped, line breaks folded). ``report.html`` is self-contained: inline CSS and the PNGs embedded as
base64 ``data:`` URIs; ``report.md`` links the PNG files next to it.

Findings: problems are collected as :class:`Finding` objects and shown at the top of the report. A
``failure`` (the ledger fails verification, a DP run has no ledger, a client is over its epsilon budget, or an
empirical lower bound exceeds the claimed epsilon) makes :attr:`WrittenReport.ok` false, so ``fedmpt report``
exits 1 while still writing the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedmpt.rundir import RunDirectory, RunDirectoryError, RunFile, atomic_write_bytes
from privacy.errors import IdentityError, LedgerError
from privacy.ledger import SECURE_MODE_REASON, LedgerEntry, VerificationReport, load_roster, verify_ledger

logger = logging.getLogger(__name__)

__all__ = [
    "Alert",
    "AuditReport",
    "Block",
    "Bullets",
    "ClientSeries",
    "DEFAULT_REPORT_DIR",
    "EPSILON_RTOL",
    "Finding",
    "Image",
    "Paragraph",
    "PrivacyFile",
    "ReportFile",
    "RunEvidence",
    "Section",
    "Severity",
    "Table",
    "WrittenReport",
    "build_report",
    "collect_evidence",
    "epsilon_plot",
    "map_plot",
    "markdown_escape",
    "render_html",
    "render_markdown",
    "write_audit_report",
]

DEFAULT_REPORT_DIR = "report"
#: Relative tolerance when comparing an epsilon in ``metrics.jsonl`` or a budget with the ledger's replay
#: (the same computation; only float formatting can differ).
EPSILON_RTOL = 1e-9
UTILITY_METRICS = ("mAP", "CF1", "OF1")


class PrivacyFile(StrEnum):
    """Privacy artefacts the report reads from the run directory."""

    LEDGER = "epsilon_ledger.jsonl"
    ROSTER = "roster.json"
    AUDIT = "audit.json"


class ReportFile(StrEnum):
    """Files the report writes."""

    MARKDOWN = "report.md"
    HTML = "report.html"
    JSON = "report.json"
    EPSILON_PLOT = "epsilon.png"
    MAP_PLOT = "map.png"


class Severity(StrEnum):
    """How bad a finding is: a ``failure`` fails the report (exit 1), a ``warning`` does not."""

    FAILURE = "failure"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """A problem the report shows at the top."""

    severity: Severity
    text: str


# ----------------------------------------------------------------------------------------------------------
# Document model: plain text only; the renderers escape.


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text, optionally in bold."""

    text: str
    strong: bool = False


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table of plain-text cells; every row has as many cells as the header."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"table row {row!r} has {len(row)} cells, header has {len(self.header)}")


@dataclass(frozen=True)
class Image:
    """A figure: a PNG written next to the report (``filename``) with its alternative text."""

    filename: str
    alt: str


@dataclass(frozen=True)
class Alert:
    """A finding shown in place, styled by its severity."""

    finding: Finding


Block = Paragraph | Bullets | Table | Image | Alert


@dataclass(frozen=True)
class Section:
    """A titled section of blocks."""

    title: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class AuditReport:
    """The rendered-to-be report: title, findings, sections, and a JSON summary of the key numbers."""

    title: str
    findings: tuple[Finding, ...]
    sections: tuple[Section, ...]
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True when no finding is a failure."""
        return all(f.severity is not Severity.FAILURE for f in self.findings)


# ----------------------------------------------------------------------------------------------------------
# Evidence: what the run directory holds, parsed once.


@dataclass(frozen=True)
class ClientSeries:
    """Cumulative epsilon of one client over rounds: ``(round, epsilon_rdp, epsilon_pld or None)``."""

    client_id: str
    points: tuple[tuple[int, float, float | None], ...]


@dataclass(frozen=True)
class RunEvidence:
    """Everything the report reads from a run directory.

    ``ledger`` is the verification report (None without a ledger file), ``ledger_error`` why the ledger or
    roster could not be used at all, ``ledger_entries`` the entries that parse (verified or not, for the DP
    parameter table and plots), ``audit`` the parsed ``audit.json`` (None when absent), ``audit_error`` why it
    could not be read.
    """

    path: Path
    name: str
    config: dict[str, Any]
    config_sha256: str
    environment: dict[str, Any]
    state: dict[str, Any]
    rounds: tuple[dict[str, Any], ...]
    ledger: VerificationReport | None
    ledger_error: str | None
    roster_used: bool
    ledger_entries: tuple[LedgerEntry, ...]
    audit: dict[str, Any] | None
    audit_error: str | None
    epsilon_series: tuple[ClientSeries, ...] = field(default=())
    epsilon_series_source: str = ""

    @property
    def dp_enabled(self) -> bool:
        """DP is on when the config says so, or (config silent) when the ledger has entries."""
        flag = self.config.get("dp")
        if isinstance(flag, bool):
            return flag
        return bool(self.ledger_entries)


def _read_optional_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), (None, None) when the file is absent, or (None, reason) when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} is not readable JSON: {err}"


def _parse_ledger_entries(path: Path) -> tuple[LedgerEntry, ...]:
    """Entries of the ledger that parse canonically (unverified: verification is :func:`verify_ledger`'s)."""
    entries = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            entries.append(LedgerEntry.from_line(line))
        except LedgerError:
            continue
    return tuple(entries)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _budget(config: Mapping[str, Any]) -> float | None:
    """The run's per-node budget ``max-epsilon``; 0 (the run-config default) or less means no budget."""
    value = _finite(config.get("max-epsilon"))
    return value if value is not None and value > 0 else None


def _items(value: Any) -> list[Any]:
    """``value`` if it is a JSON list, else an empty list."""
    return value if isinstance(value, list) else []


def _integer(value: Any) -> int:
    """``value`` if it is an integer (not a bool), else 0: metrics lines are read leniently."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _series_from_metrics(rounds: Sequence[Mapping[str, Any]]) -> tuple[ClientSeries, ...]:
    """Per-client cumulative epsilon recorded in ``metrics.jsonl`` (a bare number is the run's maximum)."""
    points: dict[str, list[tuple[int, float, float | None]]] = {}
    for record in rounds:
        round_ = record.get("round")
        if not isinstance(round_, int):
            continue
        epsilon = record.get("epsilon")
        if isinstance(epsilon, Mapping):
            clients = epsilon.get("clients")
            if not isinstance(clients, Mapping):
                continue
            for client_id, values in clients.items():
                if not isinstance(values, Mapping):
                    continue
                rdp = _finite(values.get("epsilon_rdp"))
                if rdp is not None:
                    points.setdefault(str(client_id), []).append((round_, rdp, _finite(values.get("epsilon_pld"))))
        elif (value := _finite(epsilon)) is not None:
            points.setdefault("max over clients", []).append((round_, value, None))
    return tuple(ClientSeries(c, tuple(p)) for c, p in sorted(points.items(), key=lambda kv: _client_key(kv[0])))


def _series_from_ledger(entries: Iterable[LedgerEntry]) -> tuple[ClientSeries, ...]:
    """Per-node cumulative epsilon after each round, from the ledger entries (last entry of a round wins)."""
    by_node: dict[str, dict[int, tuple[float, float]]] = {}
    for entry in entries:
        by_node.setdefault(entry.node_id, {})[entry.round] = (entry.epsilon_rdp, entry.epsilon_pld)
    return tuple(
        ClientSeries(node, tuple((r, rdp, pld) for r, (rdp, pld) in sorted(rounds.items())))
        for node, rounds in sorted(by_node.items(), key=lambda kv: _client_key(kv[0]))
    )


def _client_key(client_id: str) -> tuple[int, int, str]:
    """Sort numeric ids numerically, then the rest alphabetically."""
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def collect_evidence(run_dir: str | Path) -> RunEvidence:
    """Read a run directory, verify its ledger (with ``roster.json`` if present) and load ``audit.json``.

    Raises:
        RunDirectoryError: ``run_dir`` is not a run directory (no valid ``config.json`` / ``environment.json``
            / ``metrics.jsonl``) or a metrics line is not JSON.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirectoryError(f"{path} is not a directory (expected a fedmpt run directory)")
    run = RunDirectory.open(path)
    if not (path / RunFile.METRICS).is_file():
        raise RunDirectoryError(f"{path / RunFile.METRICS} is missing; {path} is not a complete run directory")
    rounds = tuple(record for record in run.metrics() if isinstance(record, dict))
    environment, _ = _read_optional_json(path / RunFile.ENVIRONMENT)
    state, _ = _read_optional_json(path / RunFile.STATE)

    ledger_path = path / PrivacyFile.LEDGER
    roster_path = path / PrivacyFile.ROSTER
    ledger: VerificationReport | None = None
    ledger_error: str | None = None
    entries: tuple[LedgerEntry, ...] = ()
    roster_used = False
    if ledger_path.exists():
        try:
            roster = load_roster(roster_path) if roster_path.exists() else None
            roster_used = roster is not None
            ledger = verify_ledger(ledger_path, roster)
            entries = _parse_ledger_entries(ledger_path)
        except (IdentityError, LedgerError, OSError) as err:
            ledger_error = str(err)
            logger.warning("ledger of %s could not be verified: %s", path, err)

    audit_data, audit_error = _read_optional_json(path / PrivacyFile.AUDIT)
    if audit_data is not None and not isinstance(audit_data, dict):
        audit_data, audit_error = None, f"{PrivacyFile.AUDIT} must hold a JSON object"

    series = _series_from_metrics(rounds)
    source = str(RunFile.METRICS)
    if not series and entries:
        series, source = _series_from_ledger(entries), str(PrivacyFile.LEDGER)
    return RunEvidence(
        path=path,
        name=path.resolve().name,
        config=dict(run.config),
        config_sha256=run.config_sha256,
        environment=environment if isinstance(environment, dict) else {},
        state=state if isinstance(state, dict) else {},
        rounds=rounds,
        ledger=ledger,
        ledger_error=ledger_error,
        roster_used=roster_used,
        ledger_entries=entries,
        audit=audit_data,
        audit_error=audit_error,
        epsilon_series=series,
        epsilon_series_source=source if series else "",
    )


# ----------------------------------------------------------------------------------------------------------
# Formatting


NOT_AVAILABLE = "not available"


def _fmt(value: Any, spec: str = ".6g") -> str:
    """A number with ``spec``, JSON for other values, "n/a" for null/non-finite."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format(value, spec) if math.isfinite(value) else "n/a"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _metric(value: Any) -> str:
    number = _finite(value)
    return "n/a" if number is None else f"{number:.4f}"


def _epsilon(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


# ----------------------------------------------------------------------------------------------------------
# Sections


def _summary_section(ev: RunEvidence) -> Section:
    cfg = ev.config
    sampled = sorted({str(c) for r in ev.rounds for c in _items(r.get("clients_sampled"))}, key=_client_key)
    failures = sum(len(_items(r.get("clients_failed"))) for r in ev.rounds)
    wall = sum(_finite(r.get("wall_time_s")) or 0.0 for r in ev.rounds)
    down = sum(_integer(r.get("bytes_down")) for r in ev.rounds)
    up = sum(_integer(r.get("bytes_up")) for r in ev.rounds)
    rows = [
        ("run", ev.name),
        ("method", _fmt(cfg.get("method", NOT_AVAILABLE))),
        ("dataset", _fmt(cfg.get("dataset", NOT_AVAILABLE))),
        ("rounds completed", f"{len(ev.rounds)} of {_fmt(cfg.get('num-server-rounds', 'n/a'))} configured"),
        ("finished", _fmt(ev.state.get("finished")) if "finished" in ev.state else NOT_AVAILABLE),
        ("clients sampled (distinct)", f"{len(sampled)}: {', '.join(sampled)}" if sampled else "0"),
        ("min-clients / fraction-train", f"{_fmt(cfg.get('min-clients'))} / {_fmt(cfg.get('fraction-train'))}"),
        ("client failures (all rounds)", str(failures)),
        ("wall time (sum of rounds)", f"{wall:.1f} s"),
        ("bytes down / up (all rounds)", f"{down} / {up}"),
        ("config sha256", ev.config_sha256),
    ]
    env = ev.environment
    revision = env.get("git_revision")
    dirty = env.get("git_dirty")
    rows += [
        ("python", f"{_fmt(env.get('python', NOT_AVAILABLE))} ({_fmt(env.get('implementation', 'n/a'))})"),
        ("platform", _fmt(env.get("platform", NOT_AVAILABLE))),
        ("git revision", f"{revision}{' (dirty)' if dirty else ''}" if revision else NOT_AVAILABLE),
        ("seed", _fmt(env.get("seed", NOT_AVAILABLE))),
        ("created (UTC)", _fmt(env.get("created_utc", NOT_AVAILABLE))),
    ]
    packages = env.get("packages")
    blocks: list[Block] = [Table(("item", "value"), tuple(rows))]
    if isinstance(packages, Mapping) and packages:
        blocks.append(
            Table(
                ("package", "version"),
                tuple((str(k), _fmt(v) if v is not None else "not installed") for k, v in sorted(packages.items())),
            )
        )
    else:
        blocks.append(Paragraph(f"Package versions: {NOT_AVAILABLE} (no environment.json)."))
    config_rows = tuple((str(k), _fmt(v)) for k, v in sorted(cfg.items()))
    blocks.append(Paragraph("Resolved run config (config.json):"))
    blocks.append(Table(("key", "value"), config_rows) if config_rows else Paragraph("(empty)"))
    return Section("Run summary", tuple(blocks))


def _utility_section(ev: RunEvidence, has_map_plot: bool) -> Section:
    if not ev.rounds:
        return Section("Utility", (Paragraph(f"No completed rounds: utility {NOT_AVAILABLE}."),))
    rows = []
    for record in ev.rounds:
        raw_global = record.get("global")
        global_metrics: Mapping[str, Any] = raw_global if isinstance(raw_global, Mapping) else {}
        replied = len(_items(record.get("clients_replied")))
        sampled = len(_items(record.get("clients_sampled")))
        failed = len(_items(record.get("clients_failed")))
        rows.append(
            (
                _fmt(record.get("round")),
                *(_metric(global_metrics.get(m)) for m in UTILITY_METRICS),
                f"{replied}/{sampled}",
                str(failed),
            )
        )
    blocks: list[Block] = [
        Paragraph("Global test-split metrics per round (metrics.jsonl; n/a where a metric is undefined)."),
        Table(("round", *UTILITY_METRICS, "replied/sampled", "failed"), tuple(rows)),
    ]
    last_clients = ev.rounds[-1].get("clients")
    if isinstance(last_clients, Mapping) and last_clients:
        client_rows = tuple(
            (str(cid), *(_metric(ms.get(m)) if isinstance(ms, Mapping) else "n/a" for m in UTILITY_METRICS))
            for cid, ms in sorted(last_clients.items(), key=lambda kv: _client_key(str(kv[0])))
        )
        blocks.append(
            Paragraph(f"Per-client metrics on each client's own split, round {_fmt(ev.rounds[-1].get('round'))}:")
        )
        blocks.append(Table(("client", *UTILITY_METRICS), client_rows))
    if has_map_plot:
        blocks.append(Image(ReportFile.MAP_PLOT, "global (and per-client) mAP over rounds"))
    return Section("Utility", tuple(blocks))


def _budget_accountant(cfg: Mapping[str, Any]) -> str:
    return "pld" if cfg.get("accountant") == "pld" else "rdp"


def _client_failure_rounds(ev: RunEvidence, needle: str) -> dict[str, int]:
    """Client id -> last round in which one of its failures mentions ``needle`` (case-insensitive)."""
    found: dict[str, int] = {}
    for record in ev.rounds:
        for failure in _items(record.get("clients_failed")):
            if not isinstance(failure, Mapping):
                continue
            if needle in str(failure.get("reason", "")).lower() and failure.get("client_id") is not None:
                found[str(failure["client_id"])] = _integer(record.get("round"))
    return found


def _last_replied_round(ev: RunEvidence) -> dict[str, int]:
    last: dict[str, int] = {}
    for record in ev.rounds:
        for client in _items(record.get("clients_replied")):
            last[str(client)] = _integer(record.get("round"))
    return last


_DP_MODES = {
    "exact": "per-sample gradients of all trainable parameters (prompts included) are clipped to C jointly in "
    "parameter space before the noise is added.",
    "feature": "per-sample gradients are clipped to C in text-feature space (with the other trainable "
    "parameters); the noisy feature gradient is mapped to the prompts afterwards, which is post-processing, so "
    "the accounting (sigma, q, steps) is the same as in exact mode.",
}


def _privacy_section(ev: RunEvidence, findings: list[Finding], summary: dict[str, Any], has_plot: bool) -> Section:
    cfg = ev.config
    if not ev.dp_enabled:
        summary["dp"] = False
        text = (
            "DP is off for this run (config dp = false): clients' updates carry no record-level differential "
            "privacy guarantee, and epsilon is not defined."
        )
        if ev.ledger_entries:
            findings.append(Finding(Severity.WARNING, "config says dp = false but the run has ledger entries"))
        return Section("Privacy guarantee", (Paragraph(text, strong=True),))
    summary["dp"] = True
    entries = ev.ledger_entries
    delta = entries[-1].delta if entries else _finite(cfg.get("delta"))
    blocks: list[Block] = [
        Paragraph(
            "Guarantee: record-level (example-level) (epsilon, delta)-DP of each client's local data under "
            "add/remove-one neighbouring datasets, covering every update the client sent in every round. It is "
            "per client, not client-level DP, and holds against anyone who sees the updates, the server included; "
            "secure aggregation does not change epsilon."
        )
    ]

    def distinct(values: Iterable[Any]) -> str:
        unique = sorted(set(values))
        return ", ".join(_fmt(v) for v in unique) if unique else NOT_AVAILABLE

    steps_by_node: dict[str, int] = {}
    for entry in entries:
        steps_by_node[entry.node_id] = steps_by_node.get(entry.node_id, 0) + entry.steps
    source = "ledger" if entries else "config"
    blocks.append(
        Table(
            ("parameter", "value", "source"),
            (
                (
                    "noise multiplier sigma",
                    distinct(e.noise_multiplier for e in entries)
                    if entries
                    else _fmt(cfg.get("noise-multiplier", NOT_AVAILABLE)),
                    source,
                ),
                ("sample rate q", distinct(e.sample_rate for e in entries), "ledger"),
                (
                    "clip norm C",
                    distinct(e.max_grad_norm for e in entries)
                    if entries
                    else _fmt(cfg.get("max-grad-norm", NOT_AVAILABLE)),
                    source,
                ),
                ("DP-SGD steps per client (total)", distinct(steps_by_node.values()), "ledger"),
                ("delta", _fmt(delta) if delta is not None else NOT_AVAILABLE, source),
                ("sampling", distinct(e.sampling for e in entries), "ledger"),
                ("budget accountant", _fmt(cfg.get("accountant", "rdp")), "config"),
                ("dp-mode", _fmt(cfg.get("dp-mode", NOT_AVAILABLE)), "config"),
                ("target epsilon", _fmt(cfg.get("target-epsilon", NOT_AVAILABLE)), "config"),
                ("per-node budget max-epsilon", _fmt(cfg.get("max-epsilon", "none")), "config"),
            ),
        )
    )
    mode = cfg.get("dp-mode")
    if mode in _DP_MODES:
        blocks.append(Paragraph(f"dp-mode {mode}: {_DP_MODES[mode]}"))
    if ev.ledger is None or not ev.ledger.nodes:
        blocks.append(
            Alert(Finding(Severity.WARNING, f"Final epsilon per client: {NOT_AVAILABLE} (no usable ledger)."))
        )
        summary["clients"] = {}
    else:
        blocks.extend(_final_epsilon_blocks(ev, ev.ledger, findings, summary))
    if has_plot:
        blocks.append(
            Paragraph(
                f"Cumulative epsilon per client over rounds (source: {ev.epsilon_series_source}; "
                "solid RDP, dashed PLD)."
            )
        )
        blocks.append(Image(ReportFile.EPSILON_PLOT, "cumulative epsilon per client over rounds, RDP and PLD"))
    else:
        blocks.append(Paragraph(f"Epsilon over rounds: {NOT_AVAILABLE} (no epsilon in metrics.jsonl or ledger)."))
    return Section("Privacy guarantee", tuple(blocks))


def _final_epsilon_blocks(
    ev: RunEvidence, ledger: VerificationReport, findings: list[Finding], summary: dict[str, Any]
) -> list[Block]:
    cfg = ev.config
    budget = _budget(cfg)
    accountant = _budget_accountant(cfg)
    exhausted = _client_failure_rounds(ev, "budget")
    metrics_last = {s.client_id: s.points[-1] for s in _series_from_metrics(ev.rounds)}
    steps: dict[str, int] = {}
    for entry in ev.ledger_entries:
        steps[entry.node_id] = steps.get(entry.node_id, 0) + entry.steps
    rows = []
    clients_summary: dict[str, Any] = {}
    cross_check_bad = []
    for node_id in sorted(ledger.nodes, key=_client_key):
        node = ledger.nodes[node_id]
        ratio = node.epsilon_rdp / node.epsilon_pld if node.epsilon_pld > 0 else math.inf
        if node.epsilon_pld > node.epsilon_rdp * (1 + 1e-6):
            findings.append(
                Finding(
                    Severity.WARNING,
                    f"client {node_id}: PLD epsilon {node.epsilon_pld:.6g} exceeds RDP "
                    f"{node.epsilon_rdp:.6g} (PLD should be the tighter bound)",
                )
            )
        spent = node.epsilon_pld if accountant == "pld" else node.epsilon_rdp
        if budget is None:
            status = "no budget set"
        elif spent > budget * (1 + EPSILON_RTOL):
            status = f"OVER BUDGET ({spent:.6g} > {budget:g})"
            findings.append(
                Finding(
                    Severity.FAILURE,
                    f"client {node_id} spent epsilon {spent:.6g} ({accountant}) "
                    f"above its budget max-epsilon {budget:g}",
                )
            )
        elif node_id in exhausted:
            status = f"exhausted (refused in round {exhausted[node_id]}); {budget - spent:.4g} left"
        else:
            status = f"within budget; {budget - spent:.4g} of {budget:g} left"
        verified = "yes" if node.verified else f"NO (verified up to round {node.last_round})"
        rows.append(
            (
                node_id,
                str(node.entries),
                str(node.last_round),
                str(steps.get(node_id, "n/a")),
                _epsilon(node.epsilon_rdp),
                _epsilon(node.epsilon_pld),
                f"{ratio:.3f}" if math.isfinite(ratio) else "n/a",
                status,
                verified,
            )
        )
        clients_summary[node_id] = {
            "epsilon_rdp": node.epsilon_rdp,
            "epsilon_pld": node.epsilon_pld,
            "delta": node.delta,
            "entries": node.entries,
            "last_round": node.last_round,
            "verified": node.verified,
            "budget_status": status,
        }
        recorded = metrics_last.get(node_id)
        if recorded is not None:
            scale = max(abs(recorded[1]), abs(node.epsilon_rdp), 1e-300)
            if abs(recorded[1] - node.epsilon_rdp) / scale > EPSILON_RTOL and recorded[0] >= node.last_round:
                cross_check_bad.append(f"{node_id} (metrics {recorded[1]:.6g}, ledger {node.epsilon_rdp:.6g})")
    summary["clients"] = clients_summary
    deltas = sorted({n.delta for n in ledger.nodes.values()})
    if len(deltas) > 1:
        findings.append(
            Finding(Severity.WARNING, f"clients report epsilon at different deltas {deltas}: epsilons not comparable")
        )
    delta = max(deltas)
    blocks: list[Block] = [
        Paragraph(
            f"Final epsilon per client at delta = {delta:g}, replayed from the ledger's recorded (sigma, q, steps) "
            "history by verify_ledger (RDP: Opacus analysis; PLD: dp_accounting, the tighter of the two upper "
            f"bounds). Budget status uses the {accountant.upper()} epsilon."
        ),
        Table(
            (
                "client",
                "entries",
                "last round",
                "steps",
                "epsilon (RDP)",
                "epsilon (PLD)",
                "RDP/PLD",
                "budget",
                "verified",
            ),
            tuple(rows),
        ),
    ]
    values = [n.epsilon_rdp for n in ledger.nodes.values()]
    summary["max_epsilon_rdp"] = max(values)
    summary["max_epsilon_pld"] = max(n.epsilon_pld for n in ledger.nodes.values())
    summary["delta"] = delta
    blocks.append(
        Paragraph(
            f"Largest client epsilon: {_epsilon(summary['max_epsilon_rdp'])} (RDP), "
            f"{_epsilon(summary['max_epsilon_pld'])} (PLD). RDP/PLD cross-check: both are upper bounds; PLD is "
            "expected to be the smaller, by ~8-10% for many steps and up to ~3x for a single lightly "
            "subsampled step."
        )
    )
    if cross_check_bad:
        findings.append(
            Finding(
                Severity.WARNING,
                "metrics.jsonl epsilon differs from the ledger replay for client(s) " + "; ".join(cross_check_bad),
            )
        )
    elif metrics_last:
        blocks.append(Paragraph("metrics.jsonl's last recorded epsilon (RDP) of every client agrees with the ledger."))
    return blocks


def _ledger_section(ev: RunEvidence, findings: list[Finding], summary: dict[str, Any]) -> Section:
    ledger_file = PrivacyFile.LEDGER
    if ev.ledger_error is not None:
        finding = Finding(Severity.FAILURE, f"LEDGER NOT VERIFIED: {ev.ledger_error}")
        findings.append(finding)
        summary["ledger"] = {"status": "error", "error": ev.ledger_error}
        return Section("Ledger verification", (Alert(finding),))
    if ev.ledger is None:
        if ev.dp_enabled:
            finding = Finding(Severity.FAILURE, f"DP run without {ledger_file}: no client epsilon can be verified.")
            findings.append(finding)
            summary["ledger"] = {"status": "missing"}
            return Section("Ledger verification", (Alert(finding),))
        summary["ledger"] = {"status": "not applicable"}
        return Section("Ledger verification", (Paragraph(f"{NOT_AVAILABLE}: no {ledger_file} (DP is off)."),))
    report = ev.ledger
    blocks: list[Block] = []
    first = report.first_failure
    if first is not None:
        finding = Finding(
            Severity.FAILURE,
            f"LEDGER VERIFICATION FAILED at {first}"
            + (f" ({len(report.failures) - 1} more failure(s))" if len(report.failures) > 1 else ""),
        )
        findings.append(finding)
        blocks.append(Alert(finding))
    else:
        blocks.append(
            Paragraph(
                f"Verified: {report.lines} lines, {len(report.nodes)} node chain(s); every signature, hash link, "
                "sequence number and epsilon (replayed with both accountants) checks out.",
                strong=True,
            )
        )
    if report.missing_nodes:
        findings.append(
            Finding(Severity.WARNING, f"roster nodes without ledger entries: {', '.join(report.missing_nodes)}")
        )
    if ev.roster_used:
        blocks.append(
            Paragraph(
                f"Signatures were checked against the keys pinned in {PrivacyFile.ROSTER}: neither the server nor "
                "anyone else without a node's private key can have forged, edited, reordered or re-signed that "
                "node's entries (dropping a chain's last entries is still possible). This holds only if the "
                "roster came from a channel the server does not control."
            )
        )
    else:
        findings.append(
            Finding(Severity.WARNING, f"no {PrivacyFile.ROSTER}: ledger signatures checked for self-consistency only")
        )
        blocks.append(
            Paragraph(
                f"No {PrivacyFile.ROSTER}: each chain was checked against the key of its own first entry, which "
                "shows self-consistency only; a chain wholly re-signed by another key (e.g. by the server) would "
                f"pass. Verify with a roster: fedmpt ledger verify {ledger_file} --keys roster.json."
            )
        )
    if report.failures:
        blocks.append(
            Table(
                ("line", "node", "reason"),
                tuple(
                    (str(f.line), f.node_id if f.node_id is not None else "unknown", f.reason) for f in report.failures
                ),
            )
        )
    # Tail check: a node's chain that ends before the last round the server saw it reply may have lost entries.
    replied = _last_replied_round(ev)
    overlap = set(replied) & set(report.nodes)
    if ev.dp_enabled and replied and not overlap and report.nodes:
        blocks.append(
            Paragraph("Ledger node ids do not match the client ids of metrics.jsonl: the tail check is not possible.")
        )
    tail_check = ev.dp_enabled and bool(overlap)
    tail_failures: list[str] = []
    for node_id in sorted(set(replied) - set(report.nodes), key=_client_key) if tail_check else []:
        tail_failures.append(
            f"client {node_id} replied in round {replied[node_id]} but has no verified ledger entries: "
            "the ledger does not account for its releases"
        )
    for node_id in sorted(overlap, key=_client_key) if tail_check else []:
        node = report.nodes[node_id]
        if node.verified and replied[node_id] > node.last_round:
            tail_failures.append(
                f"client {node_id} replied in round {replied[node_id]} but its ledger chain ends at round "
                f"{node.last_round}: entries are missing and its epsilon is under-reported"
            )
    findings.extend(Finding(Severity.FAILURE, text) for text in tail_failures)
    if tail_check:
        outcome = "FAILED (see the findings at the top)" if tail_failures else "passed"
        blocks.append(
            Paragraph(
                f"Tail check {outcome}: each client's chain must reach the last round the server saw it reply in "
                "(ledger node ids matched to metrics.jsonl client ids); a chain cut short under-reports epsilon "
                "and is otherwise undetectable from the ledger alone."
            )
        )
    summary["ledger"] = {
        "status": "verified" if report.ok else "failed",
        "roster": ev.roster_used,
        "lines": report.lines,
        "first_failure": str(first) if first is not None else None,
        "failures": len(report.failures),
    }
    return Section("Ledger verification", tuple(blocks))


_THREAT_MODELS = {
    "none": (
        "No transport protection: the server sees every client's update in the clear. Privacy of the local "
        "data rests on DP alone (if enabled)."
    ),
    "masking": (
        "Pairwise masking (Bonawitz et al. 2017 double masking, secagg.masking): an honest-but-curious server "
        "colluding with fewer than t clients learns only the weighted sum of at least t updates (t-of-n Shamir "
        "threshold); round keys are signed with Ed25519 identity keys checked against a provisioned roster, so the "
        "server cannot substitute keys. Not covered: an actively malicious server without the consistency check "
        "(use t > 2n/3), Sybil identities in the roster, and the exact sum itself, which the server sees."
    ),
    "ckks": (
        "CKKS homomorphic encryption (TenSEAL, secagg.ckks) under one secret key shared by all clients: the server "
        "sees only ciphertexts, but the server colluding with any one client decrypts every individual update. "
        "Decrypted aggregates must not go back to a key-less party (IND-CPA-D key recovery, Li & Micciancio 2021); "
        "whoever provisioned the keys knows the secret key."
    ),
}


def _threat_section(ev: RunEvidence, findings: list[Finding], summary: dict[str, Any]) -> Section:
    mode = ev.config.get("secure-aggregation")
    blocks: list[Block] = []
    if mode is None:
        blocks.append(Paragraph(f"Transport protection: {NOT_AVAILABLE} (no secure-aggregation key in the config)."))
    elif isinstance(mode, str) and mode in _THREAT_MODELS:
        blocks.append(Paragraph(f"Transport protection in force: {mode}.", strong=True))
        blocks.append(Paragraph(_THREAT_MODELS[mode]))
    else:
        blocks.append(Paragraph(f"Unknown secure-aggregation value {_fmt(mode)}: no threat model can be stated."))
        findings.append(Finding(Severity.WARNING, f"unknown secure-aggregation value {_fmt(mode)}"))
    recorded = sorted({e.transport_protection for e in ev.ledger_entries})
    if recorded and isinstance(mode, str) and recorded != [mode]:
        findings.append(
            Finding(
                Severity.WARNING,
                f"ledger entries record transport protection {', '.join(recorded)} but the config says {mode}",
            )
        )
    blocks.append(
        Paragraph(
            "Transport protection is defence in depth: it hides individual updates from the server but is not a DP "
            "mechanism and does not change epsilon (docs/secure_aggregation.md)."
        )
    )
    summary["secure_aggregation"] = mode
    return Section("Threat model in force", tuple(blocks))


def _audit_section(ev: RunEvidence, findings: list[Finding], summary: dict[str, Any]) -> Section:
    explanation = Bullets(
        (
            "An audit gives an empirical LOWER bound epsilon_lb on the privacy loss. A lower bound above the claimed "
            "epsilon proves a bug (accounting, clipping, noise, sampling or per-sample gradients).",
            "A lower bound below the claim proves nothing about privacy: it only rules out bugs large enough for "
            "that attack to see. Sample size caps what an audit can certify (a perfect one-run attack with 1000 "
            "guesses certifies at most ~5.8 at 95%).",
            "Canary audit: white-box, many trials of one DP-SGD step with and without a gradient canary; claim = "
            "one un-subsampled Gaussian step. One-run audit (Steinke, Nasr, Jagielski 2023): m canaries, each "
            "included with probability 1/2, one whole training; r guesses, v correct.",
        )
    )
    if ev.audit_error is not None:
        findings.append(Finding(Severity.WARNING, f"empirical audit unreadable: {ev.audit_error}"))
        summary["audit"] = {"status": "error", "error": ev.audit_error}
        return Section("Empirical audit", (Paragraph(f"Empirical audit: {ev.audit_error}."), explanation))
    if ev.audit is None:
        summary["audit"] = {"status": "not available"}
        return Section(
            "Empirical audit",
            (
                Paragraph(f"Empirical audit: {NOT_AVAILABLE} (no {PrivacyFile.AUDIT} in the run directory)."),
                explanation,
            ),
        )
    rows = []
    audit_summary: dict[str, Any] = {}
    for key, label, details in (
        ("canary", "canary (one DP step)", ("trials", "alpha", "delta")),
        ("one_run", "one-run (whole training)", ("m", "r", "v", "delta", "confidence")),
    ):
        part = ev.audit.get(key)
        if not isinstance(part, Mapping):
            rows.append((label, NOT_AVAILABLE, NOT_AVAILABLE, NOT_AVAILABLE, ""))
            continue
        lower = _finite(part.get("epsilon_lb"))
        claimed = _finite(part.get("claimed_epsilon"))
        if lower is None or claimed is None:
            verdict = "incomplete (epsilon_lb or claimed_epsilon missing)"
            findings.append(Finding(Severity.WARNING, f"{PrivacyFile.AUDIT} {key}: {verdict}"))
        elif lower > claimed:
            verdict = "VIOLATION: lower bound exceeds the claim (a bug)"
            findings.append(
                Finding(Severity.FAILURE, f"{label} audit: epsilon_lb {lower:.4g} > claimed epsilon {claimed:.4g}")
            )
        else:
            verdict = "no violation detected"
        setting = ", ".join(f"{d}={_fmt(part[d])}" for d in details if d in part)
        rows.append((label, _epsilon(lower), _epsilon(claimed), verdict, setting))
        audit_summary[key] = {"epsilon_lb": lower, "claimed_epsilon": claimed, "verdict": verdict}
    summary["audit"] = audit_summary
    table = Table(("audit", "epsilon_lb", "claimed epsilon", "verdict", "setting"), tuple(rows))
    return Section("Empirical audit", (table, explanation))


def _limitations_section() -> Section:
    return Section(
        "Known limitations",
        (
            Bullets(
                (
                    f"Opacus secure_mode is unavailable on Python 3.11: {SECURE_MODE_REASON}.",
                    "Floating-point attacks: the Gaussian noise is sampled in floating point, whose gaps can leak the "
                    "noiseless value (Mironov 2012; arXiv 2107.10138, 2112.05307); without secure_mode no "
                    "mitigation is applied, so the stated epsilon assumes ideal real-valued noise.",
                    "The guarantee is record-level per client, not client-level: a client's whole dataset is not "
                    "protected as one unit.",
                    "The ledger records what each node claims it did; that DP-SGD really used these parameters is "
                    "what the audits and the DP-SGD tests check. Dropping a chain's last entries is not detectable "
                    "from the ledger alone (compare with the rounds the client replied in).",
                )
            ),
        ),
    )


def build_report(ev: RunEvidence, *, has_epsilon_plot: bool, has_map_plot: bool) -> AuditReport:
    """Assemble the report's sections and findings from the evidence (no I/O)."""
    findings: list[Finding] = []
    summary: dict[str, Any] = {"run": ev.name, "rounds": len(ev.rounds), "config_sha256": ev.config_sha256}
    sections = [
        _summary_section(ev),
        _utility_section(ev, has_map_plot),
        _privacy_section(ev, findings, summary, has_epsilon_plot),
        _ledger_section(ev, findings, summary),
        _threat_section(ev, findings, summary),
        _audit_section(ev, findings, summary),
        _limitations_section(),
    ]
    summary["utility"] = [
        {
            "round": r.get("round"),
            **{m: _finite(g.get(m)) if isinstance(g := r.get("global"), Mapping) else None for m in UTILITY_METRICS},
        }
        for r in ev.rounds
    ]
    summary["findings"] = [{"severity": f.severity.value, "text": f.text} for f in findings]
    summary["ok"] = all(f.severity is not Severity.FAILURE for f in findings)
    return AuditReport(f"Audit report: run {ev.name}", tuple(findings), tuple(sections), summary)


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot global state)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def epsilon_plot(ev: RunEvidence) -> bytes | None:
    """PNG of cumulative epsilon per client over rounds (RDP solid, PLD dashed), or None without data."""
    if not ev.epsilon_series:
        return None
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(ev.epsilon_series))]
    for series, colour in zip(ev.epsilon_series, colours, strict=True):
        rounds = [p[0] for p in series.points]
        axes.plot(
            rounds, [p[1] for p in series.points], "-o", color=colour, markersize=3, label=f"{series.client_id} RDP"
        )
        pld = [(p[0], p[2]) for p in series.points if p[2] is not None]
        if pld:
            axes.plot([p[0] for p in pld], [p[1] for p in pld], "--", color=colour, label=f"{series.client_id} PLD")
    budget = _budget(ev.config)
    highest = max(max(p[1], p[2] or 0.0) for series in ev.epsilon_series for p in series.points)
    title = "epsilon per client"
    if budget is not None and budget <= 2 * highest:
        axes.axhline(budget, color="red", linewidth=1, linestyle=":", label="budget max-epsilon")
    elif budget is not None:  # a far-away budget line would flatten every curve
        title += f" (budget max-epsilon {budget:g}, off scale)"
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("cumulative epsilon")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", ncol=2 if len(ev.epsilon_series) > 4 else 1)
    figure.tight_layout()
    return _png(figure)


def map_plot(ev: RunEvidence) -> bytes | None:
    """PNG of global mAP over rounds, with each client's mAP on its own split when recorded; None without data."""
    global_points = [
        (r["round"], v)
        for r in ev.rounds
        if isinstance(r.get("round"), int)
        and isinstance(r.get("global"), Mapping)
        and (v := _finite(r["global"].get("mAP"))) is not None
    ]
    clients: dict[str, list[tuple[int, float]]] = {}
    for r in ev.rounds:
        per_client = r.get("clients")
        if not isinstance(per_client, Mapping) or not isinstance(r.get("round"), int):
            continue
        for cid, ms in per_client.items():
            if isinstance(ms, Mapping) and (v := _finite(ms.get("mAP"))) is not None:
                clients.setdefault(str(cid), []).append((r["round"], v))
    if not global_points and not clients:
        return None
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    for cid, points in sorted(clients.items(), key=lambda kv: _client_key(kv[0])):
        axes.plot([p[0] for p in points], [p[1] for p in points], "-", linewidth=0.8, alpha=0.6, label=f"client {cid}")
    if global_points:
        axes.plot(
            [p[0] for p in global_points],
            [p[1] for p in global_points],
            "-o",
            color="black",
            linewidth=2,
            markersize=3,
            label="global",
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("mAP")
    axes.set_title("mAP over rounds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", ncol=2 if len(clients) > 6 else 1)
    figure.tight_layout()
    return _png(figure)


# ----------------------------------------------------------------------------------------------------------
# Rendering

_MARKDOWN_BACKSLASH = re.compile(r"([\\`*_\[\]|#!])")


def markdown_escape(text: str) -> str:
    """``text`` as inert Markdown: ``& < >`` as HTML entities, ``\\ ` * _ [ ] | # !`` backslash-escaped,
    line breaks folded into spaces (a table cell or paragraph stays one line).

    Renderers then show the literal text: no raw HTML, link, image, code span, emphasis or table cell break
    can come from it.
    """
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    escaped = _MARKDOWN_BACKSLASH.sub(r"\\\1", escaped)
    return " ".join(escaped.splitlines()) if escaped else escaped


def _finding_label(finding: Finding) -> str:
    return "FAILURE" if finding.severity is Severity.FAILURE else "warning"


def render_markdown(report: AuditReport) -> str:
    """The report as Markdown (figures link the PNG files in the same directory)."""
    out = [f"# {markdown_escape(report.title)}", ""]
    out.append(_status_line(report))
    out.append("")
    for finding in report.findings:
        out.append(f"- **{_finding_label(finding)}**: {markdown_escape(finding.text)}")
    if report.findings:
        out.append("")
    for section in report.sections:
        out += [f"## {markdown_escape(section.title)}", ""]
        for block in section.blocks:
            out += _markdown_block(block)
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _status_line(report: AuditReport) -> str:
    if report.ok:
        return "**Status: no failures found.**"
    failures = sum(f.severity is Severity.FAILURE for f in report.findings)
    return f"**Status: FAILED ({failures} failure(s), listed below).**"


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        text = markdown_escape(block.text)
        return [f"**{text}**" if block.strong else text]
    if isinstance(block, Alert):
        return [f"> **{_finding_label(block.finding)}: {markdown_escape(block.finding.text)}**"]
    if isinstance(block, Bullets):
        return [f"- {markdown_escape(item)}" for item in block.items]
    if isinstance(block, Image):
        return [f"![{markdown_escape(block.alt)}]({block.filename})"]
    lines = [
        "| " + " | ".join(markdown_escape(h) for h in block.header) + " |",
        "|" + "|".join("---" for _ in block.header) + "|",
    ]
    lines += ["| " + " | ".join(markdown_escape(c) for c in row) + " |" for row in block.rows]
    return lines


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 68rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.alert { border: 2px solid #b00020; background: #fdecee; color: #7a0016; padding: 0.6rem 1rem; font-weight: bold; }
.warning { border: 1px solid #b26a00; background: #fff5e5; padding: 0.4rem 1rem; }
.ok { border: 1px solid #2e7d32; background: #edf7ee; padding: 0.6rem 1rem; font-weight: bold; }
img { max-width: 100%; }
""".strip()


def render_html(report: AuditReport, images: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML page: inline CSS, ``images`` (file name -> PNG) as data URIs.

    Every text is passed through :func:`html.escape` (quotes included).
    """
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report.title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(report.title)}</h1>",
    ]
    status_class = "ok" if report.ok else "alert"
    status = (
        "Status: no failures found."
        if report.ok
        else (
            f"Status: FAILED ({sum(f.severity is Severity.FAILURE for f in report.findings)} failure(s), listed below)."
        )
    )
    out.append(f'<p class="{status_class}">{esc(status)}</p>')
    if report.findings:
        out.append("<ul>")
        for finding in report.findings:
            css = "alert" if finding.severity is Severity.FAILURE else "warning"
            out.append(f'<li class="{css}">{esc(_finding_label(finding))}: {esc(finding.text)}</li>')
        out.append("</ul>")
    for section in report.sections:
        out.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            out.append(_html_block(block, images))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_block(block: Block, images: Mapping[str, bytes]) -> str:
    esc = html.escape
    if isinstance(block, Paragraph):
        text = esc(block.text)
        return f"<p><strong>{text}</strong></p>" if block.strong else f"<p>{text}</p>"
    if isinstance(block, Alert):
        css = "alert" if block.finding.severity is Severity.FAILURE else "warning"
        return f'<p class="{css}">{esc(_finding_label(block.finding))}: {esc(block.finding.text)}</p>'
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Image):
        data = images.get(block.filename)
        if data is None:
            return f"<p>{esc(block.alt)}: {NOT_AVAILABLE}</p>"
        encoded = base64.b64encode(data).decode("ascii")
        return f'<figure><img alt="{esc(block.alt)}" src="data:image/png;base64,{encoded}"></figure>'
    head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True)
class WrittenReport:
    """Where the report went and whether it found failures (``ok`` False: ``fedmpt report`` exits 1)."""

    directory: Path
    files: tuple[Path, ...]
    report: AuditReport

    @property
    def ok(self) -> bool:
        return self.report.ok

    @property
    def markdown(self) -> Path:
        return self.directory / ReportFile.MARKDOWN

    @property
    def html(self) -> Path:
        return self.directory / ReportFile.HTML


def write_audit_report(run_dir: str | Path, out_dir: str | Path | None = None) -> WrittenReport:
    """Write the audit report of ``run_dir`` into ``out_dir`` (default ``<run_dir>/report``).

    Files: ``report.md``, ``report.html`` (self-contained), ``report.json`` (the key numbers and findings, for
    scripts), and ``epsilon.png`` / ``map.png`` when there is data to plot. Every file is written atomically.

    Raises:
        RunDirectoryError: ``run_dir`` is not a run directory.
    """
    evidence = collect_evidence(run_dir)
    directory = Path(out_dir) if out_dir is not None else evidence.path / DEFAULT_REPORT_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(f"cannot create the report directory {directory}: {err}") from err
    images: dict[str, bytes] = {}
    if (png := epsilon_plot(evidence)) is not None:
        images[ReportFile.EPSILON_PLOT] = png
    if (png := map_plot(evidence)) is not None:
        images[ReportFile.MAP_PLOT] = png
    report = build_report(
        evidence,
        has_epsilon_plot=ReportFile.EPSILON_PLOT in images,
        has_map_plot=ReportFile.MAP_PLOT in images,
    )
    outputs = {
        ReportFile.MARKDOWN: render_markdown(report).encode("utf-8"),
        ReportFile.HTML: render_html(report, images).encode("utf-8"),
        ReportFile.JSON: (json.dumps(report.summary, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"),
        **images,
    }
    files = []
    for name, data in outputs.items():
        target = directory / name
        atomic_write_bytes(target, data)
        files.append(target)
    for stale in (ReportFile.EPSILON_PLOT, ReportFile.MAP_PLOT):
        if stale not in images and (directory / stale).exists():
            (directory / stale).unlink()
    logger.info("audit report of %s written to %s (%s)", evidence.path, directory, "ok" if report.ok else "FAILED")
    return WrittenReport(directory, tuple(files), report)
