"""Secure aggregation through Flower's simulation engine (Ray): masked and CKKS runs equal the plain run.

The ClientApp keeps the protocol state of a round in ``context.state`` between the five ``train`` stages, so
this also checks that the state survives Flower running successive messages of one node on any Ray actor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmpt.apps.simulation import run_local_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOAT32_SLACK = 1e-6  # float32 storage of states of magnitude <= ~5


def test_masked_and_ckks_simulations_match_the_plain_run(
    tmp_path: Path, small_task: dict[str, Any], fedavg_oracle: Callable[..., dict[str, np.ndarray]]
) -> None:
    ray = pytest.importorskip("ray")
    base = {
        "num-server-rounds": 2,
        "runs-dir": str(tmp_path),
        "seed": 5,
        "num-clients": 3,
        "method": "promptfl",
        **small_task,
    }
    plain = run_local_simulation({**base, "run-name": "plain"}, num_supernodes=3)
    masked = run_local_simulation({**base, "run-name": "masked", "secure-aggregation": "masking"}, num_supernodes=3)
    encrypted = run_local_simulation({**base, "run-name": "ckks", "secure-aggregation": "ckks"}, num_supernodes=3)
    assert not ray.is_initialized()

    lines = [json.loads(x) for x in (masked / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    for line in lines:
        assert line["status"] == "ok" and line["secure_aggregation"] == "masking"
        assert line["clients_replied"] == [0, 1, 2] and line["clients_failed"] == []
    plain_lines = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert all(x["secure_aggregation"] == "none" for x in plain_lines)

    bound = sum(x["secagg"]["error_bound"] for x in lines) + FLOAT32_SLACK
    a = load_file(str(plain / "final.safetensors"))
    b = load_file(str(masked / "final.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.max(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))) <= bound, name

    # CKKS: the server checkpointed the signed uploads only; a client verifies and decrypts them. Round 1 equals
    # the plain round 1 within the reported bound; round 2 equals FedAvg from the state clients decrypted.
    from fedmpt.apps.ckks_app import CKKS_BINDING_ARRAY, CKKS_STATE_ARRAY, decode_upload_set
    from fedmpt.apps.kit import Kit
    from fedmpt.apps.update_vector import unflatten
    from secagg import ckks

    ckks_lines = [json.loads(x) for x in (encrypted / "metrics.jsonl").read_text().splitlines()]
    assert all(x["secure_aggregation"] == "ckks" and x["evaluation"] == "federated" for x in ckks_lines)
    assert all(x["clients_replied"] == [0, 1, 2] for x in ckks_lines)
    kit = Kit.load(encrypted / "secagg")
    context, config, key_id = ckks.load_kit(kit.ckks_dir / "client")

    def decrypt(checkpoint: Path, round_number: int) -> Any:
        state = load_file(str(checkpoint))
        assert set(state) == {CKKS_STATE_ARRAY, CKKS_BINDING_ARRAY}
        return ckks.decrypt_verified(
            context, config, decode_upload_set(state[CKKS_STATE_ARRAY].tobytes()), kit.roster,
            run_id=kit.params.run_id, round_number=round_number, key_id=key_id, threshold=kit.params.threshold,
        )  # fmt: skip

    round1 = decrypt(encrypted / "checkpoints" / "round_0001.safetensors", 1)
    plain1 = load_file(str(plain / "checkpoints" / "round_0001.safetensors"))
    state1 = unflatten(round1.mean, plain1)
    for name in plain1:
        diff = np.max(np.abs(plain1[name].astype(np.float64) - state1[name].astype(np.float64)))
        assert diff <= round1.error_bound + FLOAT32_SLACK, name
    result = decrypt(encrypted / "final.safetensors", 2)
    expected = fedavg_oracle(
        {**base, "secure-aggregation": "ckks"}, [0, 1, 2], 3, rounds=1, start=state1, first_round=2
    )
    decrypted = unflatten(result.mean, expected)
    for name in expected:
        assert np.max(np.abs(expected[name] - decrypted[name].astype(np.float64))) <= result.error_bound + FLOAT32_SLACK
