"""The deployment engine: a real SuperLink and 3 SuperNodes (TLS + SuperNode auth), one SuperNode killed mid-run.

Slow (a few minutes on 2 cores: every Flower message starts a ClientApp process) but it is the only test of
the real processes, certificates and node authentication.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _flwr_apps_in_home() -> set[str]:
    apps = Path.home() / ".flwr" / "apps"
    return {p.name for p in apps.iterdir()} if apps.is_dir() else set()


def _run_to_completion(deployment: Any, run_config: str, during: Callable[[Any, Any], None] | None = None) -> str:
    """Start ``deployment``, run the app with ``run_config``, call ``during(deployment, run)`` while it runs, and
    return the run's output once it succeeds; every process is stopped whatever happens, and none may be left."""
    return _runs_to_completion(deployment, [run_config], during)[0]


def _runs_to_completion(
    deployment: Any, run_configs: list[str], during: Callable[[Any, Any], None] | None = None
) -> list[str]:
    """:func:`_run_to_completion` for several runs, one after the other, on one started deployment."""
    outputs = []
    try:
        deployment.start()
        for run_config in run_configs:
            run = deployment.start_run([run_config])
            if during is not None:
                during(deployment, run)
            output, _ = run.communicate(timeout=420)
            assert run.returncode == 0, output
            outputs.append(str(output))
    finally:
        deployment.stop()
        leftovers = deployment.leftover_pids()
    assert leftovers == set(), f"processes left running: {leftovers}"
    return outputs


@pytest.mark.timeout(600)
def test_three_supernodes_one_killed_mid_run(
    tmp_path: Path, small_task: dict[str, Any], fedavg_oracle: Callable[..., dict[str, np.ndarray]]
) -> None:
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed next to this interpreter")
    deploy_local = _load_script("deploy_local")
    home_apps_before = _flwr_apps_in_home()
    runs = tmp_path / "runs"
    overrides = {
        "num-server-rounds": 2,
        "min-clients": 2,
        "round-timeout-s": 60.0,
        "seed": 3,
        "num-clients": 3,
        "method": "promptfl",
        **small_task,
    }
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) + f' runs-dir="{runs}" run-name="dep"'
    deployment = deploy_local.LocalDeployment(tmp_path / "deploy", num_supernodes=3, app_dir=REPO)
    assert deployment.logs == tmp_path.resolve() / "deploy" / "logs"
    lost: list[int] = []

    def kill_supernode_2_mid_round(deployment: Any, run: Any) -> None:
        # Kill SuperNode 2 mid-round: once it has received its training message (its reply to the partition
        # query is then complete), so it is sampled for training and vanishes before replying. Killing it
        # while it uploads a reply instead stalls the ServerApp until Flower's object-push session expires
        # (180 s in flwr 1.41), a Flower behaviour documented in docs/deployment.md.
        lost.append(deployment.node_ids[2])
        supernode_log = deployment.logs / "supernode-2.log"
        deadline = time.monotonic() + 240
        while "Receiving: train message" not in supernode_log.read_text(errors="replace"):
            assert run.poll() is None, "flwr run ended before SuperNode 2 was sent its training message"
            assert time.monotonic() < deadline, "SuperNode 2 got no training message within 240 s"
            time.sleep(0.1)
        deployment.kill_supernode(2)

    output = _run_to_completion(deployment, run_config, during=kill_supernode_2_mid_round)
    assert _flwr_apps_in_home() == home_apps_before  # the user's ~/.flwr was not used

    assert "[round 2/2]" in output
    lines = [json.loads(x) for x in (runs / "dep" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    first, second = lines
    assert first["clients_sampled"] == [0, 1, 2]  # SuperNode 2 was alive when the round began
    assert first["clients_replied"] == [0, 1]
    assert [(f["node_id"], f["client_id"]) for f in first["clients_failed"]] == [(lost[0], 2)], first
    assert second["clients_replied"] == [0, 1]
    assert all(f["node_id"] == lost[0] for f in second["clients_failed"])
    assert first["status"] == second["status"] == "ok"

    # the surviving SuperNodes' updates, averaged: the FedAvg oracle over partitions 0 and 1 of 3
    arrays = fedavg_oracle(overrides, [0, 1], 3, rounds=2)
    final = load_file(str(runs / "dep" / "final.safetensors"))
    for name in arrays:
        np.testing.assert_allclose(final[name], arrays[name], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(900)
def test_masked_and_ckks_rounds_on_the_deployment_engine_match_fedavg(
    tmp_path: Path, small_task: dict[str, Any], fedavg_oracle: Callable[..., dict[str, np.ndarray]]
) -> None:
    """Secure aggregation across real SuperNode processes, one provisioned kit, one masked and one CKKS run on one
    deployment: the node state kept between the five masking stages and the on-disk round counter survive Flower's
    one-process-per-message model, and each result is FedAvg within its stated bound."""
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed next to this interpreter")
    from fedmpt.apps.ckks_app import CKKS_STATE_ARRAY, decode_upload_set
    from fedmpt.apps.kit import Kit
    from fedmpt.apps.update_vector import unflatten
    from secagg import ckks

    deploy_local = _load_script("deploy_local")
    runs = tmp_path / "runs"
    fedmpt = Path(sys.executable).with_name("fedmpt")
    weight = str(small_task["train-per-client"])
    kits = {"sa": tmp_path / "kit-sa", "he": tmp_path / "kit-he"}  # a kit is one session (one pinned run id)
    subprocess.run([str(fedmpt), "secagg", "provision", "--out", str(kits["sa"]), "--nodes", "3"], check=True)
    subprocess.run(
        [
            str(fedmpt),
            "secagg",
            "provision",
            "--out",
            str(kits["he"]),
            "--nodes",
            "3",
            "--ckks",
            "--ckks-max-weight",
            weight,
        ],
        check=True,
    )
    overrides = {"num-server-rounds": 1, "seed": 5, "num-clients": 3, "method": "promptfl", **small_task}
    base = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) + f' runs-dir="{runs}"'
    configs = [
        f'{base} run-name="sa" secure-aggregation="masking" secagg-dir="{kits["sa"]}"',
        f'{base} run-name="he" secure-aggregation="ckks" secagg-dir="{kits["he"]}"',
    ]
    _runs_to_completion(deploy_local.LocalDeployment(tmp_path / "deploy", num_supernodes=3, app_dir=REPO), configs)
    expected = fedavg_oracle(overrides, [0, 1, 2], 3, rounds=1)

    (line,) = [json.loads(x) for x in (runs / "sa" / "metrics.jsonl").read_text().splitlines()]
    assert line["status"] == "ok" and line["secure_aggregation"] == "masking", line
    assert line["clients_replied"] == [0, 1, 2] and line["secagg"]["survivors"] == [0, 1, 2]
    assert set(line["secagg"]["stage_s"]) == {"advertise", "share-keys", "masked-input", "consistency-check", "unmask"}
    final = load_file(str(runs / "sa" / "final.safetensors"))
    bound = line["secagg"]["error_bound"]
    for name in expected:
        gap = np.max(np.abs(final[name].astype(np.float64) - expected[name]))
        assert gap <= bound + 1e-6, (name, gap, bound)  # 1e-6: the float32 storage of the state

    (line,) = [json.loads(x) for x in (runs / "he" / "metrics.jsonl").read_text().splitlines()]
    assert line["status"] == "ok" and line["secure_aggregation"] == "ckks", line
    assert line["clients_replied"] == [0, 1, 2]
    loaded = Kit.load(kits["he"])
    context, config, key_id = ckks.load_kit(loaded.ckks_dir / "client")
    state = load_file(str(runs / "he" / "final.safetensors"))
    result = ckks.decrypt_verified(
        context, config, decode_upload_set(state[CKKS_STATE_ARRAY].tobytes()), loaded.roster,
        run_id=loaded.params.run_id, round_number=1, key_id=key_id, threshold=loaded.params.threshold,
    )  # fmt: skip
    decrypted = unflatten(result.mean, expected)
    for name in expected:
        gap = np.max(np.abs(decrypted[name].astype(np.float64) - expected[name]))
        assert gap <= result.error_bound + 1e-6, (name, gap, result.error_bound)
