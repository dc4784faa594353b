"""Benchmark the frozen-feature cache: encoding a client's images vs loading their cached features.

Side by side in one run, for the bundled tiny CLIP (or ``--backbone ViT-B-16`` with random weights):

* ``encode``: the frozen image encoder over the client's images (what every round would pay without a cache);
* ``cache hit``: :meth:`FeatureCache.get_or_compute` on a warm cache (read + sha256 check);
* one local epoch of FedMPT training on the features (what a round costs on top).

Usage::

    .venv/bin/python experiments/bench_feature_cache.py            # 400 images (one default client)
    .venv/bin/python experiments/bench_feature_cache.py --images 2000

Writes ``experiments/results/bench_feature_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedmpt.backbone.loader import TINY_CLIP, load_backbone
from fedmpt.conditions import load_conditions
from fedmpt.feature_cache import FeatureCache, FeatureKey, encode_dataset
from fedmpt.methods import build_method
from fedmpt.training import FeatureData, TrainConfig, client_update
from fedmpt.world.dataset import WorldDataset
from fedmpt.world.scene import oracle_distribution

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--backbone", default=TINY_CLIP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_feature_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = (
        load_backbone(args.backbone) if args.backbone == TINY_CLIP else load_backbone(args.backbone, random_init=True)
    )
    data = WorldDataset(oracle_distribution(), args.images, seed=0, output_size=backbone.image_size)
    data.images()  # render first: the benchmark times the encoder, not the generator

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        return encode_dataset(backbone.encode_image_tokens, data, 64)

    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp))
        key = FeatureKey(backbone.fingerprint, data.fingerprint(), "bench")
        start = time.perf_counter()
        g, p = cache.get_or_compute(key, encode)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        encode()
        encode_only = time.perf_counter() - start
        hits = []
        for _ in range(3):
            start = time.perf_counter()
            cache.get_or_compute(key, encode)
            hits.append(time.perf_counter() - start)
        warm = min(hits)
    cset = load_conditions("synthetic")
    method = build_method("fedmpt", backbone, cset.classnames, cset.conditions)
    feats = FeatureData(g, p, data.labels)
    start = time.perf_counter()
    client_update(method, method.trainable_state(), feats, TrainConfig(lr=0.01))
    epoch = time.perf_counter() - start
    result = {
        "backbone": args.backbone,
        "images": args.images,
        "encode_seconds": encode_only,
        "cold_cache_seconds": cold,
        "warm_cache_seconds": warm,
        "speedup_encode_over_cache_hit": encode_only / warm,
        "fedmpt_local_epoch_seconds": epoch,
        "round_speedup_with_cache": (encode_only + epoch) / (warm + epoch),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
