"""End-to-end audit of what a DP site releases: the whole Flower train reply on D vs D' = D plus one record.

The unit audit (:mod:`privacy.canary`) tests one DP-SGD step. This one drives the ClientApp itself, as the
server sees it: Poisson sampling, every local step, the ledger, and the reply with every value in it. Each trial
is a fresh site (a new ledger folder and node state) that gets one train message; the two arms differ only in
the site's data, ``D`` or ``D'``. Every released field becomes a score:

* every metric, every privacy-record value, every field of the newest ledger entry (strings through SHA-256 to
  a number in [0, 1), so a deterministic difference separates the arms perfectly), the FedAvg weight;
* the update: its projection on the direction in which the two arms' mean updates differ, estimated on the
  first half of the trials and scored on the second half (the threshold is chosen on the first half too).

Each score gives :func:`privacy.audit.epsilon_lower_bound` on the second half; the audit's ``epsilon_lb`` is the
largest. A correct site keeps it below the claim (the epsilon its ledger states for the round); a field that
leaks ``n`` or an un-noised statistic separates the arms and is named.

Excluded, and why: ``timestamp`` (when the round arrived, recorded before training: it orders the trials, not
the data) and ``signature`` (a function of all the other fields, timestamp included). The reply's wall-clock
time is a side channel this audit does not measure (see ``docs/privacy.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from numpy.typing import NDArray

from fedmpt.apps.messages import RecordName, from_array_record
from fedmpt.apps.privacy_hooks import PRIVACY_RECORD, PrivacyKey
from fedmpt.apps.update_vector import flatten
from privacy.audit import epsilon_lower_bound

__all__ = ["EXCLUDED_FIELDS", "ReleaseAudit", "audit_releases", "released_scalars"]

#: Ledger-entry fields left out of the audit (see the module docstring).
EXCLUDED_FIELDS = frozenset({"entry.timestamp", "entry.signature"})


def _number(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(float(value)) else -1.0
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str | bytes) else value
    data = text.encode() if isinstance(text, str) else text
    return int.from_bytes(hashlib.sha256(data).digest()[:7], "big") / 2.0**56


def released_scalars(reply: Message) -> dict[str, float]:
    """Every scalar a train reply releases besides the update itself, by ``record.key`` name."""
    out: dict[str, float] = {}
    for name, record in reply.content.metric_records.items():
        for key, metric in record.items():
            out[f"{name}.{key}"] = _number(metric)
    for name, config in reply.content.config_records.items():
        for key, value in config.items():
            if name == PRIVACY_RECORD and key == PrivacyKey.ENTRIES:
                continue
            out[f"{name}.{key}"] = _number(value)
    privacy = reply.content.config_records.get(PRIVACY_RECORD)
    lines = privacy.get(PrivacyKey.ENTRIES, []) if privacy is not None else []
    if isinstance(lines, list) and lines:
        out["privacy.entries.count"] = float(len(lines))
        newest = json.loads(str(lines[-1]))
        for key, value in newest.items():
            out[f"entry.{key}"] = _number(value)
    for key in EXCLUDED_FIELDS:
        out.pop(key, None)
    return out


def _update(reply: Message) -> NDArray[np.float64]:
    return flatten(from_array_record(reply.content.array_records[RecordName.ARRAYS])).astype(np.float64)


@dataclass(frozen=True)
class ReleaseAudit:
    """Result: the largest lower bound, the field that gave it, and every field's bound."""

    epsilon_lb: float
    worst_field: str
    per_field: Mapping[str, float]
    claim: float
    trials: int

    @property
    def passed(self) -> bool:
        """True when no released value separates D from D' beyond the claimed epsilon."""
        return self.epsilon_lb <= self.claim


def audit_releases(
    trial: Callable[[bool], Message], trials: int, *, claim: float, delta: float, alpha: float = 0.05
) -> ReleaseAudit:
    """Run ``trials`` fresh sites per arm (``trial(with_record)``, arms interleaved) and audit every field."""
    if trials < 4 or trials % 2:
        raise ValueError(f"trials must be an even number >= 4, got {trials}")
    replies: dict[bool, list[Message]] = {True: [], False: []}
    for _ in range(trials):
        for arm in (False, True):
            replies[arm].append(trial(arm))
    half = trials // 2
    scalars = {arm: [released_scalars(r) for r in replies[arm][half:]] for arm in replies}
    names = sorted(set().union(*(s.keys() for arm in scalars for s in scalars[arm])))
    per_field: dict[str, float] = {}
    for name in names:
        with_scores = [s.get(name, -2.0) for s in scalars[True]]
        without_scores = [s.get(name, -2.0) for s in scalars[False]]
        per_field[name] = epsilon_lower_bound(with_scores, without_scores, delta, alpha).epsilon
    if all(RecordName.ARRAYS in r.content.array_records for arm in replies for r in replies[arm]):
        updates = {arm: np.stack([_update(r) for r in replies[arm]]) for arm in replies}
        direction = updates[True][:half].mean(axis=0) - updates[False][:half].mean(axis=0)
        first = {arm: updates[arm][:half] @ direction for arm in updates}
        # the threshold and rule are chosen on the first half, then scored on the second half only
        chosen = epsilon_lower_bound(first[True], first[False], delta, alpha)
        later = {arm: updates[arm][half:] @ direction for arm in updates}
        thresholds = None if math.isnan(chosen.threshold) else [chosen.threshold]
        per_field["update.projection"] = (
            epsilon_lower_bound(later[True], later[False], delta, alpha, thresholds=thresholds).epsilon
            if thresholds is not None
            else 0.0
        )
    worst = max(per_field, key=lambda k: per_field[k]) if per_field else ""
    return ReleaseAudit(per_field.get(worst, 0.0), worst, per_field, claim, trials)
