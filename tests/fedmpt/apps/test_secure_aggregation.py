"""Secure aggregation as Flower stages (fedmpt.apps.secure_aggregation) over an in-process Grid.

The oracle is FedAvg computed without Flower and without masking (``fedavg_oracle``); a masked run must match it
within the protocol's stated quantization bound plus float32 rounding of the state.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from fedmpt.apps import task
from fedmpt.apps.client_app import build_client_app
from fedmpt.apps.client_state import pack_client_state, unpack_client_state
from fedmpt.apps.config import read_app_config
from fedmpt.apps.messages import RecordName
from fedmpt.apps.secagg_config import SecAggKey, SecureAggregationConfig, Stage
from fedmpt.apps.server_app import run_federation
from fedmpt.apps.update_vector import flatten, model_digest, unflatten
from fedmpt.errors import ConfigError, SecureAggregationError
from secagg import masking
from secagg.config import MIN_SCALE, MaskingConfig, fixed_point_scale
from secagg.encoding import encode, to_signed
from secagg.keys import Identity, Roster

NODES = {9001: 2, 17: 0, 555: 1}  # node id -> partition; node ids deliberately not in partition order
# float32 storage of the state: |x| <= ~5 (the logit bias), so one ulp is <= 4.8e-7
FLOAT32_SLACK = 1e-6


# ------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"mode": "secret"}, "secure-aggregation"),
        ({"mode": "masking", "threshold": 1}, "secagg-threshold"),
        ({"mode": "masking", "threshold": -2}, "secagg-threshold"),
        ({"mode": "masking", "neighbours": 3}, "secagg-neighbours"),
        ({"mode": "masking", "threshold": 5, "neighbours": 4}, "below 'secagg-threshold'"),
        ({"mode": "masking", "clip_range": 0.0}, "secagg-clip-range"),
        ({"mode": "masking", "clip_range": float("inf")}, "secagg-clip-range"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(values: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecureAggregationConfig(**values)


def test_run_config_keys_reach_the_app_config() -> None:
    app = read_app_config({"secure-aggregation": "masking", "secagg-threshold": 3, "secagg-clip-range": 2})
    assert app.secure_aggregation == SecureAggregationConfig("masking", "", 3, 0, 2.0)  # type: ignore[arg-type]
    assert read_app_config({}).secure_aggregation.enabled is False


@given(
    n=st.integers(1, 1000),
    w=st.integers(1, 5000),
    c=st.floats(1e-3, 100.0, allow_nan=False),
)
def test_fixed_point_scale_is_the_largest_power_of_two_without_overflow(n: int, w: int, c: float) -> None:
    s = fixed_point_scale(n, w, c)
    assert math.log2(s) == int(math.log2(s))
    if s < 1:  # the 32-bit ring leaves no integer precision: MaskingConfig.sized moves to 64 bits
        assert n * math.ceil(w * c) >= 2**30
        return
    assert n * math.ceil(w * c * s) < 2**31  # no wrap-around
    assert n * (math.ceil(w * c * 2 * s) + 1) >= 2**31 - 1  # maximal
    if n >= 2:  # and the library accepts it for a round of n clients
        assert MaskingConfig(threshold=2, clip_range=c, scale=s, max_weight=w).max_clients() >= n


@pytest.mark.parametrize(
    ("n", "w", "bits", "scale"),
    # the docs' examples (docs/secure_aggregation.md section 4, docs/deployment.md) are rows of this table
    [(5, 432, 32, 2.0**19), (4, 432, 32, 2.0**20), (5, 400, 32, 2.0**20), (50, 100_000, 64, 2.0**36),
     (200, 100_000, 64, 2.0**36), (10, 400, 32, 2.0**19)],
)  # fmt: skip
def test_the_ring_sizes_itself_for_pilots_of_up_to_50_sites_of_1e5_records(
    n: int, w: int, bits: int, scale: float
) -> None:
    cfg = MaskingConfig.sized(2, n, w, 1.0)
    assert (cfg.modulus_bits, cfg.scale) == (bits, scale)
    assert cfg.max_clients() >= n  # every roster member fits, whatever subset the server assembles
    if bits == 64:  # 32 bits would have left less than the 2**16 precision floor (64 bits: float64 caps s at 2**36)
        assert fixed_point_scale(n, w, 1.0, 32) < MIN_SCALE <= cfg.scale
    else:
        assert cfg.scale >= MIN_SCALE


@given(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4))
def test_flatten_round_trips(shapes: list[list[int]]) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.normal(size=tuple(shape)).astype(np.float32) for i, shape in enumerate(shapes)}
    back = unflatten(flatten(arrays), arrays)
    assert back.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
    assert flatten(arrays).size == sum(a.size for a in arrays.values())


RUN_ID, SEED, MODEL = bytes(range(16)), b"s" * 32, model_digest({"a": np.zeros(3, dtype=np.float32)})


@settings(max_examples=5, deadline=None)
@given(drop=st.sampled_from([None, 0, 3]), seed=st.integers(0, 2**32 - 1))
def test_client_state_survives_serialization_between_every_stage(drop: int | None, seed: int) -> None:
    """Run the library protocol with every client state packed and unpacked between stages (as the ClientApp
    does through context.state): the unmasked mean equals numpy's weighted mean of the survivors."""
    n, d = 4, 50
    rng = np.random.default_rng(seed)
    updates = {u: rng.uniform(-0.5, 0.5, size=d) for u in range(n)}
    weights = {u: int(rng.integers(1, 9)) for u in range(n)}
    config = MaskingConfig(threshold=3, clip_range=1.0, scale=2.0**16, max_weight=8)
    identities = {u: Identity.generate(u) for u in range(n)}
    roster = Roster.from_identities(identities)
    blobs: dict[int, bytes] = {}

    def step(u: int, fn: Callable[[masking.ClientState], bytes]) -> bytes:
        state, delta, weight = unpack_client_state(blobs[u], config, identities[u], roster)
        np.testing.assert_array_equal(delta, updates[u])
        assert weight == weights[u]
        out = fn(state)
        blobs[u] = pack_client_state(state, delta, weight)
        return out

    server, requests = masking.server_start_round(
        config, list(range(n)), d, 1, run_id=RUN_ID, graph_seed=SEED, model_digest=MODEL, roster=roster
    )
    replies = {}
    for u, req in requests.items():
        state = masking.ClientState.create(
            config, identities[u], roster, run_id=RUN_ID, graph_seed=SEED, model_digest=MODEL
        )
        replies[u] = masking.advertise_keys(state, req)
        blobs[u] = pack_client_state(state, updates[u], weights[u])
    requests = masking.server_collect_advertisements(server, replies)
    requests = masking.server_collect_shares(
        server, {u: step(u, lambda s, r=r: masking.share_keys(s, r)) for u, r in requests.items()}
    )
    alive = [u for u in requests if u != drop]  # a drop-out after key sharing
    requests = masking.server_collect_masked_inputs(
        server,
        {u: step(u, lambda s, u=u: masking.masked_input(s, requests[u], updates[u], weights[u])) for u in alive},
    )
    requests = masking.server_collect_consistency(
        server, {u: step(u, lambda s, r=r: masking.consistency_check(s, r)) for u, r in requests.items()}
    )
    result = masking.server_unmask(
        server, {u: step(u, lambda s, r=r: masking.unmask(s, r)) for u, r in requests.items()}
    )
    w = np.array([weights[u] for u in alive], dtype=np.float64)
    expected = np.average(np.stack([updates[u] for u in alive]), axis=0, weights=w)
    assert result.survivors == tuple(alive)
    assert np.max(np.abs(result.mean - expected)) < len(alive) / (config.scale * w.sum())


def test_stored_state_rejects_tampering() -> None:
    config = MaskingConfig(threshold=2)
    ids = {u: Identity.generate(u) for u in range(2)}
    roster = Roster.from_identities(ids)
    _, requests = masking.server_start_round(
        config, [0, 1], 3, 1, run_id=RUN_ID, graph_seed=SEED, model_digest=MODEL, roster=roster
    )
    state = masking.ClientState.create(config, ids[0], roster, run_id=RUN_ID, graph_seed=SEED, model_digest=MODEL)
    masking.advertise_keys(state, requests[0])
    blob = pack_client_state(state, np.zeros(3), 1)
    back, _, _ = unpack_client_state(blob, config, ids[0], roster)
    assert back.setup == state.setup and back.last_round == 1 and back.participants == (0, 1)
    for bad in (b"XXXX" + blob[4:], blob[:-1], blob + b"\x00"):
        with pytest.raises(SecureAggregationError):
            unpack_client_state(bad, config, ids[0], roster)


# ------------------------------------------------------------------------------------------ runs over a grid


@pytest.fixture
def config(secagg_run_config: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Run configs of a small 3-client masking run (``tests/fedmpt/apps/conftest.py``)."""
    return secagg_run_config


def _stage(message: Message) -> str | None:
    record = message.content.config_records.get(RecordName.CONFIG)
    stage = None if record is None else record.get(SecAggKey.STAGE)
    return stage if isinstance(stage, str) else None


def _stage_grid(base: type) -> type:
    class StageGrid(base):  # type: ignore[misc, valid-type]
        """FakeGrid whose ``dead_at`` nodes never answer from a given masking stage on; records every reply."""

        def __init__(self, *args: Any, dead_at: dict[int, str] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dead_at = dict(dead_at or {})
            self.received: list[Message] = []

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
            order = [s.value for s in Stage]
            kept = []
            for m in messages:
                stage, node = _stage(m), m.metadata.dst_node_id
                if stage and node in self.dead_at and order.index(stage) >= order.index(self.dead_at[node]):
                    continue
                kept.append(m)
            replies = list(super().send_and_receive(kept, timeout=timeout))
            self.received += replies
            return iter(replies)

    return StageGrid


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_close_to_oracle(final: dict[str, np.ndarray], expected: dict[str, np.ndarray], bound: float) -> None:
    for name in expected:
        assert np.max(np.abs(final[name].astype(np.float64) - expected[name])) <= bound + FLOAT32_SLACK, name


@pytest.mark.slow
def test_masked_run_matches_fedavg_within_the_stated_bound(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    cfg = config(**{"num-server-rounds": 2})
    grid = fake_grid(build_client_app(), NODES, run_config=cfg)
    run = run_federation(grid, read_app_config(cfg))
    lines = _lines(run.path)
    expected = fedavg_oracle(cfg, [0, 1, 2], 3, rounds=2)
    bound = sum(x["secagg"]["error_bound"] for x in lines)  # errors of the two rounds add up at worst
    # 3 clients x 16 examples, clip 1, 32-bit words: s = 2**floor(log2((2**31 - 1) / 3 / 16)) = 2**25
    assert lines[0]["secagg"]["scale"] == 2.0**25
    assert lines[0]["secagg"]["error_bound"] == pytest.approx(3 / (2.0**25 * 48))
    _assert_close_to_oracle(load_file(str(run.path / "final.safetensors")), expected, bound)
    for line in lines:
        assert line["status"] == "ok" and line["secure_aggregation"] == "masking"
        assert line["clients_replied"] == [0, 1, 2] and line["clients_failed"] == []
        # the kit's default t = floor(2 * 3 / 3) + 1 = 3: all three must survive
        assert line["secagg"]["threshold"] == 3 and line["secagg"]["survivors"] == [0, 1, 2]
        assert line["secagg"]["clipped_coordinates"] == 0
        assert set(line["train"]) == {"0", "1", "2"} and all("train_loss" in m for m in line["train"].values())
    resolved = json.loads((run.path / "config.json").read_text())["config"]
    assert resolved["secure-aggregation"] == "masking" and resolved["secagg-dir"] == ""
    assert (run.path / "secagg" / "masking" / "roster.bin").exists()  # the per-run kit (simulation only)


def test_dropout_after_key_sharing_gives_the_survivors_exact_aggregate(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    nodes = {10: 0, 20: 1, 30: 2, 40: 3}
    cfg = config(**{"num-clients": 4, "round-timeout-s": 0.5})
    grid = _stage_grid(fake_grid)(build_client_app(), nodes, run_config=cfg, dead_at={20: Stage.MASKED_INPUT})
    run = run_federation(grid, read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["status"] == "ok"
    assert line["clients_replied"] == [0, 2, 3]
    assert line["secagg"]["dropped"] == [1] and line["secagg"]["threshold"] == 3
    assert line["clients_failed"] == [{"node_id": 20, "client_id": 1, "reason": "masked-input: no reply within 0.5 s"}]
    expected = fedavg_oracle(cfg, [0, 2, 3], 4, rounds=1)
    _assert_close_to_oracle(load_file(str(run.path / "final.safetensors")), expected, line["secagg"]["error_bound"])


def test_below_threshold_the_round_fails_loudly_and_nothing_is_applied(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    cfg = config(**{"secagg-threshold": 3, "round-timeout-s": 0.5})
    grid = _stage_grid(fake_grid)(build_client_app(), NODES, run_config=cfg, dead_at={555: Stage.MASKED_INPUT})
    run = run_federation(grid, read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["status"] == "secure-aggregation-failed"
    assert "ThresholdNotMet" in line["secagg"]["failure"] and "threshold is 3" in line["secagg"]["failure"]
    assert line["clients_replied"] == []
    initial = task.initial_arrays(read_app_config(cfg).task, 11)
    final = load_file(str(run.path / "final.safetensors"))
    for name in initial:
        np.testing.assert_array_equal(final[name], initial[name])


def test_a_failing_client_before_key_sharing_is_recorded(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    nodes = {10: 0, 20: 1, 30: 2, 40: 3}
    cfg = config(**{"num-clients": 4, "round-timeout-s": 0.5})
    grid = fake_grid(build_client_app(), nodes, run_config=cfg, failing={40}, fail_on={"train"})
    run = run_federation(grid, read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["clients_replied"] == [0, 1, 2]
    assert line["clients_failed"] == [{"node_id": 40, "client_id": 3, "reason": "advertise: error 1: boom"}]
    _assert_close_to_oracle(
        load_file(str(run.path / "final.safetensors")),
        fedavg_oracle(cfg, [0, 1, 2], 4, rounds=1),
        line["secagg"]["error_bound"],
    )


def test_nothing_the_server_receives_correlates_with_a_client_update(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any]
) -> None:
    """Every reply the server gets in masking mode: no arrays, no example counts, and no payload that correlates
    with any one client's update (|r| < 6/sqrt(L): false-positive rate ~2e-9 per comparison for an independent
    uniform payload), while the same client's unmasked encoding does (positive control)."""
    cfg = config()
    grid = _stage_grid(fake_grid)(build_client_app(), NODES, run_config=cfg)
    run_federation(grid, read_app_config(cfg))
    app = read_app_config(cfg)
    initial = task.initial_arrays(app.task, 11)
    deltas = {}
    for k in range(3):  # each client's update, computed independently of the protocol
        local, _, _ = task.client_update(
            initial, task.load_client_data(app.task, k, 3, 11), app.task, seed=task.client_seed(11, 1, k), run_seed=11
        )
        deltas[k] = flatten(local) - flatten(initial)
    d = deltas[0].size
    line = _lines(Path(cfg["runs-dir"]) / "r")[0]
    scale, max_weight = line["secagg"]["scale"], line["secagg"]["max_weight"]
    train_replies = [m for m in grid.received if _stage(m)]
    assert len(train_replies) == 5 * 3  # 5 stages x 3 clients
    masked = 0
    threshold = 6 / math.sqrt(d)
    for reply in train_replies:
        assert RecordName.ARRAYS not in reply.content.array_records
        assert "num-examples" not in reply.content.metric_records.get(RecordName.METRICS, {})
        payload = reply.content.config_records[RecordName.CONFIG][SecAggKey.PAYLOAD]
        assert isinstance(payload, bytes)
        if _stage(reply) != Stage.MASKED_INPUT:
            continue
        masked += 1
        (length,) = struct.unpack_from("<Q", payload, 52)
        assert length == d + 1
        words = to_signed(np.frombuffer(payload, dtype="<u4", offset=52 + 9), 32)[:d].astype(np.float64)
        for k, delta in deltas.items():
            r = np.corrcoef(words, delta)[0, 1]
            assert abs(r) < threshold, (k, r)
    assert masked == 3
    control = MaskingConfig(threshold=2, clip_range=1.0, scale=scale, max_weight=max_weight)
    plain = to_signed(encode(deltas[0], max_weight, control), 32)[:d].astype(np.float64)
    assert np.corrcoef(plain, deltas[0])[0, 1] > 0.99


# ------------------------------------------------------------------------------------------ CKKS


@pytest.mark.slow
def test_ckks_run_matches_fedavg_and_the_server_holds_only_ciphertext(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    """Clients decrypt, train and upload Enc(w * state); the server adds ciphertexts with a key-less context and
    checkpoints the encrypted state; clients evaluate it (federated evaluation)."""
    from fedmpt.apps.aggregators import federated_metrics
    from fedmpt.apps.ckks_app import CKKS_BINDING_ARRAY, CKKS_STATE_ARRAY
    from secagg import ckks

    cfg = config(**{"secure-aggregation": "ckks", "num-server-rounds": 2})
    grid = _stage_grid(fake_grid)(build_client_app(), NODES, run_config=cfg)
    run = run_federation(grid, read_app_config(cfg))
    lines = _lines(run.path)
    for line in lines:
        assert line["status"] == "ok" and line["secure_aggregation"] == "ckks" and line["evaluation"] == "federated"
        assert line["clients_replied"] == [0, 1, 2]
        # global metrics = example-weighted mean of the clients' own-split metrics (all splits have 8 examples)
        expected_map = np.mean([line["clients"][c]["mAP"] for c in ("0", "1", "2")])
        assert line["global"]["mAP"] == pytest.approx(expected_map, abs=1e-12)
    # every train reply the server received: no arrays, no example count
    for reply in grid.received:
        if _stage(reply) == Stage.CKKS:
            assert RecordName.ARRAYS not in reply.content.array_records
            assert "num-examples" not in reply.content.metric_records.get(RecordName.METRICS, {})
    final = load_file(str(run.path / "final.safetensors"))
    assert set(final) == {CKKS_STATE_ARRAY, CKKS_BINDING_ARRAY}  # the server never had the model in the clear
    server_context, _, _ = ckks.load_kit(run.path / "secagg" / "ckks" / "server")
    assert not server_context.is_private()
    # Round 1 against FedAvg; round 2 against FedAvg from the state the clients decrypted after round 1 (the
    # decryption rounds it to a grid, and local training does not shrink that difference). Each within the bound
    # the verified decryption reports (CKKS noise plus half a grid step) plus float32 rounding of the state.
    round1 = _decrypt_final(run.path, load_file(str(run.path / "checkpoints" / "round_0001.safetensors")), 1)
    expected1 = fedavg_oracle(cfg, [0, 1, 2], 3, rounds=1)
    state1 = unflatten(round1.mean, expected1)
    _assert_close_to_oracle(state1, expected1, round1.error_bound)
    result = _decrypt_final(run.path, final, 2)
    assert result.n_clients == 3 and result.total_weight == 48
    expected = fedavg_oracle(cfg, [0, 1, 2], 3, rounds=1, start=state1, first_round=2)
    _assert_close_to_oracle(unflatten(result.mean, expected), expected, result.error_bound)
    assert federated_metrics({}) == {}


def _decrypt_final(run_path: Path, final: dict[str, np.ndarray], round_number: int) -> Any:
    """A client's verified decryption of the checkpointed state (signed uploads of ``round_number``)."""
    from fedmpt.apps.ckks_app import CKKS_BINDING_ARRAY, CKKS_STATE_ARRAY, decode_upload_set
    from fedmpt.apps.kit import Kit
    from secagg import ckks

    kit = Kit.load(run_path / "secagg")
    context, ckks_config, key_id = ckks.load_kit(kit.ckks_dir / "client")
    binding = final[CKKS_BINDING_ARRAY].tobytes()
    assert binding[:16] == kit.params.run_id and int.from_bytes(binding[16:], "little") == round_number
    return ckks.decrypt_verified(
        context,
        ckks_config,
        decode_upload_set(final[CKKS_STATE_ARRAY].tobytes()),
        kit.roster,
        run_id=kit.params.run_id,
        round_number=round_number,
        key_id=key_id,
        threshold=kit.params.threshold,
    )


@pytest.mark.slow
def test_ckks_run_resumes_from_its_encrypted_checkpoint(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], fedavg_oracle: Callable[..., Any]
) -> None:
    cfg = config(**{"secure-aggregation": "ckks", "num-server-rounds": 2})
    # calls: query, then (train, evaluate) per round; call 4 is round 2's train
    with pytest.raises(RuntimeError, match="simulated server crash"):
        run_federation(fake_grid(build_client_app(), NODES, run_config=cfg, crash_at_call=4), read_app_config(cfg))
    resumed_cfg = {**cfg, "resume": True}
    run = run_federation(fake_grid(build_client_app(), NODES, run_config=resumed_cfg), read_app_config(resumed_cfg))
    assert [x["round"] for x in _lines(run.path)] == [1, 2]
    round1 = _decrypt_final(run.path, load_file(str(run.path / "checkpoints" / "round_0001.safetensors")), 1)
    state1 = unflatten(round1.mean, task.initial_arrays(read_app_config(cfg).task, 11))
    result = _decrypt_final(run.path, load_file(str(run.path / "final.safetensors")), 2)
    expected = fedavg_oracle(cfg, [0, 1, 2], 3, rounds=1, start=state1, first_round=2)
    _assert_close_to_oracle(unflatten(result.mean, expected), expected, result.error_bound)


def test_stages_after_training_use_the_stored_setup_and_never_import_the_task(
    config: Callable[..., dict[str, Any]], fake_grid: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """share-keys, masked-input and unmask run from the setup kept at advertise: the full setup (which reads the
    task and its data, and imports torch) is built once per client and round, at advertise only."""
    import fedmpt.apps.masking_app as sa

    full_setups: list[Any] = []
    original = sa.client_setup

    def counting(context: Any, overrides: Any) -> Any:
        full_setups.append(context.node_config["partition-id"])
        return original(context, overrides)

    monkeypatch.setattr(sa, "client_setup", counting)
    cfg = config()
    run = run_federation(fake_grid(build_client_app(), NODES, run_config=cfg), read_app_config(cfg))
    (line,) = _lines(run.path)
    assert line["status"] == "ok" and line["secagg"]["survivors"] == [0, 1, 2]
    assert sorted(full_setups) == [0, 1, 2]  # one per client: the advertise stage


def test_the_client_app_imports_no_torch() -> None:
    """A fresh ClientApp process (one per message under the deployment engine) loads neither torch nor open_clip
    until a handler needs the task."""
    import subprocess
    import sys

    code = "import sys, fedmpt.apps.client_app; print(sorted({'torch', 'open_clip', 'opacus'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
