"""Secure aggregation through Flower's simulation engine (Ray): masked and CKKS runs equal the plain run.

The ClientApp keeps the protocol state of a round in ``context.state`` between the four ``train`` stages, so
this also checks that the state survives Flower running successive messages of one node on any Ray actor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmpt.apps.simulation import run_local_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOAT32_SLACK = 1e-6  # float32 storage of states of magnitude <= ~5


def test_masked_and_ckks_simulations_match_the_plain_run(tmp_path: Path, small_task: dict[str, Any]) -> None:
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

    # CKKS: the server checkpointed ciphertext only; decrypt it with the (per-run) client kit
    from fedmpt.apps.secure_aggregation import CKKS_AGGREGATE_ARRAY, CKKS_BINDING_ARRAY, unflatten
    from secagg import ckks

    ckks_lines = [json.loads(x) for x in (encrypted / "metrics.jsonl").read_text().splitlines()]
    assert all(x["secure_aggregation"] == "ckks" and x["evaluation"] == "federated" for x in ckks_lines)
    assert all(x["clients_replied"] == [0, 1, 2] for x in ckks_lines)
    final = load_file(str(encrypted / "final.safetensors"))
    assert set(final) == {CKKS_AGGREGATE_ARRAY, CKKS_BINDING_ARRAY}
    context, config, key_id = ckks.load_kit(encrypted / "secagg" / "ckks" / "client")
    binding = final[CKKS_BINDING_ARRAY].tobytes()
    result = ckks.decrypt_aggregate(
        context,
        config,
        final[CKKS_AGGREGATE_ARRAY].tobytes(),
        run_id=binding[:16],
        round_number=int.from_bytes(binding[16:], "little"),
        key_id=key_id,
    )
    decrypted = unflatten(result.mean, a)
    for name in a:
        diff = np.max(np.abs(a[name].astype(np.float64) - decrypted[name].astype(np.float64)))
        assert diff <= 2 * result.error_bound + FLOAT32_SLACK, name
