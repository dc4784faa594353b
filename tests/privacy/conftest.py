"""Shared builders for the privacy tests: kit identities and roster, releases and small signed ledgers.

Nodes are roster nodes 0 and 1 (ledger node ids "0" and "1"); "mallory" is a fresh key that claims node 0 but is
not in the roster: the attacker who re-signs node 0's chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fedmpt.backbone.loader import Backbone, load_backbone
from privacy.accounting import DpSgdEvent
from privacy.ledger import Ledger, Release, merge_node_entries
from secagg.keys import Identity, Roster


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: small tensors on a shared 2-core machine are much faster without contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    """A small random-init tiny CLIP (the real modules; weights do not matter for gradient identities)."""
    torch.manual_seed(0)
    return load_backbone(random_init=True)


DELTA = 1e-5
RUN_ID = "run-7"


ReleaseFactory = Callable[..., Release]


def _make_release(node_id: str, round_: int, steps: int = 3, sigma: float = 1.0, q: float = 0.1) -> Release:
    """A release with small, cheap-to-account DP-SGD parameters (run RUN_ID, delta DELTA, clip norm 1)."""
    return Release(
        run_id=RUN_ID,
        node_id=node_id,
        round=round_,
        event=DpSgdEvent(noise_multiplier=sigma, sample_rate=q, steps=steps),
        max_grad_norm=1.0,
        delta=DELTA,
    )


@pytest.fixture(scope="session")
def make_release() -> ReleaseFactory:
    """``make_release(node_id, round_, steps=3, sigma=1.0, q=0.1)``: a run-7 release at delta 1e-5."""
    return _make_release


NODES = ("0", "1")


@pytest.fixture(scope="session")
def identities() -> dict[str, Identity]:
    """The kit identities of roster nodes 0 and 1, and "mallory": a fresh key for node 0 outside the roster."""
    return {"0": Identity.generate(0), "1": Identity.generate(1), "mallory": Identity.generate(0)}


@pytest.fixture(scope="session")
def roster(identities: dict[str, Identity]) -> Roster:
    """The provisioned roster of nodes 0 and 1 (the trust anchor; mallory is not in it)."""
    return Roster.from_identities([identities[node] for node in NODES])


@pytest.fixture(scope="session")
def run_ledger(
    tmp_path_factory: pytest.TempPathFactory, identities: dict[str, Identity], roster: Roster
) -> tuple[Path, dict[str, Path]]:
    """Two nodes x two rounds, each node's own ledger plus the merged run ledger (interleaved by round)."""
    directory = tmp_path_factory.mktemp("ledgers")
    node_paths = {node: directory / f"node-{node}.jsonl" for node in NODES}
    ledgers = {node: Ledger(path, identities[node]) for node, path in node_paths.items()}
    run_path = directory / "epsilon_ledger.jsonl"
    for round_ in (1, 2):
        round_entries = [
            ledgers[node].append(_make_release(node, round_, steps=2 + round_ + i)) for i, node in enumerate(ledgers)
        ]
        merge_node_entries(run_path, round_entries, roster)
    return run_path, node_paths


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a (read-only, session-scoped) ledger into this test's directory so it can be edited."""

    def copy(source: Path) -> Path:
        target = tmp_path / source.name
        target.write_bytes(source.read_bytes())
        return target

    return copy
