"""``fedmpt train``: an in-process federated run on the synthetic world (no Flower, no network).

It builds the default federated spurious-correlation benchmark, encodes it once with the frozen backbone
(features cached), runs FedAvg of the chosen method and prints, every round, the mAP on the decorrelated and
in-distribution test splits next to zero-shot CLIP's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmpt.federated import RoundResult


def default_cache_dir() -> Path:
    """Feature cache directory: ``$FEDMPT_CACHE`` or ``~/.cache/fedmpt/features``."""
    return Path(os.environ.get("FEDMPT_CACHE", Path.home() / ".cache" / "fedmpt")) / "features"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("train", help="in-process federated run on the synthetic world", description=__doc__)
    p.add_argument("--method", default="fedmpt", help="fedmpt, an ablation (fedmpt-cps, ...) or a baseline")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--train-per-client", type=int, default=400)
    p.add_argument("--spurious-strength", type=float, default=0.9)
    p.add_argument("--fraction", type=float, default=1.0, help="client participation rate per round")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: $FEDMPT_CACHE/features)")
    p.add_argument("--json", type=Path, default=None, help="write the per-round results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, open_clip) only when the command runs, so that `fedmpt --help` stays fast.
    from fedmpt.backbone.loader import TINY_CLIP, load_backbone
    from fedmpt.conditions import load_conditions
    from fedmpt.federated import run_federated, world_features
    from fedmpt.methods import build_method
    from fedmpt.training import TrainConfig, evaluate
    from fedmpt.world.dataset import FederatedWorldConfig, make_federated_world

    start = time.perf_counter()
    backbone = load_backbone(TINY_CLIP)
    world = make_federated_world(
        FederatedWorldConfig(
            num_clients=args.clients,
            train_per_client=args.train_per_client,
            spurious_strength=args.spurious_strength,
            seed=args.seed,
        )
    )
    conditions = load_conditions("synthetic", world.classnames).conditions
    feats = world_features(backbone, world, args.cache_dir or default_cache_dir())
    method = build_method(args.method, backbone, world.classnames, conditions)
    zero = build_method("zeroshot", backbone, world.classnames, conditions)
    evals = {"decorrelated": feats.test_decorrelated, "in_distribution": feats.test_in_distribution}
    zs = {k: evaluate(zero, None, v).mAP for k, v in evals.items()}
    print(
        f"{args.method}: {method.num_trainable()} trainable parameters; {args.clients} clients, "
        f"{args.rounds} rounds; zero-shot mAP decorrelated {100 * zs['decorrelated']:.2f}, "
        f"in-distribution {100 * zs['in_distribution']:.2f}",
        flush=True,
    )

    def report(r: RoundResult) -> None:
        m = r.metrics
        print(
            f"round {r.round:3d}  clients {len(r.participants)}  loss {r.train_loss:.4f}  "
            f"mAP decorrelated {100 * m['decorrelated']['mAP']:.2f}  "
            f"in-distribution {100 * m['in_distribution']['mAP']:.2f}  "
            f"CF1 {100 * m['decorrelated']['CF1']:.2f}  OF1 {100 * m['decorrelated']['OF1']:.2f}  "
            f"({r.seconds:.1f}s)",
            flush=True,
        )

    train = TrainConfig(lr=args.lr, local_epochs=args.local_epochs, batch_size=args.batch_size, seed=args.seed)
    _, history = run_federated(
        method,
        feats.clients_train,
        evals,
        train,
        rounds=args.rounds,
        fraction=args.fraction,
        seed=args.seed,
        on_round=report,
    )
    print(f"done in {time.perf_counter() - start:.1f}s")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"zero_shot_mAP": zs, "rounds": [r.__dict__ for r in history], "args": vars(args)},
                default=str,
                indent=2,
            )
        )
    return 0
