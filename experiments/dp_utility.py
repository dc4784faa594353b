"""Privacy-utility curve of DP FedMPT and DP PromptFL on the synthetic benchmark, with the DP levers measured.

Each run is FedAvg over the federated spurious-correlation world (the tiny CLIP's cached features), every client
training with DP-SGD exactly as a site does (``privacy.dpsgd.dp_client_update``: a declared per-site dataset
size, Poisson sampling, calibrated sigma for the whole run, CSPRNG noise), uniform FedAvg weights (a site's count
is private under DP). Reference points, measured in the same run: zero-shot CLIP and the non-DP method with the
same optimiser (``epsilon = inf``). mAP is reported on the decorrelated and the in-distribution global test
splits (the server's own data), mean +- std and min over seeds.

Levers (``--lever``, each one a named configuration; compare them on one seed first):

* ``old``: lr 0.05, momentum 0.9, every trainable group (the settings the issue measured);
* ``sgd``: lr 0.05, no momentum (the DP-aware default);
* ``prompts``: no momentum, and under DP only the prompt groups (and bias) are trained: adapters stay the
  identity and the gate uniform, as at initialisation (their low-rank products do not survive isotropic noise).
  The released vector is a subset, so the accounting is unchanged.
* ``prompts-lr0.02``, ``prompts-lr0.01``: the same with a lower learning rate (the noise's random walk on the
  prompts grows with lr x sigma).

Usage::

    .venv/bin/python experiments/dp_utility.py --levers old sgd prompts --seeds 0 --epsilons 3   # lever check
    .venv/bin/python experiments/dp_utility.py --seeds 0 1 2 3 4                                  # the curve

Writes ``experiments/results/dp_utility[_<tag>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmpt.backbone.loader import load_backbone
from fedmpt.federated import world_features
from fedmpt.methods import build_method
from fedmpt.methods.base import MethodConfig
from fedmpt.training import ClientUpdate, FeatureData, TrainConfig, client_update, evaluate, fedavg
from fedmpt.world import FederatedWorldConfig, make_federated_world
from fedmpt.world.dataset import condition_names
from privacy.dpsgd import DPConfig, dp_client_update
from privacy.per_sample import prepare_for_dp

REPO = Path(__file__).resolve().parents[1]
LEVERS: dict[str, dict[str, Any]] = {
    "old": {"lr": 0.05, "momentum": 0.9, "prompts_only": False},
    "sgd": {"lr": 0.05, "momentum": 0.0, "prompts_only": False},
    "prompts": {"lr": 0.05, "momentum": 0.0, "prompts_only": True},
    "prompts-lr0.02": {"lr": 0.02, "momentum": 0.0, "prompts_only": True},
    "prompts-lr0.01": {"lr": 0.01, "momentum": 0.0, "prompts_only": True},
}


def _method(name: str, backbone: Any, classnames: tuple[str, ...], prompts_only: bool) -> Any:
    config = MethodConfig(train_groups="prompts" if prompts_only else "all")  # the run config's dp-train
    return prepare_for_dp(build_method(name, backbone, classnames, condition_names(), config=config))


def _uniform(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    return fedavg([replace(u, num_examples=1) for u in updates])


def run_one(
    args: argparse.Namespace,
    data: tuple[tuple[FeatureData, ...], dict[str, FeatureData]],
    backbone: Any,
    classnames: tuple[str, ...],
    method_name: str,
    mode: str,
    epsilon: float,
    lever: str,
    seed: int,
) -> dict[str, Any]:
    clients, tests = data
    settings = LEVERS[lever]
    method = _method(method_name, backbone, classnames, settings["prompts_only"] and math.isfinite(epsilon))
    state = method.trainable_state()
    train = TrainConfig(lr=settings["lr"], momentum=settings["momentum"], batch_size=args.batch, seed=seed)
    sigma = None
    start = time.perf_counter()
    for r in range(args.rounds):
        updates = []
        for k, client in enumerate(clients):
            cfg = replace(train, seed=int(np.random.SeedSequence([seed, r, k]).generate_state(1)[0]))
            if not math.isfinite(epsilon):
                updates.append(client_update(method, state, client, cfg))
                continue
            dp = DPConfig(
                target_epsilon=epsilon,
                rounds=args.rounds,
                delta=args.delta,
                max_grad_norm=args.clip_feature if mode == "feature" else args.clip_exact,
                mode=mode,
                dataset_size=args.train_per_client,
                expected_batch_size=args.batch,
            )
            update, event = dp_client_update(method, state, client, cfg, dp)
            sigma = event.noise_multiplier
            updates.append(update)
        state = _uniform(updates)
    out = {name: evaluate(method, state, test).to_dict()["mAP"] for name, test in tests.items()}
    return {
        "method": method_name,
        "mode": mode if math.isfinite(epsilon) else "nondp",
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "lever": lever,
        "seed": seed,
        "noise_multiplier": sigma,
        "seconds": time.perf_counter() - start,
        **{f"mAP_{k}": v for k, v in out.items()},
    }


def _zero_shot(backbone: Any, classnames: tuple[str, ...], tests: dict[str, FeatureData]) -> dict[str, float]:
    method = build_method("zeroshot", backbone, classnames, condition_names())
    return {f"mAP_{k}": evaluate(method, method.trainable_state(), t).to_dict()["mAP"] for k, t in tests.items()}


def _summary(rows: list[dict[str, Any]], zero: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["mode"], row["epsilon"], row["lever"]), []).append(row)
    out = []
    for (method, mode, epsilon, lever), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        entry: dict[str, Any] = {"method": method, "mode": mode, "epsilon": epsilon, "lever": lever,
                                 "seeds": len(members)}  # fmt: skip
        for split in ("decorrelated", "iid"):
            values = [100 * m[f"mAP_{split}"] for m in members]  # percent
            entry[f"{split}_mean"] = statistics.fmean(values)
            entry[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            entry[f"{split}_min"] = min(values)
            entry[f"{split}_zero_shot_mean"] = statistics.fmean(
                100 * zero[str(m["seed"])][f"mAP_{split}"] for m in members
            )
        out.append(entry)
    return out


def _markdown(result: dict[str, Any]) -> str:
    args = result["settings"]
    lines = [
        f"Synthetic benchmark, {args['clients']} clients x {args['train_per_client']} records, {args['rounds']} "
        f"rounds, batch {args['batch']}, delta {args['delta']}, clip {args['clip_feature']} (feature) / "
        f"{args['clip_exact']} (exact), seeds {args['seeds']}; uniform FedAvg; mAP in percent.",
        "",
        "| method | mode | lever | epsilon | seeds | decorrelated mAP | min | zero-shot "
        "| in-dist. mAP | min | zero-shot |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["summary"]:
        eps = "inf" if e["epsilon"] is None else f"{e['epsilon']:g}"
        lines.append(
            f"| {e['method']} | {e['mode']} | {e['lever']} | {eps} | {e['seeds']} | "
            f"{e['decorrelated_mean']:.1f} +- {e['decorrelated_std']:.1f} | {e['decorrelated_min']:.1f} | "
            f"{e['decorrelated_zero_shot_mean']:.1f} | {e['iid_mean']:.1f} +- {e['iid_std']:.1f} | "
            f"{e['iid_min']:.1f} | {e['iid_zero_shot_mean']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fedmpt", "promptfl"])
    parser.add_argument("--modes", nargs="+", default=["feature"], choices=["feature", "exact"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8, math.inf])
    parser.add_argument("--levers", nargs="+", default=["prompts"], choices=sorted(LEVERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--train-per-client", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-feature", type=float, default=0.6)
    parser.add_argument("--clip-exact", type=float, default=7.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--render", type=Path, help="only re-render the tables of a results JSON")
    parser.add_argument("--render-seeds", nargs="+", type=int, help="with --render: summarise only these seeds")
    args = parser.parse_args(argv)
    if args.render is not None and args.render_seeds:
        result = json.loads(args.render.read_text())
        runs = [r for r in result["runs"] if r["seed"] in args.render_seeds]
        print(_markdown({**result, "summary": _summary(runs, result["zero_shot"])}))
        return 0
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["summary"] = _summary(result["runs"], result["zero_shot"])
        args.render.write_text(json.dumps(result, indent=2) + "\n")
        args.render.with_suffix(".md").write_text(_markdown(result))
        print(_markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    backbone = load_backbone()
    rows: list[dict[str, Any]] = []
    zero: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        world = make_federated_world(
            FederatedWorldConfig(
                num_clients=args.clients, train_per_client=args.train_per_client, test_per_client=16,
                global_test_size=600, seed=seed,
            )
        )  # fmt: skip
        feats = world_features(backbone, world, cache_dir=REPO / "experiments" / "out" / "dp_utility_cache")
        tests = {"decorrelated": feats.test_decorrelated, "iid": feats.test_in_distribution}
        classnames = tuple(world.classnames)
        zero[str(seed)] = _zero_shot(backbone, classnames, tests)
        print(f"seed {seed}: zero-shot {zero[str(seed)]}", flush=True)
        for method in args.methods:
            for lever in args.levers:
                for mode in args.modes:
                    for epsilon in args.epsilons:
                        if not math.isfinite(epsilon) and mode != args.modes[0]:
                            continue  # the non-DP reference once per lever
                        row = run_one(args, (feats.clients_train, tests), backbone, classnames, method, mode,
                                      epsilon, lever, seed)  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    result = {"settings": vars(args) | {"epsilons": [None if not math.isfinite(e) else e for e in args.epsilons]},
              "zero_shot": zero, "runs": rows, "summary": _summary(rows, zero)}  # fmt: skip
    out = REPO / "experiments" / "results" / f"dp_utility{'_' + args.tag if args.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
