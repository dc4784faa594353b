"""Benchmark DP-SGD for FedMPT: step time and peak memory DP / non-DP in both modes, and utility at several epsilons.

Produces the tables of ``docs/privacy_dpsgd.md``::

    .venv/bin/python experiments/bench_dp_step.py            # full: timing + utility, eps {1,3,8} x 3 seeds
    .venv/bin/python experiments/bench_dp_step.py --quick    # reduced world and rounds (minutes on 2 cores)

Part 1 (timing): one local step of FedMPT (5 conditions x 12 classes of the synthetic world) at batch 32 on
client 0's features. Variants, interleaved round-robin in one process so that their ratios share the
machine's load: ``nondp`` (the library's step: mean asymmetric loss, backward, SGD; Sinkhorn with early
stopping), ``nondp-fixed`` (same, Sinkhorn with the fixed iterations that only a differentiable plan needs
under DP; for reference), ``dp-feature`` and ``dp-exact`` (per-sample gradients with the batch's detached plans
solved once outside ``vmap`` with early stopping, Opacus clipping and noise, SGD). Peak resident memory of each
variant is measured as the peak growth of the resident set over two steps, polled every millisecond, each variant in a
fresh process with glibc returning large blocks at once (tracemalloc cannot see torch's allocator); the exact
mode also with vjp chunks of 1 and 32.

Part 2 (audit): white-box canary audits of one step (:mod:`privacy.canary`), the real step in both modes and
the broken variants, ``--audit-trials`` releases per arm.

Part 3 (utility): FedAvg over the world's clients with ``dp_client_update`` (sigma calibrated for the whole
run, every client every round) and the non-DP loop, test mAP on the in-distribution global test set. Clip
norms are fixed per mode (``--clip-feature``, ``--clip-exact``). Part 0 (norms) reports each mode's per-sample
norm at initialisation, the reference for them: with the shipped tiny CLIP the defaults 0.6 and 7 are a fifth and
a seventh of the medians (they were the medians with an earlier checkpoint); ``--clip-feature 2.5 --clip-exact
30`` puts both near the median (``docs/privacy_dpsgd.md`` shows both).

Writes ``results.json`` and ``results.md`` under ``--out`` (default ``experiments/out/bench_dp_step``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmpt.backbone.loader import Backbone, BackboneUnavailableError, load_backbone
from fedmpt.federated import world_features
from fedmpt.methods import build_method
from fedmpt.methods.base import Method
from fedmpt.training import FeatureData, TrainConfig, batch_loss, client_update, evaluate, fedavg
from fedmpt.world import FederatedWorldConfig, make_federated_world
from fedmpt.world.dataset import condition_names
from privacy.canary import audit_dp_step, gradient_canary, one_run_canary_audit
from privacy.dpsgd import (
    DPConfig,
    DPMode,
    GaussianRelease,
    dp_client_update,
    make_generator,
    release_shapes,
    released_per_sample,
    to_parameter_space,
)
from privacy.per_sample import per_sample_gradients, prepare_for_dp

logger = logging.getLogger("bench_dp_step")

#: ``dp-*`` draw their noise from the OS CSPRNG (privacy.noise, what sites use); ``dp-feature-torchrng`` from a
#: seeded torch generator, to show the cost of the noise source side by side.
VARIANTS = ("nondp", "nondp-fixed", "dp-feature", "dp-feature-torchrng", "dp-exact")


@dataclass(frozen=True)
class Settings:
    quick: bool
    threads: int
    batch: int
    timing_repeats: int
    world: FederatedWorldConfig
    rounds: int
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    modes: tuple[str, ...]
    max_grad_norm: dict[str, float]
    delta: float
    lr: float
    chunk_size: int


def _backbone() -> tuple[Backbone, str]:
    try:
        return load_backbone(), "bundled fedmpt-tiny-clip"
    except BackboneUnavailableError as err:
        logger.warning("bundled tiny CLIP unavailable (%s); using RANDOM weights: utility numbers are meaningless", err)
        torch.manual_seed(0)
        return load_backbone(random_init=True), "fedmpt-tiny-clip, RANDOM weights (bundled file missing)"


def _features(settings: Settings, backbone: Backbone, cache: Path) -> tuple[tuple[FeatureData, ...], FeatureData]:
    world = make_federated_world(settings.world)
    feats = world_features(backbone, world, cache_dir=cache)
    return feats.clients_train, feats.test_in_distribution


def _method(backbone: Backbone, classnames: tuple[str, ...], dp: bool) -> Method:
    method = build_method("fedmpt", backbone, classnames, condition_names())
    return prepare_for_dp(method) if dp else method


class _Step:
    """One local step of a variant on a fixed batch, from a fixed starting state (so repeats do equal work)."""

    def __init__(
        self, variant: str, backbone: Backbone, classnames: tuple[str, ...], data: FeatureData, settings: Settings
    ):
        self.variant = variant
        self.method = _method(backbone, classnames, dp=variant != "nondp")
        self.state = self.method.trainable_state()
        self.data = data
        self.index = torch.arange(settings.batch)
        self.train = TrainConfig(lr=settings.lr)
        self.params = list(self.method.trainable_parameters().values())
        if variant.startswith("dp-"):
            self.mode = DPMode(variant.removeprefix("dp-").removesuffix("-torchrng"))
            self.release = GaussianRelease(
                release_shapes(self.method, self.mode),
                noise_multiplier=1.0,
                max_grad_norm=settings.max_grad_norm[self.mode.value],
                expected_batch_size=settings.batch,
                generator=make_generator(None) if variant.endswith("-torchrng") else None,
            )
        self.chunk = settings.chunk_size

    def __call__(self) -> float:
        self.method.load_trainable_state(self.state)
        self.method.train()
        optimizer = torch.optim.SGD(self.params, lr=self.train.lr, momentum=self.train.momentum)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if self.variant.startswith("nondp"):
            batch_loss(self.method, self.data, self.index, self.train).mean().backward()
        else:
            sub = self.data.subset(self.index.numpy())
            grads = per_sample_gradients(self.method, sub.global_features, sub.patch_features, sub.labels, self.train)
            noisy = to_parameter_space(self.release.release(released_per_sample(grads, self.mode, self.chunk)), grads)
            for name, p in self.method.trainable_parameters().items():
                p.grad = noisy[name].view_as(p)
        optimizer.step()
        return time.perf_counter() - start


def _timing(settings: Settings, backbone: Backbone, classnames: tuple[str, ...], data: FeatureData) -> dict[str, Any]:
    steps = {v: _Step(v, backbone, classnames, data, settings) for v in VARIANTS}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(settings.timing_repeats):
        for v, step in steps.items():
            times[v].append(step())
    median = {v: statistics.median(t) for v, t in times.items()}
    return {
        "median_seconds": median,
        "all_seconds": times,
        "ratio_vs_nondp": {v: median[v] / median["nondp"] for v in VARIANTS},
        "ratio_vs_nondp_fixed": {v: median[v] / median["nondp-fixed"] for v in VARIANTS},
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_growth(step: _Step, repeats: int = 2) -> float:
    """Peak resident-set growth (MiB) over ``repeats`` steps, polled every millisecond from a thread."""
    baseline = _rss_mib()
    peak = [baseline]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for _ in range(repeats):
        step()
    done.set()
    thread.join()
    return peak[0] - baseline


def _memory_child(variant: str, chunk: int, quick: bool, threads: int, out: Path) -> None:
    """Runs in a fresh process: builds one variant and prints its peak RSS growth over two steps as JSON."""
    torch.set_num_threads(threads)
    settings = replace(
        _settings(quick, threads, {"feature": 1.0, "exact": 1.0}, ("feature", "exact")), chunk_size=chunk
    )
    backbone, _ = _backbone()
    clients, _ = _features(settings, backbone, out / "feature_cache")
    step = _Step(variant, backbone, tuple(make_federated_world(settings.world).classnames), clients[0], settings)
    print(json.dumps({"variant": variant, "chunk": chunk, "mib": _peak_rss_growth(step)}))


def _memory(settings: Settings, out: Path) -> dict[str, float]:
    """Each variant in a fresh process with glibc returning large blocks at once (``MALLOC_MMAP_THRESHOLD_``),
    so that the resident set follows live memory and no pool from an earlier variant hides allocations."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results: dict[str, float] = {}
    jobs = [(v, settings.chunk_size) for v in VARIANTS] + [("dp-exact", 1), ("dp-exact", settings.batch)]
    for variant, chunk in jobs:
        command = [sys.executable, __file__, "--memory-child", variant, str(chunk), "--threads", str(settings.threads),
                   "--out", str(out), *(["--quick"] if settings.quick else [])]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        value = json.loads(done.stdout.strip().splitlines()[-1])["mib"]
        results[f"dp-exact (chunk {chunk})" if variant == "dp-exact" else variant] = value
    return results


def _utility_run(
    settings: Settings,
    backbone: Backbone,
    classnames: tuple[str, ...],
    clients: tuple[FeatureData, ...],
    test: FeatureData,
    mode: str | None,
    epsilon: float | None,
    seed: int,
) -> dict[str, Any]:
    method = _method(backbone, classnames, dp=mode is not None)
    state = method.trainable_state()
    train = TrainConfig(lr=settings.lr, batch_size=settings.batch, seed=seed)
    sigma = None
    start = time.perf_counter()
    for r in range(settings.rounds):
        updates = []
        for k, data in enumerate(clients):
            cfg = replace(train, seed=int(np.random.SeedSequence([seed, r, k]).generate_state(1)[0]))
            if mode is None:
                updates.append(client_update(method, state, data, cfg))
            else:
                dp = DPConfig(
                    target_epsilon=epsilon,
                    rounds=settings.rounds,
                    delta=settings.delta,
                    max_grad_norm=settings.max_grad_norm[mode],
                    mode=mode,
                    chunk_size=settings.chunk_size,
                )
                update, event = dp_client_update(method, state, data, cfg, dp)
                sigma = event.noise_multiplier
                updates.append(update)
        state = fedavg(updates)
    m_ap = evaluate(method, state, test).to_dict()["mAP"]
    return {"mode": mode or "nondp", "epsilon": epsilon, "seed": seed, "mAP": m_ap, "noise_multiplier": sigma,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _audits(backbone: Backbone, classnames: tuple[str, ...], data: FeatureData, trials: int) -> list[dict[str, Any]]:
    """White-box canary audits of one step (z=2, delta=1e-5): the real step in both modes and broken variants.

    Benign records: 8 rows of client 0 with every label unknown (zero gradient); the canary from
    :func:`privacy.canary.gradient_canary`; C = 1e-3 so that the canary clips in both spaces.
    """
    method = _method(backbone, classnames, dp=True)
    benign = data.subset(range(8))
    benign = FeatureData(benign.global_features, benign.patch_features, np.full_like(benign.labels, -1))
    canary = gradient_canary(benign, seed=5)
    rows = []
    for mode, variant in (
        ("feature", "correct"),
        ("exact", "correct"),
        ("feature", "no-clipping"),
        ("exact", "no-clipping"),
        ("exact", "per-class"),
    ):
        start = time.perf_counter()
        audit = audit_dp_step(
            method, benign, canary, TrainConfig(), mode=mode, variant=variant, noise_multiplier=2.0,
            max_grad_norm=1e-3, trials=trials,
        )  # fmt: skip
        rows.append({"mode": mode, "variant": variant, "epsilon_lb": audit.epsilon_lower_bound,
                     "claimed_epsilon": audit.claimed_epsilon, "mean_shift": audit.mean_shift,
                     "violation": audit.violation, "trials_per_arm": trials,
                     "seconds": time.perf_counter() - start})  # fmt: skip
        logger.info("audit %s", rows[-1])
    return rows


def _one_run(
    backbone: Backbone, classnames: tuple[str, ...], data: FeatureData, clips: dict[str, float]
) -> list[dict[str, Any]]:
    """One-run audits (Steinke et al. 2023) of one DP client update per mode: 100 canaries, 20 guesses."""
    rows = []
    for mode in ("feature", "exact"):
        method = _method(backbone, classnames, dp=True)
        dp = DPConfig(noise_multiplier=1.0, delta=1e-4, max_grad_norm=clips[mode],
                      mode=mode)  # fmt: skip
        start = time.perf_counter()
        result = one_run_canary_audit(
            method, method.trainable_state(), data, TrainConfig(lr=0.05), dp, canaries=100, guesses=20
        )
        rows.append({"mode": mode, "m": result.audit.m, "r": result.audit.r, "v": result.audit.v,
                     "epsilon_lb": result.audit.epsilon_lower_bound, "claimed_epsilon": result.claimed_epsilon,
                     "event": asdict(result.event), "seconds": time.perf_counter() - start})  # fmt: skip
        logger.info("one-run audit %s", rows[-1])
    return rows


def _norms(backbone: Backbone, classnames: tuple[str, ...], clients: tuple[FeatureData, ...], batch: int) -> dict:
    """Per-sample gradient norms at initialisation of the vector each mode clips (feature: non-prompt gradients
    and text-feature cotangents; exact: non-prompt and prompt gradients), on the first ``batch`` rows of every
    client: median and quartiles, the reference for choosing ``--clip-feature`` / ``--clip-exact``."""
    method = _method(backbone, classnames, dp=True)
    spaces: dict[str, list[float]] = {"feature": [], "exact": []}
    for data in clients:
        rows = slice(0, batch)
        grads = per_sample_gradients(
            method, data.global_features[rows], data.patch_features[rows], data.labels[rows], TrainConfig()
        )
        other = [g.flatten(1) for g in grads.other.values()]
        prompts = [g.flatten(1) for g in grads.prompt_gradients().values()]
        spaces["feature"] += torch.cat([*other, grads.text_cotangents.flatten(1)], 1).norm(dim=1).tolist()
        spaces["exact"] += torch.cat([*other, *prompts], 1).norm(dim=1).tolist()
    return {
        mode: dict(zip(("q25", "median", "q75"), np.percentile(values, [25, 50, 75]).tolist(), strict=True))
        for mode, values in spaces.items()
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for row in rows:
        key = f"{row['mode']}@{row['epsilon']}"
        groups.setdefault(key, []).append(row["mAP"])
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in groups.items()}


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"Backbone: {result['backbone']}; torch threads: {result['settings']['threads']}; {result['machine']}"]
    for mode, n in result.get("per_sample_norms", {}).items():
        lines.append(
            f"Per-sample norm at initialisation, {mode} space: median {n['median']:.3g} "
            f"(quartiles {n['q25']:.3g}-{n['q75']:.3g})"
        )
    t: dict[str, Any] = result.get("timing") or {}
    memory = result.get("memory", {})
    if t or memory:
        lines += [
            "",
            "| variant | median step (s) | / nondp | / nondp-fixed | peak RSS growth (MiB) |",
            "|---|---|---|---|---|",
        ]
    for v in VARIANTS if (t or memory) else ():
        mem = memory.get(v)
        timing = (
            f"{t['median_seconds'][v]:.3f} | {t['ratio_vs_nondp'][v]:.2f} | {t['ratio_vs_nondp_fixed'][v]:.2f}"
            if t
            else " | | "
        )
        lines.append(f"| {v} | {timing} | {'' if mem is None else f'{mem:.0f}'} |")
    for key, mem in memory.items():
        if key.startswith("dp-exact (chunk"):
            lines.append(f"| {key} | | | | {mem:.0f} |")
    if "audit" in result:
        lines += [
            "",
            "| mode | implementation | epsilon_lb (95%) | claimed epsilon | mean shift mu (<= 1/z = 0.5) | caught |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["audit"]:
            lines.append(
                f"| {row['mode']} | {row['variant']} | {row['epsilon_lb']:.2f} | {row['claimed_epsilon']:.2f} "
                f"| {row['mean_shift']:.2f} | {'yes' if row['violation'] else 'no'} |"
            )
    if "one_run_audit" in result:
        lines += ["", "| one-run audit, mode | m | guesses r | correct v | epsilon_lb (95%) | claimed epsilon |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in result["one_run_audit"]:
            lines.append(
                f"| {row['mode']} | {row['m']} | {row['r']} | {row['v']} | {row['epsilon_lb']:.2f} "
                f"| {row['claimed_epsilon']:.2f} |"
            )
    if "utility" in result:
        lines += ["", "| mode | epsilon | mAP (mean +- std over seeds) | seeds |", "|---|---|---|---|"]
        for key, s in sorted(result["utility"]["summary"].items()):
            mode, eps = key.split("@")
            lines.append(f"| {mode} | {eps} | {100 * s['mean']:.1f} +- {100 * s['std']:.1f} | {s['n']} |")
    return "\n".join(lines) + "\n"


def _settings(quick: bool, threads: int, clips: dict[str, float], modes: tuple[str, ...]) -> Settings:
    world = (
        FederatedWorldConfig(num_clients=3, train_per_client=160, test_per_client=16, global_test_size=300)
        if quick
        else FederatedWorldConfig(num_clients=5, train_per_client=400, test_per_client=16, global_test_size=1000)
    )
    return Settings(
        quick=quick,
        threads=threads,
        batch=32,
        timing_repeats=3 if quick else 7,
        world=world,
        rounds=3 if quick else 10,
        epsilons=(1.0, 3.0, 8.0),
        seeds=(0, 1, 2),
        modes=modes,
        max_grad_norm=clips,
        delta=1e-4 if quick else 1e-5,
        lr=0.05,
        chunk_size=8,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced world, rounds and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_dp_step"))
    parser.add_argument("--skip-utility", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 3 quick, 7)")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--audit-trials", type=int, default=2000, help="canary-audit trials per arm (0: skip)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-norms", action="store_true", help="skip the per-sample norms at initialisation")
    parser.add_argument("--clip-feature", type=float, default=0.6, help="C of the feature-space mode")
    parser.add_argument("--clip-exact", type=float, default=7.0, help="C of the exact mode")
    parser.add_argument("--modes", nargs="+", default=["feature", "exact"], choices=["feature", "exact"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    clips = {"feature": args.clip_feature, "exact": args.clip_exact}
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]), args.quick, args.threads, args.out)
        return 0
    settings = _settings(args.quick, args.threads, clips, tuple(args.modes))
    if args.repeats is not None:
        settings = replace(settings, timing_repeats=args.repeats)
    world = settings.world
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "feature_cache"
    backbone, backbone_name = _backbone()
    classnames = tuple(make_federated_world(world).classnames)
    clients, test = _features(settings, backbone, cache)
    result: dict[str, Any] = {
        "backbone": backbone_name,
        "settings": {**asdict(settings), "world": asdict(world)},
        "machine": f"{platform.machine()}, torch {torch.__version__}, python {sys.version.split()[0]}",
        "command": " ".join(["experiments/bench_dp_step.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    if not args.skip_timing:
        result["timing"] = _timing(settings, backbone, classnames, clients[0])
        logger.info("timing: %s", result["timing"]["median_seconds"])
    if not args.skip_norms:
        result["per_sample_norms"] = _norms(backbone, classnames, clients, settings.batch)
        logger.info("per-sample norms at initialisation: %s", result["per_sample_norms"])
    if args.audit_trials:
        result["audit"] = _audits(backbone, classnames, clients[0], args.audit_trials)
        result["one_run_audit"] = _one_run(backbone, classnames, clients[0], clips)
    if not args.skip_memory:
        result["memory"] = _memory(settings, args.out)
        logger.info("memory (MiB): %s", result["memory"])
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    if not args.skip_utility:
        rows = []
        for seed in settings.seeds:
            rows.append(_utility_run(settings, backbone, classnames, clients, test, None, None, seed))
            logger.info("utility %s", rows[-1])
            for mode in settings.modes:
                for eps in settings.epsilons:
                    rows.append(_utility_run(settings, backbone, classnames, clients, test, mode, eps, seed))
                    logger.info("utility %s", rows[-1])
                    result["utility"] = {"rows": rows, "summary": _summary(rows)}
                    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "results.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
