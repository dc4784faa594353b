"""Throughput of the synthetic-world generator (scenes sampled and rendered to 64x64 RGB, one process).

Usage::

    .venv/bin/python experiments/bench_world.py            # 5000 images, pretraining world and a client world

Writes ``experiments/results/bench_world.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmpt.world.dataset import FederatedWorldConfig, WorldDataset, make_federated_world
from fedmpt.world.scene import pretraining_distribution

REPO = Path(__file__).resolve().parents[1]


def rate(make: object, n: int) -> dict[str, float]:
    start = time.perf_counter()
    data = make(n)  # type: ignore[operator]
    sampled = time.perf_counter()
    data.images()
    done = time.perf_counter()
    return {"images": n, "sample_s": sampled - start, "render_s": done - sampled, "images_per_s": n / (done - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_world.json")
    args = parser.parse_args()
    client_dist = make_federated_world(FederatedWorldConfig(train_per_client=1)).clients[0].train.distribution
    result = {
        "pretraining_world": rate(lambda n: WorldDataset(pretraining_distribution(), n, seed=0), args.images),
        "client_world": rate(lambda n: WorldDataset(client_dist, n, seed=1), args.images),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
