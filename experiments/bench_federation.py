"""Per-round time and bytes per client of the Flower simulation for several federation sizes.

Runs ``fedmpt run``'s simulation (:func:`fedmpt.apps.simulation.run_local_simulation`) of the default task
(FedMPT, synthetic world, bundled tiny CLIP) with 5, 10 and 20 simulated clients and reads the run directories'
``metrics.jsonl``. Round 1 includes feature encoding and Ray start-up and is reported apart.

Usage::

    .venv/bin/python experiments/bench_federation.py                      # 5, 10, 20 clients, 3 rounds each
    .venv/bin/python experiments/bench_federation.py --clients 5 --rounds 10

Writes ``experiments/results/bench_federation.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedmpt.apps.simulation import run_local_simulation

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_federation.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            start = time.perf_counter()
            path = run_local_simulation(
                {
                    "num-server-rounds": args.rounds,
                    "num-clients": n,
                    "min-clients": min(2, n),
                    "runs-dir": tmp,
                    "run-name": f"n{n}",
                },
                num_supernodes=n,
            )
            wall = time.perf_counter() - start
            lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
            later = lines[1:] or lines
            row = {
                "clients": n,
                "rounds": args.rounds,
                "wall_s": wall,
                "first_round_s": lines[0]["wall_time_s"],
                "round_s_median_after_first": statistics.median(x["wall_time_s"] for x in later),
                "bytes_down_per_client_per_round": statistics.median(x["bytes_down"] / n for x in lines),
                "bytes_up_per_client_per_round": statistics.median(x["bytes_up"] / n for x in lines),
                "final_mAP_decorrelated": lines[-1]["global"]["mAP"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
