"""Benchmark of secure aggregation: per-round client/server time and bytes per client, none vs masking vs
CKKS.

Every mode runs in the same process, on the same inputs, in one invocation, so the printed ratios are measured
side by side. Results go to ``experiments/out/bench_secagg/results.json`` and ``results.md``.

Usage::

    .venv/bin/python experiments/bench_secagg.py              # full grid: n in {5,10,20,50}, d in
    {1e4,1e5,1e6} .venv/bin/python experiments/bench_secagg.py --quick      # n in {5,10}, d in {1e4,1e5}

What is timed (wall clock, ``time.perf_counter``):

* none: client = float32 serialization of (weight, update); server = parse + weighted mean.
* masking (SecAgg, complete graph, t = floor(n/2)+1) and SecAgg+ (k = 2*ceil(log2 n)/2*2 neighbours, for
  n >= 20): client = the four client stages (mean over clients); server = the four server stages.
* ckks (N=8192, chain (60,60), symmetric, float encoding): client = encrypt + decrypt of the aggregate;
  server = aggregate. To spare the shared CPU, at most 3 clients really encrypt; the other uploads are copies
  of those bytes with the sender field rewritten, which costs the server exactly the same.

Bytes per client count what the aggregation protocol itself moves: uploads (client -> server) and downloads
(server -> client, e.g. the encrypted aggregate for CKKS). The model broadcast common to all modes is
excluded.

TODO(flower-secagg+): add Flower's built-in SecAgg+ (flwr 1.41 ``SecAggPlusWorkflow``, legacy stack only) as a
fourth mode once the Flower app exists; it must run in the same invocation so the ratios stay comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg import ckks, masking  # noqa: E402
from secagg.config import CkksConfig, MaskingConfig  # noqa: E402
from secagg.keys import Identity, Roster  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out" / "bench_secagg"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_none(updates: dict[int, np.ndarray]) -> dict[str, float]:
    """Plaintext FedAvg: float32 upload, weighted mean on the server."""
    client_t, msgs = 0.0, {}
    for u, x in updates.items():
        msg, t = _timed(lambda x=x: struct.pack("<Q", 1) + x.astype(np.float32).tobytes())
        msgs[u], client_t = msg, client_t + t

    def server() -> np.ndarray:
        total, weight = None, 0
        for m in msgs.values():
            (w,) = struct.unpack_from("<Q", m)
            v = np.frombuffer(m, dtype=np.float32, offset=8).astype(np.float64) * w
            total = v if total is None else total + v
            weight += w
        assert total is not None
        return total / weight

    _, server_t = _timed(server)
    up = float(np.mean([len(m) for m in msgs.values()]))
    return {"client_s": client_t / len(updates), "server_s": server_t, "up_bytes": up, "down_bytes": 0.0}


def bench_masking(
    updates: dict[int, np.ndarray],
    cfg: MaskingConfig,
    ids: dict[int, Identity],
    roster: Roster,
    exact: np.ndarray,
) -> dict[str, float]:
    """One full masking round (no drop-outs); client time is the mean over clients of their four stages."""
    nodes = sorted(updates)
    d = next(iter(updates.values())).size
    clients = {u: masking.ClientState.create(cfg, ids[u], roster) for u in nodes}
    client_t = dict.fromkeys(nodes, 0.0)
    up = dict.fromkeys(nodes, 0)
    down = dict.fromkeys(nodes, 0)
    server_t = 0.0

    def client_stage(fn: Callable[..., bytes], requests: dict[int, bytes], *extra: Any) -> dict[int, bytes]:
        replies = {}
        for u in sorted(requests):
            down[u] += len(requests[u])
            reply, t = _timed(lambda u=u: fn(clients[u], requests[u], *[e[u] for e in extra]))
            client_t[u] += t
            up[u] += len(reply)
            replies[u] = reply
        return replies

    (state, req), t = _timed(lambda: masking.server_start_round(cfg, nodes, d, 1, roster=roster))
    server_t += t
    rep = client_stage(masking.advertise_keys, req)
    req, t = _timed(lambda: masking.server_collect_advertisements(state, rep))
    server_t += t
    rep = client_stage(masking.share_keys, req)
    req, t = _timed(lambda: masking.server_collect_shares(state, rep))
    server_t += t
    rep = client_stage(masking.masked_input, req, updates, dict.fromkeys(nodes, 1))
    req, t = _timed(lambda: masking.server_collect_masked_inputs(state, rep))
    server_t += t
    rep = client_stage(masking.unmask, req)
    res, t = _timed(lambda: masking.server_unmask(state, rep))
    server_t += t
    err = float(np.max(np.abs(res.mean - exact)))
    if err >= res.error_bound:
        raise RuntimeError(f"masking error {err} above its bound {res.error_bound}")
    return {
        "client_s": float(np.mean(list(client_t.values()))),
        "server_s": server_t,
        "up_bytes": float(np.mean(list(up.values()))),
        "down_bytes": float(np.mean(list(down.values()))),
        "max_abs_error": err,
        "error_bound": res.error_bound,
    }


def _rewrite_sender(msg: bytes, sender: int) -> bytes:
    # Sender field of the CKKS header: offset 4+1+1+2+16+8 = 32, u64.
    return msg[:32] + struct.pack("<Q", sender) + msg[40:]


def bench_ckks(
    updates: dict[int, np.ndarray],
    cfg: CkksConfig,
    secret: Any,
    server_ctx: Any,
    key_id: bytes,
    exact: np.ndarray,
    real_clients: int = 3,
) -> dict[str, float]:
    """One CKKS round; at most ``real_clients`` encrypt for real (see the module docstring)."""
    nodes = sorted(updates)
    run = os.urandom(16)
    msgs, enc_t = {}, []
    for u in nodes[:real_clients]:
        m, t = _timed(
            lambda u=u: ckks.encrypt_update(
                secret, cfg, updates[u], 1, run_id=run, round_number=1, sender=u, key_id=key_id
            )
        )
        msgs[u] = m
        enc_t.append(t)
    for i, u in enumerate(nodes[real_clients:]):
        msgs[u] = _rewrite_sender(msgs[nodes[i % real_clients]], u)
    agg, server_t = _timed(
        lambda: ckks.aggregate(server_ctx, cfg, msgs, run_id=run, round_number=1, key_id=key_id)
    )
    res, dec_t = _timed(
        lambda: ckks.decrypt_aggregate(secret, cfg, agg, run_id=run, round_number=1, key_id=key_id)
    )
    # Node j >= real_clients re-sent the bytes of node j % real_clients.
    used = [updates[nodes[j % real_clients]] for j in range(len(nodes))]
    exact_used = np.mean([np.clip(x, -cfg.clip_range, cfg.clip_range) for x in used], axis=0)
    err = float(np.max(np.abs(res.mean - exact_used)))
    return {
        "client_s": float(np.mean(enc_t)) + dec_t,
        "encrypt_s": float(np.mean(enc_t)),
        "decrypt_s": dec_t,
        "server_s": server_t,
        "up_bytes": float(np.mean([len(m) for m in msgs.values()])),
        "down_bytes": float(len(agg)),
        "max_abs_error": err,
        "error_bound": res.error_bound,
    }


CKKS_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("float, (60,60), 2^40", {}),
    ("float, (60,40,60), 2^40", {"coeff_mod_bit_sizes": (60, 40, 60)}),
    ("float, (60,40,40,60), 2^40", {"coeff_mod_bit_sizes": (60, 40, 40, 60)}),
    (
        "packed k=2 x 23 bit, (60,40,60)",
        {"coeff_mod_bit_sizes": (60, 40, 60), "pack": 2, "lane_bits": 23, "packed_scale_bits": 25},
    ),
    ("packed k=2 x 18 bit, (60,60)", {"pack": 2, "lane_bits": 18}),
    (
        "packed k=3 x 15 bit, (60,40,60)",
        {"coeff_mod_bit_sizes": (60, 40, 60), "pack": 3, "lane_bits": 15, "packed_scale_bits": 25},
    ),
]


def bench_ckks_options(n: int, d: int, rng: np.random.Generator, clip: float, noise_std: float) -> list[dict]:
    """Bytes/param and error of each CKKS encoding option on the same updates (n clients, d parameters)."""
    ups = {u: rng.normal(0, 0.02, d) for u in range(n)}
    rows = []
    for name, over in CKKS_OPTIONS:
        cfg = CkksConfig(clip_range=clip, **over)
        secret = ckks.create_secret_context(cfg)
        server_ctx = ckks.load_server_context(ckks.server_context_bytes(secret), cfg)
        key_id = ckks.new_key_id()
        exact = np.mean([np.clip(x, -clip, clip) for x in ups.values()], axis=0)
        r = bench_ckks(ups, cfg, secret, server_ctx, key_id, exact, real_clients=n)
        rows.append(
            {
                "option": name,
                "bytes_per_param": r["up_bytes"] / d,
                "encrypt_s": r["encrypt_s"],
                "max_abs_error": r["max_abs_error"],
                "error_over_dp_noise_std": r["max_abs_error"] / noise_std,
                "relative_error": r["max_abs_error"] / float(np.max(np.abs(exact))),
            }
        )
    return rows


def _secaggplus_k(n: int) -> int | None:
    k = max(4, 2 * math.ceil(math.log2(n)))
    k += k % 2
    return k if k < n - 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="n in {5,10}, d in {1e4,1e5}")
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    clients, sizes = ([5, 10], [10**4, 10**5]) if args.quick else (args.clients, args.sizes)
    rng = np.random.default_rng(args.seed)
    ids = {u: Identity.generate(u) for u in range(1, max(clients) + 1)}
    roster = Roster.from_identities(ids)
    ckks_cfg = CkksConfig(clip_range=1.0, max_clients=max(64, max(clients)))
    secret = ckks.create_secret_context(ckks_cfg)
    server_ctx = ckks.load_server_context(ckks.server_context_bytes(secret), ckks_cfg)
    key_id = ckks.new_key_id()
    rows: list[dict[str, Any]] = []
    for d in sizes:
        for n in clients:
            updates = {u: rng.normal(0, 0.02, d) for u in range(1, n + 1)}
            exact = np.mean(list(updates.values()), axis=0)
            row: dict[str, Any] = {"n": n, "d": d, "none": bench_none(updates)}
            t = n // 2 + 1
            row["masking"] = bench_masking(
                updates, MaskingConfig(threshold=t, scale=2.0**16), ids, roster, exact
            )
            k = _secaggplus_k(n)
            if k is not None:
                cfg = MaskingConfig(threshold=k // 2 + 1, neighbourhood_size=k, scale=2.0**16)
                row["secagg+"] = bench_masking(updates, cfg, ids, roster, exact)
                row["secagg+"]["k"] = k
            row["ckks"] = bench_ckks(updates, ckks_cfg, secret, server_ctx, key_id, exact)
            base = row["none"]["client_s"] + row["none"]["server_s"]
            for mode in ("masking", "secagg+", "ckks"):
                if mode in row:
                    m = row[mode]
                    m["round_ratio_vs_none"] = (m["client_s"] + m["server_s"]) / base
                    m["up_ratio_vs_none"] = m["up_bytes"] / row["none"]["up_bytes"]
            rows.append(row)
            print(_row_line(row), flush=True)
    options = bench_ckks_options(10, 10**5, rng, clip=0.1, noise_std=0.1)
    meta = {
        "command": "python experiments/bench_secagg.py" + (" --quick" if args.quick else ""),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "note": "wall-clock on a shared machine; ratios are from the same run",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ckks_options": options}, indent=2) + "\n"
    )
    md = _markdown(rows, options, meta)
    (args.out / "results.md").write_text(md)
    print(md)
    return 0


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"n={row['n']:>3} d={row['d']:>8}"]
    for mode in ("none", "masking", "secagg+", "ckks"):
        if mode in row:
            m = row[mode]
            parts.append(
                f"{mode}: c={m['client_s']:.3f}s s={m['server_s']:.3f}s up={m['up_bytes'] / 1e6:.2f}MB"
            )
    return " | ".join(parts)


def _markdown(rows: list[dict[str, Any]], options: list[dict], meta: dict[str, Any]) -> str:
    out = [
        f"Command: `{meta['command']}` ({meta['cpu_count']} CPUs, load average at end "
        f"{meta['load_avg_at_end']})",
        "",
        "| n | d | mode | client s | server s | up MB/client | down MB/client | round / none | up / none |"
        " max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for mode in ("none", "masking", "secagg+", "ckks"):
            if mode not in row:
                continue
            m = row[mode]
            label = f"secagg+ (k={m['k']})" if mode == "secagg+" else mode
            out.append(
                f"| {row['n']} | {row['d']:.0e} | {label} | {m['client_s']:.4f} | {m['server_s']:.4f} | "
                f"{m['up_bytes'] / 1e6:.3f} | {m['down_bytes'] / 1e6:.3f} | "
                f"{m.get('round_ratio_vs_none', 1.0):.1f} | {m.get('up_ratio_vs_none', 1.0):.2f} | "
                f"{m.get('max_abs_error', 0.0):.2e} |"
            )
    out += [
        "",
        "CKKS encoding options (n=10 clients, d=1e5, updates N(0, 0.02), clip 0.1; DP noise std 0.1):",
        "",
        "| option | bytes/param | encrypt s | max abs err | err / DP noise std | relative err |",
        "|---|---|---|---|---|---|",
    ]
    for o in options:
        out.append(
            f"| {o['option']} | {o['bytes_per_param']:.1f} | {o['encrypt_s']:.3f} | "
            f"{o['max_abs_error']:.2e} |"
            f" {o['error_over_dp_noise_std']:.1e} | {o['relative_error']:.1e} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
