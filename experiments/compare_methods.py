"""Compare FedMPT, its ablations and the baselines in a federated loop on the synthetic world.

For each seed, the federated spurious-correlation benchmark is built (clients with strong per-client spurious
pairs and skewed backgrounds), encoded once with the bundled tiny CLIP (features cached), and every method runs
FedAvg (in-process, :func:`fedmpt.federated.run_federated`) for the same rounds, local epochs and learning rate.
The table reports mAP, CF1 and OF1 (percent; threshold 0.5) on the decorrelated and in-distribution global test
splits: mean +- standard deviation over seeds, final round. It also times one local step (batch 32) of each
method on cached features, and the same step when the frozen image encoder runs on the images (no cache).

Usage::

    .venv/bin/python experiments/compare_methods.py                 # 3 seeds, all methods (~20 min on 2 cores)
    .venv/bin/python experiments/compare_methods.py --quick         # 1 seed, 3 rounds (smoke run)

Writes ``experiments/results/compare_methods.json`` and ``experiments/results/compare_methods.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedmpt.backbone.loader import TINY_CLIP, load_backbone
from fedmpt.conditions import load_conditions
from fedmpt.federated import run_federated, world_features
from fedmpt.methods import build_method
from fedmpt.training import TrainConfig, batch_loss, evaluate
from fedmpt.world.dataset import FederatedWorldConfig, make_federated_world

REPO = Path(__file__).resolve().parents[1]
ORDER = (
    "zeroshot",
    "promptfl",
    "dualcoop",
    "fedmpt-cps",
    "fedmpt-adapters",
    "fedmpt-cps-adapters",
    "fedmpt-ot",
    "fedmpt",
)
METRICS = ("mAP", "CF1", "OF1")


def time_local_step(method, feats, world, backbone, batch: int = 32, repeats: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds per local SGD step on cached features, and with the image encoder in the loop (no cache)."""
    data = feats.clients_train[0]
    params = list(method.trainable_parameters().values())
    opt = torch.optim.SGD(params, lr=1e-3) if params else None
    cfg = TrainConfig()
    index = torch.arange(batch)
    images = world.clients[0].train
    images.output_size = backbone.image_size
    pixels = torch.stack([images[i][0] for i in range(batch)])

    def step(uncached: bool) -> None:
        if uncached:
            with torch.no_grad():
                backbone.encode_image_tokens(pixels)
        losses = batch_loss(method, data, index, cfg)
        if opt is not None:
            opt.zero_grad()
            losses.mean().backward()
            opt.step()

    out = {}
    for key, uncached in (("cached", False), ("uncached", True)):
        step(uncached)
        start = time.perf_counter()
        for _ in range(repeats):
            step(uncached)
        out[key] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ORDER))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--train-per-client", type=int, default=400)
    parser.add_argument("--spurious-strength", type=float, default=0.9)
    parser.add_argument("--background-concentration", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 rounds")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "experiments" / "out" / "feature_cache")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "compare_methods")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds = args.seeds[:1], 3
    torch.set_num_threads(args.threads)
    backbone = load_backbone(TINY_CLIP)
    results: dict[str, dict[str, list[float]]] = {}
    timing: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        world = make_federated_world(
            FederatedWorldConfig(
                num_clients=args.clients,
                train_per_client=args.train_per_client,
                spurious_strength=args.spurious_strength,
                background_concentration=args.background_concentration,
                seed=seed,
            )
        )
        conditions = load_conditions("synthetic", world.classnames).conditions
        feats = world_features(backbone, world, args.cache_dir)
        evals = {"decorrelated": feats.test_decorrelated, "in_distribution": feats.test_in_distribution}
        train = TrainConfig(lr=args.lr, local_epochs=args.local_epochs, seed=seed)
        for name in args.methods:
            start = time.perf_counter()
            method = build_method(name, backbone, world.classnames, conditions, init_seed=seed)
            if name == "zeroshot":
                final = {k: evaluate(method, None, v).to_dict() for k, v in evals.items()}
            else:
                _, history = run_federated(method, feats.clients_train, evals, train, rounds=args.rounds, seed=seed)
                final = history[-1].metrics
            for split, metrics in final.items():
                for m in METRICS:
                    results.setdefault(name, {}).setdefault(f"{split}/{m}", []).append(100 * metrics[m])
            if seed == args.seeds[0]:
                timing[name] = time_local_step(method, feats, world, backbone)
            print(
                f"seed {seed} {name:22s} decorrelated mAP {100 * final['decorrelated']['mAP']:.2f} "
                f"in-dist mAP {100 * final['in_distribution']['mAP']:.2f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    summary = {
        name: {key: (statistics.mean(v), statistics.pstdev(v) if len(v) > 1 else 0.0) for key, v in res.items()}
        for name, res in results.items()
    }
    payload = {"args": vars(args), "results": results, "summary": summary, "step_seconds": timing}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [
        f"Seeds {args.seeds}, {args.clients} clients, {args.rounds} rounds, lr {args.lr}, spurious strength "
        f"{args.spurious_strength}; percent, mean +- std over seeds.",
        "",
        "| method | trainable | dec. mAP | dec. CF1 | dec. OF1 | in-dist mAP | in-dist CF1 | in-dist OF1 "
        "| step ms (cached) | step ms (no cache) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.methods:
        s = summary[name]
        cells = [f"{s[f'{split}/{m}'][0]:.2f} ± {s[f'{split}/{m}'][1]:.2f}" for split in evals for m in METRICS]
        n_params = build_method(name, backbone, world.classnames, conditions).num_trainable()
        t = timing[name]
        lines.append(
            f"| {name} | {n_params:,d} | "
            + " | ".join(cells)
            + f" | {1000 * t['cached']:.1f} | {1000 * t['uncached']:.1f} |"
        )
    table = "\n".join(lines)
    args.out.with_name(args.out.name + ".md").write_text(table + "\n")
    print(table)
    best_baseline = max(summary[b]["decorrelated/mAP"][0] for b in ("promptfl", "dualcoop") if b in summary)
    if "fedmpt" in summary:
        gap = summary["fedmpt"]["decorrelated/mAP"][0] - best_baseline
        print(f"FedMPT - best baseline (decorrelated mAP): {gap:+.2f} points")


if __name__ == "__main__":
    main()
