"""A site's epsilon ledger across runs: every release on one dataset, wherever it was made, composes.

Layout (under the site's own ledger directory, which lives with the site, never on the server)::

    <root>/<dataset fingerprint>/<run id>.node-<k>.jsonl     one signed chain per run (privacy.ledger.Ledger)

The privacy unit is a record of the site's dataset, so the budget belongs to the dataset, not to a run: a
second run on the same data starts from the epsilon the first one spent. :class:`SiteLedger` appends this run's
releases to its own chain (signed by this run's provisioned identity; a kit is one session, so each run has its
own key) and reads every other chain in the fingerprint's folder to know the site's history. Those chains are
checked for integrity (canonical lines, seq, hash links, signatures by the key each chain names, one
fingerprint) and a corrupt one stops training: a history that cannot be read cannot be undercounted.

The fingerprint files the data (locally; it is never released: entries carry a random per-dataset label
instead, see :func:`_dataset_label`): :func:`dataset_fingerprint` hashes the records as the site holds them (the
frozen features and labels), or a site declares a stable ``dataset-id`` (recommended in deployments: features
change with the backbone, the dataset does not). Budgets then compose every run on that dataset; the site's
default budget is finite (:data:`DEFAULT_MAX_EPSILON`).

What this cannot see: releases of the same records made outside this ledger directory (another folder, another
copy of the data under another id). The site's operator owns that boundary; the report says the site epsilon is
the site's own record.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import numpy as np

from fedmpt.training import FeatureData
from privacy.accounting import AccountantKind, DpSgdEvent, compute_epsilon
from privacy.errors import LedgerError, PrivacyParameterError
from privacy.ledger import Ledger, LedgerEntry, Release, is_hex64, read_chain
from secagg.keys import Identity

__all__ = ["DEFAULT_MAX_EPSILON", "SiteLedger", "dataset_fingerprint"]

#: The budget a site enforces when nobody sets one (record-level epsilon at the run's delta, over all runs).
DEFAULT_MAX_EPSILON = 10.0


def dataset_fingerprint(data: FeatureData | None = None, *, dataset_id: str = "") -> str:
    """SHA-256 (hex) naming a site's dataset: of the declared ``dataset_id``, else of the records' bytes."""
    digest = hashlib.sha256()
    if dataset_id:
        digest.update(b"fedmpt-dataset-id\x00" + dataset_id.encode("utf-8"))
        return digest.hexdigest()
    if data is None:
        raise PrivacyParameterError("dataset_fingerprint needs the data or a dataset_id")
    digest.update(b"fedmpt-dataset-records\x00")
    for part in (data.global_features, data.patch_features):
        array = np.ascontiguousarray(part.detach().cpu().numpy())
        digest.update(f"{array.dtype.str}|{array.shape}".encode() + array.tobytes())
    labels = np.ascontiguousarray(np.asarray(data.labels))
    digest.update(f"{labels.dtype.str}|{labels.shape}".encode() + labels.tobytes())
    return digest.hexdigest()


LABEL_FILE = "dataset-label"


def _dataset_label(directory: Path) -> str:
    """The random label this site gave the dataset filed in ``directory`` (created once, 32 random bytes).

    Entries name the dataset by this label, never by the fingerprint: a hash of the records is a function of
    them, so it would tell D from D plus one record; a random label is independent of the data."""
    path = directory / LABEL_FILE
    try:  # created exactly once: a second process finds the first one's label (O_EXCL), never replaces it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    label = path.read_text().strip()
    if not is_hex64(label):
        raise LedgerError(f"{path} does not hold a 64-hex-digit dataset label")
    return label


class SiteLedger:
    """This run's chain of a site plus the site's history on the same dataset from every other run.

    Quacks like :class:`privacy.ledger.Ledger` for :class:`privacy.budget.PrivacyBudget`: :meth:`history` is the
    site's whole history (all runs, this one last), :meth:`append` records to this run's chain, and
    :meth:`entries` are this run's (what the server's run ledger collects).
    """

    def __init__(self, root: str | os.PathLike[str], fingerprint: str, run_id: str, identity: Identity) -> None:
        if not is_hex64(fingerprint):
            raise PrivacyParameterError(f"dataset fingerprint must be 64 lower-case hex digits, got {fingerprint!r}")
        self.fingerprint = fingerprint
        self.directory = Path(root) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.label = _dataset_label(self.directory)
        chain = self.directory / f"{run_id}.node-{identity.node_id}.jsonl"
        self._run = Ledger(chain, identity)
        self._prior: list[DpSgdEvent] = []
        self.prior_runs: list[str] = []
        for path in sorted(self.directory.glob("*.jsonl")):
            if path == chain:
                continue
            entries = read_chain(path)
            if entries and entries[0].dataset_label not in ("", self.label):
                raise LedgerError(f"site ledger {path} records another dataset ({entries[0].dataset_label})")
            self._prior.extend(e.event() for e in entries)
            if entries:
                self.prior_runs.append(entries[0].run_id)

    @property
    def node_id(self) -> str:
        return self._run.node_id

    @property
    def run_ledger(self) -> Ledger:
        """This run's chain."""
        return self._run

    @property
    def path(self) -> Path:
        """This run's chain file."""
        return self._run.path

    def entries(self) -> tuple[LedgerEntry, ...]:
        """This run's entries (the chain the server verifies against the run's roster)."""
        return self._run.entries()

    def run_history(self) -> tuple[DpSgdEvent, ...]:
        """This run's events only."""
        return self._run.history()

    def history(self) -> tuple[DpSgdEvent, ...]:
        """Every event on this dataset: the other runs' chains, then this run's."""
        return (*self._prior, *self._run.history())

    def epsilon(self, delta: float, accountant: AccountantKind | str = AccountantKind.RDP) -> float:
        """The site's cumulative epsilon at ``delta`` over every run on this dataset."""
        return compute_epsilon(list(self.history()), delta, accountant)

    def append(self, release: Release) -> LedgerEntry:
        """Record ``release`` in this run's chain (signed, fsynced); its fingerprint must be this dataset's."""
        if release.dataset_label != self.label:
            raise LedgerError(f"release names dataset {release.dataset_label!r}, this site ledger's is {self.label!r}")
        return self._run.append(release)
