"""Protocol-only cost of masking on the SecAgg+ graph as the federation grows, and of verified CKKS decryption.

Masking (``--masking``): for n in ``--sizes`` (default 10, 50, 100, 200, 500) one full round of
:mod:`secagg.masking` with every check an active-server deployment runs (signed advertisements over the round
setup, the nested-set rules, the signed consistency check), on the SecAgg+ graph of degree
k = 2 * ceil(log2 n) (the complete graph where k >= n - 1) and the kit's default threshold
t = floor(2(k+1)/3) + 1 (:func:`secagg.security.default_threshold`), d = ``--dim``, no drop-outs. Reported per
round: the mean client time over its five stages, the server time over its five stages, and both divided by
n log2 n (Bell et al.'s server cost is O(n log^2 n + n d log n); the client's O(log^2 n + d log n)).

CKKS (``--ckks``): for n in ``--ckks-clients`` (default 10, 50) signed uploads of d = ``--ckks-dim`` (default
1e5) values: the bytes one decrypting client downloads per round (every signed upload, which it re-sums itself)
and the time of :func:`secagg.ckks.decrypt_verified` (signature checks, homomorphic sum, decryption; median of
``--repeats``); and the upload size per parameter (target <= 33 B). Three clients encrypt for real; the other
uploads are those bytes re-labelled and signed by their own sender, which costs the verifier exactly the same.

Usage::

    .venv/bin/python experiments/bench_secagg_scaling.py                 # both parts, writes results + plot
    .venv/bin/python experiments/bench_secagg_scaling.py --plot-only experiments/results/bench_secagg_scaling.json

Results: ``experiments/results/bench_secagg_scaling.json``; plot ``docs/img/secagg_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg import ckks, masking, security  # noqa: E402
from secagg.config import CkksConfig, MaskingConfig  # noqa: E402
from secagg.keys import Identity, Roster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "bench_secagg_scaling.json"
PLOT = ROOT / "docs" / "img" / "secagg_scaling.png"


def _degree(n: int) -> int | None:
    k = 2 * math.ceil(math.log2(n))
    return k if k < n - 1 else None


def masking_round(n: int, d: int, seed: int = 0) -> dict[str, Any]:
    """One round with n clients; returns per-stage client and server seconds."""
    k = _degree(n)
    t = security.default_threshold(n, k)
    cfg = MaskingConfig(threshold=t, neighbourhood_size=k, scale=2.0**16)
    ids = {u: Identity.generate(u) for u in range(n)}
    roster = Roster.from_identities(ids)
    pinned = {"run_id": os.urandom(16), "graph_seed": os.urandom(32), "model_digest": os.urandom(32)}
    rng = np.random.default_rng(seed)
    updates = {u: rng.uniform(-0.5, 0.5, d) for u in range(n)}
    clients = {u: masking.ClientState.create(cfg, ids[u], roster, **pinned) for u in range(n)}
    client_s = dict.fromkeys(range(n), 0.0)
    server_s = 0.0

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    (state, req), dt = timed(lambda: masking.server_start_round(cfg, list(range(n)), d, 1, roster=roster, **pinned))
    server_s += dt
    stages: list[tuple[Callable[..., bytes], Callable[..., Any]]] = [
        (masking.advertise_keys, masking.server_collect_advertisements),
        (masking.share_keys, masking.server_collect_shares),
        (lambda c, r: masking.masked_input(c, r, updates[c.node_id]), masking.server_collect_masked_inputs),
        (masking.consistency_check, masking.server_collect_consistency),
        (masking.unmask, masking.server_unmask),
    ]
    result: Any = None
    for client_fn, server_fn in stages:
        replies = {}
        for u in sorted(req):
            replies[u], dt = timed(lambda u=u: client_fn(clients[u], req[u]))
            client_s[u] += dt
        result, dt = timed(lambda replies=replies: server_fn(state, replies))
        server_s += dt
        req = result
    exact = np.mean([np.clip(updates[u], -1, 1) for u in range(n)], axis=0)
    err = float(np.max(np.abs(result.mean - exact)))
    if err >= result.error_bound:
        raise RuntimeError(f"n={n}: masking error {err} above its bound {result.error_bound}")
    nlogn = n * math.log2(n)
    return {
        "n": n,
        "d": d,
        "k": k if k is not None else "complete",
        "t": t,
        "client_s": float(np.mean(list(client_s.values()))),
        "server_s": server_s,
        "client_s_per_log2n": float(np.mean(list(client_s.values()))) / math.log2(n),
        "server_s_per_nlog2n": server_s / nlogn,
        "max_abs_error": err,
        "error_bound": result.error_bound,
    }


def _rewrite_sender(upload: bytes, sender: int) -> bytes:
    # Sender field of the CKKS header: offset 4+1+1+2+16+8 = 32, u64.
    return upload[:32] + struct.pack("<Q", sender) + upload[40:]


def ckks_round(n: int, d: int, repeats: int) -> dict[str, Any]:
    """Signed uploads of n clients; the verifying client's download and decrypt_verified time."""
    cfg = CkksConfig(max_clients=max(64, n))
    secret = ckks.create_secret_context(cfg)
    key_id = ckks.new_key_id()
    run = os.urandom(16)
    rng = np.random.default_rng(1)
    real = [
        ckks.encrypt_update(
            secret, cfg, rng.uniform(-0.5, 0.5, d), 1, run_id=run, round_number=1, sender=u, key_id=key_id
        )
        for u in range(min(3, n))
    ]
    ids = {u: Identity.generate(u) for u in range(n)}
    signed = {u: ckks.sign_upload(ids[u], _rewrite_sender(real[u % len(real)], u)) for u in range(n)}
    roster = Roster.from_identities(ids)
    t = min(n, security.default_threshold(n))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        res = ckks.decrypt_verified(secret, cfg, signed, roster, run_id=run, round_number=1, key_id=key_id, threshold=t)
        times.append(time.perf_counter() - start)
    if res.n_clients != n:
        raise RuntimeError(f"verified sum counted {res.n_clients} clients, expected {n}")
    upload = len(next(iter(signed.values())))
    return {
        "n": n,
        "d": d,
        "threshold": t,
        "upload_bytes": upload,
        "upload_bytes_per_param": upload / d,
        "download_bytes_per_client": sum(len(v) for v in signed.values()),
        "decrypt_verified_s_median": statistics.median(times),
        "decrypt_verified_s_all": times,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["masking"]
    ns = np.array([r["n"] for r in rows], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label, ref in (
        (axes[0], "server_s", "server, 5 stages", ns * np.log2(ns)),
        (axes[1], "client_s", "client (mean), 5 stages", np.log2(ns)),
    ):
        y = np.array([r[key] for r in rows])
        ax.loglog(ns, y, "o-", label=label)
        ax.loglog(ns, ref * y[0] / ref[0], "k--", label="n log n" if key == "server_s" else "log n", alpha=0.6)
        ax.set_xlabel("clients n (SecAgg+ graph, k = 2 ceil(log2 n))")
        ax.set_ylabel("seconds per round")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Masking, protocol only, d = {rows[0]['d']:,} (experiments/bench_secagg_scaling.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200, 500])
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--ckks-clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--ckks-dim", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-masking", action="store_true")
    p.add_argument("--skip-ckks", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--plot-only", type=Path)
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), PLOT)
        return 0
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join(["experiments/bench_secagg_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    if not args.skip_masking:
        results["masking"] = []
        for n in args.sizes:
            row = masking_round(n, args.dim)
            results["masking"].append(row)
            print(json.dumps(row), flush=True)
    if not args.skip_ckks:
        results["ckks"] = []
        for n in args.ckks_clients:
            row = ckks_round(n, args.ckks_dim, args.repeats)
            results["ckks"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "decrypt_verified_s_all"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if "masking" in results:
        plot(results, PLOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
