"""Does a run directory tell one story? Ledger, ``metrics.jsonl``, ``state.json`` and checkpoints cross-checked.

A signed hash chain stops anyone without a node's key from editing its entries, but not from cutting the chain
short: dropping the last round from the ledger and from ``metrics.jsonl`` leaves every remaining signature
valid. The server therefore records, in every round line, the head of each node's chain as it stood after the
round (``epsilon.heads``: ``{node: [seq, entry hash]}``), and :func:`check_run_consistency` checks that

* ``metrics.jsonl`` holds rounds 1..R without gaps, and ``state.json`` and the newest checkpoint both say R;
* every head a round line recorded is in the ledger (same seq, same hash): a truncated ledger, or one
  re-signed with other content (even with the nodes' own keys, as anyone holding a simulation's kit can), no
  longer holds it.

What it cannot catch: whoever can rewrite *every* file of the run directory consistently (the server operator,
or anyone holding the run directory and, for re-signing, the keys) can still present a shorter history. The
anchor against that is outside the run directory: each site keeps its own chain (:mod:`privacy.site`), and
:func:`check_site_chain` checks that a run ledger holds every entry a site recorded for that run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from privacy.ledger import LedgerEntry

__all__ = ["HEADS_KEY", "chain_heads", "check_run_consistency", "check_site_chain"]

#: Key of the per-node chain heads inside a round line's ``epsilon`` object.
HEADS_KEY = "heads"
_CHECKPOINT = re.compile(r"round_(\d+)\.safetensors")


def chain_heads(entries: Iterable[LedgerEntry]) -> dict[str, list[int | str]]:
    """``{node: [seq, entry hash]}`` of the newest entry of each node among ``entries``."""
    heads: dict[str, LedgerEntry] = {}
    for entry in entries:
        if entry.node_id not in heads or entry.seq > heads[entry.node_id].seq:
            heads[entry.node_id] = entry
    return {node: [e.seq, e.entry_hash()] for node, e in sorted(heads.items())}


def _chains(entries: Iterable[LedgerEntry]) -> dict[str, dict[int, str]]:
    chains: dict[str, dict[int, str]] = {}
    for entry in entries:
        chains.setdefault(entry.node_id, {})[entry.seq] = entry.entry_hash()
    return chains


def check_run_consistency(run_dir: str | Path, entries: Sequence[LedgerEntry]) -> list[str]:
    """Problems found between the run ledger's ``entries`` and the run directory's other records (see module)."""
    run = Path(run_dir)
    problems: list[str] = []
    lines: list[dict[str, object]] = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for number, raw in enumerate(metrics.read_text().splitlines(), start=1):
            try:
                line = json.loads(raw)
            except ValueError:
                problems.append(f"metrics.jsonl line {number} is not JSON")
                continue
            if isinstance(line, dict):
                lines.append(line)
    rounds = [line.get("round") for line in lines]
    if rounds != list(range(1, len(rounds) + 1)):
        problems.append(f"metrics.jsonl rounds are {rounds}, not 1..{len(rounds)} (lines missing or reordered)")
    last = len(rounds)
    try:
        state = json.loads((run / "state.json").read_text())
        completed = state.get("last_completed_round") if isinstance(state, dict) else None
    except (OSError, ValueError):
        completed = None
    if completed is None:
        problems.append("state.json is missing or unreadable: cannot tell how many rounds the run completed")
    elif completed != last:
        problems.append(f"state.json says {completed} round(s) completed, metrics.jsonl has {last} (truncated?)")
    checkpoints = sorted(
        int(m.group(1))
        for p in (run / "checkpoints").glob("round_*.safetensors")
        if (m := _CHECKPOINT.fullmatch(p.name)) is not None
    )
    newest = checkpoints[-1] if checkpoints else 0
    if newest != last:
        problems.append(f"the newest checkpoint is of round {newest}, metrics.jsonl ends at round {last}")
    chains = _chains(entries)
    for line in lines:
        epsilon = line.get("epsilon")
        heads = epsilon.get(HEADS_KEY) if isinstance(epsilon, dict) else None
        if not isinstance(heads, dict):
            if isinstance(epsilon, dict):
                problems.append(f"round {line.get('round')}: no ledger heads recorded (cannot check truncation)")
            continue
        for node, head in sorted(heads.items()):
            if not (isinstance(head, list) and len(head) == 2):
                problems.append(f"round {line.get('round')}: malformed head for node {node}")
                continue
            seq, digest = head
            if chains.get(node, {}).get(seq) != digest:
                problems.append(
                    f"round {line.get('round')}: the server recorded node {node}'s entry seq {seq} "
                    f"({str(digest)[:12]}...), which the ledger does not hold (truncated or rewritten)"
                )
    return problems


def check_site_chain(run_entries: Sequence[LedgerEntry], site_entries: Sequence[LedgerEntry]) -> list[str]:
    """Problems if the run ledger lacks, or differs from, any entry of a site's own chain for that run."""
    run_ids = {e.run_id for e in run_entries}
    by_key = {(e.node_id, e.seq): e.entry_hash() for e in run_entries}
    problems = []
    for entry in site_entries:
        if entry.run_id not in run_ids:
            problems.append(f"site entry seq {entry.seq} is of run {entry.run_id!r}, not of this run ledger's")
            continue
        recorded = by_key.get((entry.node_id, entry.seq))
        if recorded is None:
            problems.append(f"the run ledger lacks node {entry.node_id}'s entry seq {entry.seq} (truncated)")
        elif recorded != entry.entry_hash():
            problems.append(f"the run ledger's node {entry.node_id} entry seq {entry.seq} differs from the site's")
    return problems
