"""Round time on Flower's deployment engine (real SuperLink and SuperNode processes on this machine), by transport
protection.

For each ``--secure-aggregation`` mode, runs ``scripts/deploy_local.py`` (TLS, SuperNode authentication, one
ClientApp process per message, as in a real deployment, over loopback) with the default task and reads the run's
``metrics.jsonl``: per-round wall time and, for masking, the time of each exchange (``secagg.stage_s``). Masking
uses one kit provisioned up front with ``fedmpt secagg provision`` (the deployment path; the per-run kit is
simulation only; with ``ckks`` the kit also holds the CKKS contexts). The modes run one after the other, not
interleaved: a deployment takes minutes to start. A CKKS round evaluates on the sites (the server has no key).

Usage::

    .venv/bin/python experiments/bench_deployment.py --rounds 4            # 3 SuperNodes, none + masking
    .venv/bin/python experiments/bench_deployment.py --rounds 4 --secure-aggregation ckks \
        --out experiments/results/bench_deployment_ckks.json

Writes ``experiments/results/bench_deployment.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedmpt.apps.task import TASK_DEFAULTS

REPO = Path(__file__).resolve().parents[1]


def _run(mode: str, args: argparse.Namespace, work: Path, kit: Path) -> dict[str, Any]:
    runs = work / f"runs-{mode}"
    config = (
        f'num-server-rounds={args.rounds} num-clients={args.supernodes} secure-aggregation="{mode}" '
        f'secagg-dir="{kit}" runs-dir="{runs}"'
    )
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "deploy_local.py"),
        "--supernodes",
        str(args.supernodes),
        "--work-dir",
        str(work / f"deploy-{mode}"),
        "--run-config",
        config,
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout_s)
    if done.returncode != 0:
        tail = done.stdout[-3000:] + done.stderr[-3000:]
        raise RuntimeError(f"{mode}: deploy_local exited {done.returncode}:\n{tail}")
    (metrics,) = runs.glob("*/metrics.jsonl")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    bad = [x["round"] for x in lines if x.get("status", "ok") != "ok" or x["clients_failed"]]
    if bad:
        raise RuntimeError(f"{mode}: rounds {bad} had failures")
    row: dict[str, Any] = {
        "secure_aggregation": mode,
        "round_s": [x["wall_time_s"] for x in lines],
        "round_s_median": statistics.median(x["wall_time_s"] for x in lines),
        "round_s_median_after_first": statistics.median(x["wall_time_s"] for x in lines[1:] or lines),
        "final_mAP_decorrelated": lines[-1]["global"]["mAP"],
    }
    stages = [x["secagg"]["stage_s"] for x in lines if "stage_s" in x.get("secagg", {})]
    if stages:
        row["stage_s"] = stages
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--secure-aggregation", nargs="+", choices=("none", "masking", "ckks"), default=["none", "masking"]
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit per deployment")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_deployment.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmpt-bench-deploy-") as tmp:
        work = Path(tmp)
        kit = work / "kit"
        fedmpt = Path(sys.executable).with_name("fedmpt")
        provision = [str(fedmpt), "secagg", "provision", "--out", str(kit), "--nodes", str(args.supernodes)]
        if "ckks" in args.secure_aggregation:  # the CKKS kit must fit the run's largest weight (train-per-client)
            provision += ["--ckks", "--ckks-max-weight", str(TASK_DEFAULTS["train-per-client"])]
        subprocess.run(provision, check=True, capture_output=True)
        for mode in args.secure_aggregation:
            row = _run(mode, args, work, kit)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["secure_aggregation"] == "none"), None)
    if base is not None:
        for row in rows:
            row["ratio_vs_none_median_after_first"] = (
                row["round_s_median_after_first"] / base["round_s_median_after_first"]
            )
    out = {
        "meta": {
            "command": "python experiments/bench_deployment.py " + " ".join(sys.argv[1:]),
            "cpu_count": os.cpu_count(),
            "load_avg_at_end": list(os.getloadavg()),
        },
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({r["secure_aggregation"]: r.get("ratio_vs_none_median_after_first") for r in rows}))


if __name__ == "__main__":
    main()
