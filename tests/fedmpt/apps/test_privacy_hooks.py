"""DP inside the federation: per-node accountant and signed ledger across rounds, budgets, epsilon per round.

Runs the real ServerApp round loop over the in-process grid of ``conftest.py`` (promptfl on the small task).
Every epsilon is checked against an independent replay of the merged run ledger with Opacus's RDP analysis and
dp_accounting's PLD accountant called directly (not through :mod:`privacy.accounting`). Ledgers are signed with
the kit identities (the simulation's per-run kit ``<run_dir>/secagg``) and pinned to the kit's roster; the
attacker tests re-sign entries with fresh keys outside the roster.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from flwr.app import ConfigRecord, Message, RecordDict
from hypothesis import given
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from fedmpt.apps import client_app, privacy_hooks, task
from fedmpt.apps.client_app import build_client_app
from fedmpt.apps.config import read_app_config
from fedmpt.apps.kit import Kit, ensure_run_kit
from fedmpt.apps.messages import from_array_record, to_array_record
from fedmpt.apps.server_app import run_federation
from fedmpt.errors import ConfigError, SecureAggregationError
from privacy.accounting import RDP_ORDERS, DpSgdEvent, epsilon_pld, epsilon_rdp
from privacy.errors import IdentityError, LedgerError
from privacy.ledger import GENESIS_HASH, Ledger, LedgerEntry, Release, key_id_of, verify_ledger
from privacy.site import DEFAULT_MAX_EPSILON
from secagg.keys import Identity, Roster

NODES = {9001: 2, 17: 0, 555: 1}
SIGMA = 1.1


@pytest.fixture
def config(tmp_path: Path, small_task: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    def make(**extra: Any) -> dict[str, Any]:
        return {
            "runs-dir": str(tmp_path),
            "run-name": "dp",
            "num-server-rounds": 3,
            "seed": 5,
            "num-clients": 3,
            "method": "promptfl",
            "dp": True,
            "noise-multiplier": SIGMA,
            "delta": 1e-3,
            **small_task,
            **extra,
        }

    return make


def _node_chain(runs_dir: Path, k: int, run: str = "dp") -> Path:
    """Node k's chain for ``run`` in its site ledger (filed under its dataset fingerprint)."""
    (path,) = (runs_dir / privacy_hooks.SITE_LEDGERS_DIR).glob(f"*/{run}.node-{k}.jsonl")
    return path


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _entries(path: Path) -> list[LedgerEntry]:
    return [LedgerEntry.from_line(line) for line in path.read_bytes().splitlines()]


def _rdp_replay(events: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's RDP analysis, called directly, per event (no grouping)."""
    total = [0.0] * len(RDP_ORDERS)
    for sigma, q, steps in events:
        rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS))
        total = [a + float(b) for a, b in zip(total, rdp, strict=True)]
    return float(opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)[0])


def _pld_replay(events: list[tuple[float, float, int]], delta: float, interval: float) -> float:
    """dp_accounting's PLD accountant, called directly, one composition per event."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in events:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def _events_up_to(entries: list[LedgerEntry], node: str, server_round: int) -> list[tuple[float, float, int]]:
    return [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.node_id == node and e.round <= server_round
    ]


@pytest.mark.slow
def test_dp_run_epsilon_matches_a_replay_of_the_merged_ledger(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config()
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    run = run_federation(grid, read_app_config(cfg))
    lines = _lines(run.path)
    ledger_path = run.path / "epsilon_ledger.jsonl"
    entries = _entries(ledger_path)
    assert sorted((e.node_id, e.round) for e in entries) == [(str(k), r) for k in range(3) for r in (1, 2, 3)]
    # n = 16 records, expected batch = batch-size 8: q = 1/2, floor(1/q) = 2 steps per round, sigma as given
    assert {(e.noise_multiplier, e.sample_rate, e.steps) for e in entries} == {(SIGMA, 0.5, 2)}
    previous = dict.fromkeys(("0", "1", "2"), 0.0)
    for line in lines:
        epsilon = line["epsilon"]
        assert line["clients_replied"] == [0, 1, 2] and epsilon["delta"] == 1e-3 and epsilon["accountant"] == "rdp"
        assert set(epsilon["clients"]) == {"0", "1", "2"}
        for node, values in epsilon["clients"].items():
            events = _events_up_to(entries, node, line["round"])
            assert len(events) == line["round"]
            assert values["epsilon_rdp"] == pytest.approx(_rdp_replay(events, 1e-3), rel=1e-9)
            assert values["epsilon_pld"] == pytest.approx(_pld_replay(events, 1e-3, 1e-3), rel=1e-4)
            assert values["epsilon_rdp"] > previous[node]
            previous[node] = values["epsilon_rdp"]
        assert epsilon["max_epsilon_rdp"] == max(v["epsilon_rdp"] for v in epsilon["clients"].values())
        assert epsilon["max_epsilon_pld"] == max(v["epsilon_pld"] for v in epsilon["clients"].values())
    kit = Kit.load(run.path / "secagg")  # the simulation's per-run kit: the one identity system of the run
    assert sorted(kit.roster) == [0, 1, 2]
    report = verify_ledger(ledger_path, kit.roster)
    assert report.ok, report.first_failure
    assert not (run.path / "roster.json").exists()  # nothing learnt from replies is pinned or written
    # every node kept its own chain, identical to what the server merged, signed by its kit identity
    for k in range(3):
        chain = _node_chain(run.path.parent, k)
        assert _entries(chain) == [e for e in entries if e.node_id == str(k)]
        assert {e.public_key for e in entries if e.node_id == str(k)} == {kit.identity(k).public.hex()}
        assert not (chain.parent / "identity.pem").exists()
        state = json.loads(
            str(
                grid.contexts[[n for n, p in NODES.items() if p == k][0]].state.config_records[
                    privacy_hooks.ACCOUNTANT_STATE
                ][privacy_hooks.PrivacyKey.HISTORY]
            )
        )
        assert state == [[SIGMA, 0.5, 2]] * 3


@pytest.mark.slow
def test_budget_exhausted_node_stops_and_the_others_go_on(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config(**{"num-server-rounds": 3, "min-clients": 2})
    one_round = _rdp_replay([(SIGMA, 0.5, 2)], 1e-3)
    two_rounds = _rdp_replay([(SIGMA, 0.5, 2)] * 2, 1e-3)
    cap = (one_round + two_rounds) / 2  # room for exactly one round
    expected_rounds = max(r for r in range(5) if _rdp_replay([(SIGMA, 0.5, 2)] * r, 1e-3) <= cap)
    assert expected_rounds == 1
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    grid.contexts[555].node_config["max-epsilon"] = cap  # partition 1's site budget
    run = run_federation(grid, read_app_config(cfg))
    lines = _lines(run.path)
    assert [x["status"] for x in lines] == ["ok"] * 3
    assert lines[0]["clients_replied"] == [0, 1, 2] and lines[0]["clients_failed"] == []
    for line in lines[1:]:
        assert line["clients_replied"] == [0, 2]
        (failure,) = line["clients_failed"]
        assert failure["client_id"] == 1 and failure["node_id"] == 555
        assert failure["reason"] == f"budget exhausted (epsilon {one_round:.4g} of max {cap:.4g})"
        assert line["epsilon"]["clients"]["1"]["epsilon_rdp"] == pytest.approx(one_round, rel=1e-9)
    entries = _entries(run.path / "epsilon_ledger.jsonl")
    assert [e.round for e in entries if e.node_id == "1"] == [1]
    assert [e.round for e in entries if e.node_id == "0"] == [1, 2, 3]
    assert verify_ledger(run.path / "epsilon_ledger.jsonl", Kit.load(run.path / "secagg").roster).ok


def test_accountant_survives_a_restart_and_the_ledger_wins(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config(**{"num-server-rounds": 2})
    first = fake_grid(build_client_app(), NODES, run_config=cfg, crash_at_call=4)  # dies in round 2's train
    with pytest.raises(RuntimeError, match="simulated server crash"):
        run_federation(first, read_app_config(cfg))
    # resumed with new ClientApp objects: node 9001 keeps its context.state, node 17 lost it (a restarted
    # SuperNode), node 555's state disagrees with its ledger; the ledger is authoritative in every case
    second = fake_grid(build_client_app(), NODES, run_config={**cfg, "resume": True})
    second.contexts[9001] = first.contexts[9001]
    second.contexts[555].state.config_records[privacy_hooks.ACCOUNTANT_STATE] = ConfigRecord(
        {privacy_hooks.PrivacyKey.HISTORY: json.dumps([[9.9, 0.5, 2]])}
    )
    run = run_federation(second, read_app_config({**cfg, "resume": True}))
    lines = _lines(run.path)
    assert [x["round"] for x in lines] == [1, 2]
    expected = _rdp_replay([(SIGMA, 0.5, 2)] * 2, 1e-3)
    assert set(lines[1]["epsilon"]["clients"]) == {"0", "1", "2"}
    assert all(v["epsilon_rdp"] == pytest.approx(expected, rel=1e-9) for v in lines[1]["epsilon"]["clients"].values())
    for node_id in NODES:
        state = second.contexts[node_id].state.config_records[privacy_hooks.ACCOUNTANT_STATE]
        assert json.loads(str(state[privacy_hooks.PrivacyKey.HISTORY])) == [[SIGMA, 0.5, 2]] * 2


def test_tampered_node_ledger_is_detected(config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]) -> None:
    cfg = config(**{"num-server-rounds": 2})
    with pytest.raises(RuntimeError, match="simulated server crash"):
        run_federation(fake_grid(build_client_app(), NODES, run_config=cfg, crash_at_call=4), read_app_config(cfg))
    run_dir = Path(cfg["runs-dir"]) / "dp"
    node_ledger = _node_chain(run_dir.parent, 2)
    data = node_ledger.read_bytes()
    assert data.count(b'"steps":2') == 1
    node_ledger.write_bytes(data.replace(b'"steps":2', b'"steps":1'))  # understate the spent steps
    assert not verify_ledger(node_ledger, Kit.load(run_dir / "secagg").roster).ok
    # the node refuses to open its edited ledger (under Flower the exception becomes the node's error reply)
    resumed = {**cfg, "resume": True}
    with pytest.raises(LedgerError, match="dp.node-2.jsonl, line 1: bad signature"):
        run_federation(fake_grid(build_client_app(), NODES, run_config=resumed), read_app_config(resumed))


def _reply(node_id: str, entries: list[LedgerEntry]) -> Any:
    """A received train reply whose privacy record carries ``entries`` for ``node_id``."""
    from flwr.app import ConfigRecord, Message, Metadata

    record = ConfigRecord(
        {
            privacy_hooks.PrivacyKey.NODE_ID: node_id,
            privacy_hooks.PrivacyKey.ENTRIES: [e.canonical_bytes().decode() for e in entries],
            privacy_hooks.PrivacyKey.STATUS: "trained",
        }
    )
    metadata = Metadata(1, "m", 1, 0, "", "1", 0.0, 60.0, "train")
    return Message(metadata=metadata, content=RecordDict({privacy_hooks.PRIVACY_RECORD: record}))  # type: ignore[call-overload]  # a received message


def _resigned(entry: LedgerEntry, signer: Identity, **changes: Any) -> LedgerEntry:
    unsigned = LedgerEntry(
        **{**entry.payload(), **changes, "key_id": key_id_of(signer.public), "public_key": signer.public.hex()}
    )
    return LedgerEntry(**{**unsigned.payload(), "signature": signer.sign(unsigned.signed_bytes()).hex()})


def test_server_pins_to_the_kit_roster_and_refuses_any_other_key(tmp_path: Path) -> None:
    kit = ensure_run_kit(tmp_path / "kit", 2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = privacy_hooks.RunLedger(run_dir, privacy_hooks.PrivacyRunConfig(dp=True), kit.roster)
    honest, forger = kit.identity(0), Identity.generate(0)  # the forger's fresh key claims node 0
    release = Release("run", "0", 1, DpSgdEvent(1.0, 0.5, 2), 1.0, 1e-5)
    good = Ledger(tmp_path / "a.jsonl", honest).append(release)
    forged = Ledger(tmp_path / "b.jsonl", forger).append(release)
    # the first reply of node 0 already has to carry its roster key: there is no first use to trust
    problem = ledger.collect(_reply("0", [forged]))
    assert problem is not None and problem.startswith("ledger rejected") and "not by the roster key" in problem
    assert ledger.collect(_reply("0", [good])) is None
    assert not (run_dir / "roster.json").exists()
    # the forger's signature under the honest key's name fails the signature check
    impostor = LedgerEntry(
        **{**forged.payload(), "public_key": honest.public.hex(), "key_id": key_id_of(honest.public),
           "signature": forged.signature}
    )  # fmt: skip
    problem = ledger.collect(_reply("0", [impostor]))
    assert problem is not None and "bad signature" in problem
    # a byte-edited line of the honest node (fewer steps claimed) fails its signature at merge
    edited = LedgerEntry(
        **{**good.payload(), "seq": 1, "steps": 1, "prev_hash": good.entry_hash(), "signature": good.signature}
    )
    problem = ledger.collect(_reply("0", [edited]))
    assert problem is not None and "bad signature" in problem
    # a node id the roster does not list, even with a valid signature of its own
    stranger = Ledger(tmp_path / "c.jsonl", Identity.generate(7)).append(dataclasses.replace(release, node_id="7"))
    assert ledger.collect(_reply("7", [stranger])) == "node '7' is not in the provisioned roster"
    assert _entries(run_dir / "epsilon_ledger.jsonl") == [good]
    # resuming the run ledger under another kit fails at once, and there is no RunLedger without a roster
    other = Roster.from_identities([Identity.generate(0), Identity.generate(1)])
    with pytest.raises(LedgerError, match="line 1: node '0' is signed by .*resumed under another kit"):
        privacy_hooks.RunLedger(run_dir, privacy_hooks.PrivacyRunConfig(dp=True), other)
    with pytest.raises(IdentityError, match="needs the provisioned roster"):
        privacy_hooks.RunLedger(run_dir, privacy_hooks.PrivacyRunConfig(dp=True), None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dp-mode", "fast", "'dp-mode' must be 'feature' or 'exact'"),
        ("delta", 1.0, "'delta' must be a number in \\(0, 1\\)"),
        ("noise-multiplier", -1.0, "'noise-multiplier' must be a finite number >= 0"),
        ("target-epsilon", 0.0, "'target-epsilon' must be a finite number > 0"),
        ("accountant", "pld", "'accountant' must be 'rdp' or 'prv'"),
        ("expected-batch-size", -2, "'expected-batch-size' must be an integer >= 0"),
        ("max-epsilon", math.inf, "'max-epsilon' must be a finite number > 0"),
        ("max-epsilon", 0.0, "'max-epsilon' must be a finite number > 0"),
        ("dp", 1, "'dp' must be true or false"),
    ],
)
def test_bad_dp_keys_are_rejected_naming_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_app_config({key: value})


def test_calibrated_sigma_spends_at_most_the_target_over_all_rounds() -> None:
    from fedmpt.training import TrainConfig
    from privacy.dpsgd import plan_release

    privacy = privacy_hooks.privacy_config_from({"dp": True, "target-epsilon": 2.0, "delta": 1e-3})
    plan = plan_release(16, TrainConfig(batch_size=8), privacy.dp_config(rounds=5, default_dataset_size=16))
    spent = _rdp_replay([(plan.event.noise_multiplier, 0.5, plan.event.steps)] * 5, 1e-3)
    assert spent <= 2.0 and spent == pytest.approx(2.0, rel=0.05)


def test_reply_with_tampered_entries_is_not_aggregated(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    real = build_client_app()

    def tampering(message: Any, context: Any) -> Any:  # partition 2 understates its steps on the wire
        reply = real(message, context)
        if context.node_config["partition-id"] == 2 and message.metadata.message_type == "train":
            record = reply.content.config_records[privacy_hooks.PRIVACY_RECORD]
            lines = [str(x) for x in record[privacy_hooks.PrivacyKey.ENTRIES]]  # type: ignore[union-attr]
            lines[-1] = lines[-1].replace('"steps":2', '"steps":1')
            record[privacy_hooks.PrivacyKey.ENTRIES] = lines
        return reply

    cfg = config(**{"num-server-rounds": 1})
    run = run_federation(fake_grid(tampering, NODES, run_config=cfg), read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["clients_replied"] == [0, 1] and set(line["train"]) == {"0", "1"}
    (failure,) = line["clients_failed"]
    assert failure["client_id"] == 2 and failure["node_id"] == 9001
    assert failure["reason"].startswith(f"error {privacy_hooks.LEDGER_REJECTED_CODE}: ledger rejected")
    assert "bad signature" in failure["reason"]
    assert set(line["epsilon"]["clients"]) == {"0", "1"}
    assert {e.node_id for e in _entries(run.path / "epsilon_ledger.jsonl")} == {"0", "1"}


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # sigma = 44: RDP's tightest order is the top
def test_reply_resigned_with_40x_the_noise_by_a_fresh_key_is_refused(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    real = build_client_app()
    forger = Identity.generate(2)  # claims partition 2, is not in the per-run kit's roster

    def forging(message: Any, context: Any) -> Any:  # partition 2's ledger rewritten with 40x the noise
        reply = real(message, context)
        if context.node_config["partition-id"] == 2 and message.metadata.message_type == "train":
            record = reply.content.config_records[privacy_hooks.PRIVACY_RECORD]
            forged, prev_hash, history = [], GENESIS_HASH, []
            for line in record[privacy_hooks.PrivacyKey.ENTRIES]:  # type: ignore[union-attr]
                entry = LedgerEntry.from_line(str(line).encode())
                history.append(DpSgdEvent(entry.noise_multiplier * 40, entry.sample_rate, entry.steps))
                entry = _resigned(
                    entry,
                    forger,
                    noise_multiplier=history[-1].noise_multiplier,
                    epsilon_rdp=epsilon_rdp(history, entry.delta),
                    epsilon_pld=epsilon_pld(history, entry.delta, entry.pld_value_discretization),
                    prev_hash=prev_hash,
                )
                prev_hash = entry.entry_hash()
                forged.append(entry.canonical_bytes().decode())
            record[privacy_hooks.PrivacyKey.ENTRIES] = forged
        return reply

    cfg = config(**{"num-server-rounds": 1})
    run = run_federation(fake_grid(forging, NODES, run_config=cfg), read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["clients_replied"] == [0, 1]
    (failure,) = line["clients_failed"]
    assert failure["client_id"] == 2 and failure["node_id"] == 9001
    assert failure["reason"].startswith(f"error {privacy_hooks.LEDGER_REJECTED_CODE}: ledger rejected")
    assert f"signed by {key_id_of(forger.public)}, not by the roster key" in failure["reason"]
    assert {e.node_id for e in _entries(run.path / "epsilon_ledger.jsonl")} == {"0", "1"}
    assert verify_ledger(run.path / "epsilon_ledger.jsonl", Kit.load(run.path / "secagg").roster).ok


@given(delta=st.floats(min_value=-1.0, max_value=2.0, allow_nan=False), sigma=st.floats(-2.0, 5.0))
def test_delta_and_sigma_ranges(delta: float, sigma: float) -> None:
    valid = 0.0 < delta < 1.0 and sigma >= 0.0
    if valid:
        privacy = privacy_hooks.privacy_config_from({"delta": delta, "noise-multiplier": sigma})
        dp = privacy.dp_config(rounds=3, default_dataset_size=1)  # delta < 1/N holds for every delta < 1
        assert dp.delta == delta
        assert dp.noise_multiplier == (None if sigma == 0.0 else sigma)
        assert dp.target_epsilon == (8.0 if sigma == 0.0 else None)
    else:
        with pytest.raises(ConfigError):
            privacy_hooks.privacy_config_from({"delta": delta, "noise-multiplier": sigma})


def test_ledger_location_and_site_budget(tmp_path: Path) -> None:
    default = privacy_hooks.PrivacyRunConfig(dp=True, max_epsilon=4.0)
    assert privacy_hooks.ledger_root(default, {}, tmp_path) == tmp_path / "site-ledgers"
    elsewhere = privacy_hooks.PrivacyRunConfig(dp=True, ledger_dir=str(tmp_path / "run-said"))
    assert privacy_hooks.ledger_root(elsewhere, {}, tmp_path) == tmp_path / "run-said"
    # the site's own folder wins over anything the run config says
    assert privacy_hooks.ledger_root(elsewhere, {"ledger-dir": str(tmp_path / "mine")}, tmp_path) == tmp_path / "mine"
    assert privacy_hooks.node_budget(default, {}).max_epsilon == 4.0  # the run may lower the site's default
    assert privacy_hooks.node_budget(default, {"max-epsilon": 1.5}).max_epsilon == 1.5
    # the default budget is finite, and a run config cannot raise a site's budget
    assert privacy_hooks.node_budget(privacy_hooks.PrivacyRunConfig(dp=True), {}).max_epsilon == DEFAULT_MAX_EPSILON
    generous = privacy_hooks.PrivacyRunConfig(dp=True, max_epsilon=1e6)
    assert privacy_hooks.node_budget(generous, {"max-epsilon": 2.0}).max_epsilon == 2.0
    with pytest.raises(ConfigError, match="'max-epsilon'"):
        privacy_hooks.node_budget(default, {"max-epsilon": 0})
    with pytest.raises(ConfigError, match="'max-epsilon'"):
        privacy_hooks.node_budget(default, {"max-epsilon": "lots"})


def test_node_signs_with_its_kit_identity_and_never_creates_a_key(tmp_path: Path) -> None:
    def identity(node_config: dict[str, Any], run_config: dict[str, Any], partition_id: int = 1) -> Identity:
        return privacy_hooks.node_identity(node_config, run_config, tmp_path, "exp", partition_id)

    # no kit anywhere: refused, and nothing is created in its place
    with pytest.raises(SecureAggregationError, match="roster.bin is missing"):
        identity({}, {})
    assert not (tmp_path / "exp").exists()
    per_run = ensure_run_kit(tmp_path / "exp" / "secagg", 2)  # the simulation's per-run kit
    site = ensure_run_kit(tmp_path / "site-kit", 2)  # the node's own provisioned kit
    named = ensure_run_kit(tmp_path / "named-kit", 2)  # a kit the run config names
    assert identity({}, {}).public == per_run.identity(1).public
    assert identity({}, {"secagg-dir": str(tmp_path / "named-kit")}).public == named.identity(1).public
    own = {"secagg-dir": str(tmp_path / "site-kit")}  # the node config wins over the run config
    assert identity(own, {"secagg-dir": str(tmp_path / "named-kit")}).public == site.identity(1).public
    with pytest.raises(SecureAggregationError, match="no identity key for partition 2"):
        identity({}, {}, partition_id=2)
    with pytest.raises(ConfigError, match="'identity-key' is no longer read"):
        identity({"identity-key": str(tmp_path / "old.pem")}, {})
    with pytest.raises(ConfigError, match="run config 'secagg-dir' must be a path string"):
        identity({}, {"secagg-dir": 3})


def test_a_node_cannot_pass_another_nodes_valid_chain_off_as_its_own(tmp_path: Path) -> None:
    """Node 1 replays node 0's validly signed chain (e.g. to look as if it spent node 0's smaller epsilon, or to
    hide its own): the server knows which partition each Flower node serves and refuses the chain of another."""
    kit = ensure_run_kit(tmp_path / "kit", 2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = privacy_hooks.RunLedger(run_dir, privacy_hooks.PrivacyRunConfig(dp=True), kit.roster)
    release = Release("run", "0", 1, DpSgdEvent(1.0, 0.5, 2), 1.0, 1e-5)
    node0 = Ledger(tmp_path / "a.jsonl", kit.identity(0)).append(release)
    problem = ledger.collect(_reply("0", [node0]), expected_node=1)
    assert problem is not None and "serving partition 1 carries the ledger of node '0'" in problem
    assert not (run_dir / "epsilon_ledger.jsonl").exists()  # nothing merged
    assert ledger.collect(_reply("0", [node0]), expected_node=0) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("drop-record", "a DP run's train reply without a privacy record (no ledger entry)"),
        ("old-entries", "node 2 sent an update without a new ledger entry (it has 1, sent 1)"),
        ("swap-update", "node 2's update does not match the commitment in its ledger entry"),
    ],
)
def test_an_update_without_this_rounds_ledger_entry_is_not_aggregated(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], change: str, reason: str
) -> None:
    """A reply must carry a new entry for this round that commits to the very update it carries."""
    real = build_client_app()
    first_round: dict[str, Any] = {}

    def deviant(message: Any, context: Any) -> Any:
        reply = real(message, context)
        if context.node_config["partition-id"] != 2 or message.metadata.message_type != "train":
            return reply
        record = reply.content.config_records[privacy_hooks.PRIVACY_RECORD]
        entries = [str(x) for x in record[privacy_hooks.PrivacyKey.ENTRIES]]  # type: ignore[union-attr]
        if len(entries) == 1:  # round 1 goes through honestly
            first_round["entries"] = entries
            return reply
        if change == "drop-record":
            del reply.content[privacy_hooks.PRIVACY_RECORD]
        elif change == "old-entries":  # the round-1 chain again: trained without recording it
            record[privacy_hooks.PrivacyKey.ENTRIES] = first_round["entries"]
        else:  # another update than the one the entry commits to
            arrays = from_array_record(reply.content.array_records["arrays"])
            reply.content["arrays"] = to_array_record({k: v + 1e-3 for k, v in arrays.items()})
        return reply

    cfg = config(**{"num-server-rounds": 2})
    run = run_federation(fake_grid(deviant, NODES, run_config=cfg), read_app_config(cfg))
    first, second = _lines(run.path)
    assert first["clients_replied"] == [0, 1, 2]
    assert second["clients_replied"] == [0, 1] and set(second["train"]) == {"0", "1"}
    (failure,) = second["clients_failed"]
    assert failure["client_id"] == 2
    assert failure["reason"] == f"error {privacy_hooks.LEDGER_REJECTED_CODE}: ledger rejected: {reason}"


@pytest.mark.slow
def test_a_second_run_on_the_same_site_data_composes_and_is_refused_past_the_budget(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    one_round = _rdp_replay([(SIGMA, 0.5, 2)], 1e-3)
    three_rounds = _rdp_replay([(SIGMA, 0.5, 2)] * 3, 1e-3)
    four_rounds = _rdp_replay([(SIGMA, 0.5, 2)] * 4, 1e-3)
    cap = (three_rounds + four_rounds) / 2  # room for 3 rounds over both runs
    runs = []
    for name, rounds in (("first", 2), ("second", 2)):
        cfg = config(**{"run-name": name, "num-server-rounds": rounds, "min-clients": 2})
        grid = fake_grid(build_client_app(), NODES, run_config=cfg)
        grid.contexts[555].node_config["max-epsilon"] = cap  # partition 1's site budget, across runs
        runs.append(run_federation(grid, read_app_config(cfg)))
    first, second = (_lines(run.path) for run in runs)
    assert [x["clients_replied"] for x in first] == [[0, 1, 2], [0, 1, 2]]
    # the second run (a new kit, new keys) starts from the two rounds the first one spent on partition 1's data
    assert second[0]["clients_replied"] == [0, 1, 2]
    assert second[1]["clients_replied"] == [0, 2]
    (failure,) = second[1]["clients_failed"]
    assert failure["client_id"] == 1 and failure["reason"].startswith("budget exhausted (epsilon")
    # per-run epsilon in the run's own records; the site's epsilon composes both runs
    assert second[0]["epsilon"]["clients"]["1"]["epsilon_rdp"] == pytest.approx(one_round, rel=1e-9)
    (site_dir,) = {p.parent for p in (runs[0].path.parent / privacy_hooks.SITE_LEDGERS_DIR).glob("*/*.node-1.jsonl")}
    assert sorted(p.name for p in site_dir.glob("*.jsonl")) == ["first.node-1.jsonl", "second.node-1.jsonl"]
    assert sum(len(p.read_text().splitlines()) for p in site_dir.glob("*.jsonl")) == 3


def test_sites_release_no_evaluation_under_dp(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config(**{"num-server-rounds": 1})
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    run = run_federation(grid, read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["clients"] == {} and line["evaluation"] == "server-test-set" and line["global"]["mAP"] > 0
    # a server that asks anyway gets nothing but a refusal
    arrays = task.initial_arrays(read_app_config(cfg).task, 5)

    def message(kind: str) -> Message:
        content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord({"server-round": 1})})
        return Message(content, dst_node_id=17, message_type=kind, group_id="1")

    (reply,) = grid.send_and_receive([message("evaluate")])
    assert reply.has_error() and reply.error.code == client_app.WITHHELD_CODE
    assert "no metrics of its private test records" in reply.error.reason
    # a site that requires DP refuses a run config without it, and refuses evaluation too
    plain = config(**{"dp": False})
    strict = fake_grid(build_client_app(), NODES, run_config=plain)
    strict.contexts[17].node_config["dp-required"] = True
    (refused,) = strict.send_and_receive([message("train")])
    assert refused.has_error() and "trains only under DP" in refused.error.reason


def test_dp_trains_prompts_only_by_default(small_task: dict[str, Any]) -> None:
    """dp-train = "prompts": under DP FedMPT's adapters stay the identity and its gate uniform (their low-rank
    products do not survive isotropic noise, experiments/results/dp_utility_levers.md); "all" trains everything."""
    base = {"method": "fedmpt", "num-clients": 2, **small_task}
    plain = task.initial_arrays(read_app_config(base).task, 0)
    private = task.initial_arrays(read_app_config({**base, "dp": True}).task, 0)
    everything = task.initial_arrays(read_app_config({**base, "dp": True, "dp-train": "all"}).task, 0)
    assert sorted(private) == ["prompts.class_context", "prompts.condition_context", "transport.logit_bias"]
    assert sorted(everything) == sorted(plain) and any(name.startswith("adapters.") for name in plain)
    own = read_app_config({**base, "dp": True, "method-options": "train_groups=all"}).task
    assert sorted(task.initial_arrays(own, 0)) == sorted(plain)  # method-options wins
    with pytest.raises(ConfigError, match="'dp-train'"):
        read_app_config({**base, "dp": True, "dp-train": "adapters"})


def test_the_progress_line_shows_epsilon_next_to_map() -> None:
    from fedmpt.apps.server_app import _format_progress
    from fedmpt.rundir import RoundRecord

    record = RoundRecord(
        round=2, wall_time_s=1.0, clients_sampled=(0, 1), clients_replied=(0, 1), clients_failed=(), bytes_down=1,
        bytes_up=1, global_metrics={"mAP": 0.891}, clients={},
        epsilon={"delta": 1e-5, "max_epsilon_rdp": 2.3456, "clients": {}},
    )  # fmt: skip
    line = _format_progress(record, 5)
    assert "global mAP 89.1 | max epsilon 2.35 (delta 1e-05, rdp) | failed: none" in line
    plain = dataclasses.replace(record, epsilon=None)
    assert "epsilon" not in _format_progress(plain, 5)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("noise-multiplier", SIGMA * 0.9, "not the run's public plan"),  # a tenth less noise
        ("dp-dataset-size", 64, "not the run's public plan"),  # q from another N: a smaller q, a smaller epsilon
    ],
)
def test_an_honestly_signed_entry_off_the_public_plan_is_not_aggregated(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], key: str, value: Any, reason: str
) -> None:
    """A site whose run config says less noise (or another dataset size) than the run's signs a valid entry; the
    server computes the plan itself and refuses the update, keeping the entry (the site did spend it)."""
    cfg = config(**{"num-server-rounds": 1})
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    grid.contexts[9001].run_config[key] = value  # partition 2 runs with its own idea of the plan
    run = run_federation(grid, read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["clients_replied"] == [0, 1]
    (failure,) = line["clients_failed"]
    assert failure["client_id"] == 2 and reason in failure["reason"]
    assert failure["reason"].startswith(f"error {privacy_hooks.LEDGER_REJECTED_CODE}: ledger rejected")
    assert [e.node_id for e in _entries(run.path / "epsilon_ledger.jsonl")].count("2") == 1

