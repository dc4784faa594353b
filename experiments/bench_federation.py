"""Per-round time and bytes per client of the Flower simulation, by federation size and transport protection.

Runs ``fedmpt run``'s simulation (:func:`fedmpt.apps.simulation.run_local_simulation`) of the default task
(FedMPT, synthetic world, bundled tiny CLIP) and reads the run directories' ``metrics.jsonl``. Round 1
includes feature encoding and Ray start-up and is reported apart; the per-round time is the median of the later
rounds. A round is what a user waits for: local training on every site, the protected (or plain) upload, the
aggregation and the server's evaluation.

With several ``--secure-aggregation`` modes the runs are interleaved (mode A, mode B, ..., then again for each
``--repeats``), so every mode sees the same background load, and each mode's round time is reported as a ratio
to the ``none`` run of the same size. For masking the per-exchange times (``stage_s``: advertise = local
training + key advertisement, then share-keys, masked-input, consistency-check, unmask) come from the metrics
lines.

Usage::

    .venv/bin/python experiments/bench_federation.py                      # 5, 10, 20 clients, 3 rounds each
    .venv/bin/python experiments/bench_federation.py --clients 5 --rounds 10
    # the secure-aggregation round-cost target: 10 clients, ~10^5 parameters (adapter rank 72: 99,494)
    .venv/bin/python experiments/bench_federation.py --clients 10 --rounds 4 --repeats 2 \\
        --secure-aggregation none masking ckks --method-options adapter_rank=72 \\
        --out experiments/results/bench_federation_secagg.json

Writes ``experiments/results/bench_federation.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmpt.apps.simulation import run_local_simulation

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "masking", "ckks")


def _one_run(n: int, mode: str, args: argparse.Namespace, runs_dir: str, name: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "num-server-rounds": args.rounds,
        "num-clients": n,
        "min-clients": min(2, n),
        "runs-dir": runs_dir,
        "run-name": name,
        "secure-aggregation": mode,
        "method-options": args.method_options,
    }
    start = time.perf_counter()
    path = run_local_simulation(config, num_supernodes=n)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    failed = [x["round"] for x in lines if x.get("status", "ok") != "ok"]
    if failed:
        raise RuntimeError(f"{name}: rounds {failed} did not complete: {[x.get('status') for x in lines]}")
    later = lines[1:] or lines
    row: dict[str, Any] = {
        "clients": n,
        "secure_aggregation": mode,
        "rounds": args.rounds,
        "parameters": _parameters(args.method_options),
        "wall_s": wall,
        "first_round_s": lines[0]["wall_time_s"],
        "round_s": [x["wall_time_s"] for x in later],
        "round_s_median_after_first": statistics.median(x["wall_time_s"] for x in later),
        "bytes_down_per_client_per_round": statistics.median(x["bytes_down"] / n for x in lines),
        "bytes_up_per_client_per_round": statistics.median(x["bytes_up"] / n for x in lines),
        "final_mAP_decorrelated": lines[-1]["global"]["mAP"],
    }
    stage_rows = [x["secagg"]["stage_s"] for x in later if "stage_s" in x.get("secagg", {})]
    if stage_rows:
        row["stage_s_median"] = {k: statistics.median(r[k] for r in stage_rows) for k in stage_rows[0]}
    return row


def _parameters(method_options: str) -> int:
    """Size of the trainable state the clients send (a CKKS run's final.safetensors holds ciphertext instead)."""
    from fedmpt.apps import task

    config = task.task_config_from({"method-options": method_options})
    return int(sum(a.size for a in task.initial_arrays(config, 0).values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secure-aggregation", nargs="+", choices=MODES, default=["none"])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each mode (medians pooled)")
    parser.add_argument("--method-options", default="", help="run config 'method-options', e.g. adapter_rank=72")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_federation.json")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for rep in range(args.repeats):
                for mode in args.secure_aggregation:
                    row = _one_run(n, mode, args, tmp, f"n{n}-{mode}-r{rep}")
                    row["repeat"] = rep
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    summary = []
    for n in args.clients:
        pooled = {
            mode: [t for r in runs if r["clients"] == n and r["secure_aggregation"] == mode for t in r["round_s"]]
            for mode in args.secure_aggregation
        }
        base = statistics.median(pooled["none"]) if "none" in pooled else None
        for mode, times in pooled.items():
            entry: dict[str, Any] = {
                "clients": n,
                "secure_aggregation": mode,
                "rounds_pooled": len(times),
                "round_s_median": statistics.median(times),
                "round_s_min_max": [min(times), max(times)],
            }
            if base is not None:
                entry["ratio_vs_none"] = statistics.median(times) / base
            stages = [r["stage_s_median"] for r in runs if r["clients"] == n and "stage_s_median" in r]
            if mode == "masking" and stages:
                entry["stage_s_median"] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            summary.append(entry)
            print(json.dumps(entry), flush=True)
    meta = {
        "command": "python experiments/bench_federation.py " + " ".join(sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out: Any = (
        runs
        if args.secure_aggregation == ["none"] and args.repeats == 1
        else {
            "meta": meta,
            "summary": summary,
            "runs": runs,
        }
    )
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
