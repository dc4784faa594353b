"""Benchmark of secure aggregation: per-round client/server time and bytes per client for none, masking,
CKKS and Flower 1.41's built-in SecAgg+ (legacy stack), on the same vectors in one invocation.

Every mode runs in the same process, on the same inputs, so the ratios are measured side by side. Results go to
``experiments/out/bench_secagg/results.json`` and ``results.md``; the plot ``docs/img/secagg_costs.png`` is drawn
from the JSON (``--plot-only`` redraws it from an existing JSON without re-running).

Usage::

    .venv/bin/python experiments/bench_secagg.py            # full grid: n in {5,10,20,50}, d in {1e4,1e5,1e6}
    .venv/bin/python experiments/bench_secagg.py --quick    # n in {5,10}, d in {1e4,1e5}
    .venv/bin/python experiments/bench_secagg.py --plot-only experiments/out/bench_secagg/results.json

What is timed (wall clock, ``time.perf_counter``; "client" is the mean over clients, "server" per round):

* none: client = float32 serialization of (weight, update); server = parse + weighted mean ("bare
  aggregation"). Its Flower-serialized variant (the update in an ``ArrayRecord`` copied through Flower's
  protobuf message serialization) gives the ``*_serde_s`` of the plaintext round.
* masking (ours, complete graph, t = floor(n/2)+1, the same t as Flower's run; the kit's active-server default
  t = floor(2n/3)+1 costs the same per stage up to Shamir's degree) and secagg+ (ours, k = max(4, 2*ceil(log2 n))
  neighbours, only where k < n-1, i.e. n >= 10; t = k/2+1): client = the five client stages (with the
  consistency check); server = the five server stages.
* ckks (N=8192, chain (60,60), symmetric, float encoding): client = encrypt + verified decryption (check every
  signed upload against the roster, re-sum them, decrypt the sum); server = aggregate. Down bytes = every
  signed upload of the round (what a verifying client must receive). To spare the shared CPU, at most 3 clients
  really encrypt; the other uploads are copies of those bytes with the sender field rewritten (and signed by
  their own sender), which costs the server and the verifying client exactly the same.
* flower-secagg (num_shares = n: complete graph, Flower's SecAgg) and flower-secagg+ (num_shares = k+1, same k
  and t as ours): Flower's unmodified ``SecAggPlusWorkflow`` and ``secaggplus_mod`` driven in-process by
  ``experiments/bench_secagg_flower.py`` (see its docstring for exactly what is and is not measured).
* ``*_serde_s``: every mode's messages copied through Flower's protobuf message serialization (ours and CKKS
  as bytes in a ``ConfigRecord``), split into the sender's serialization and the receiver's parsing.

Bytes per client count what the aggregation protocol itself moves: uploads (client -> server) and downloads
(server -> client, e.g. the encrypted aggregate for CKKS); for Flower, the protobuf size of its records. The
model broadcast common to all modes is excluded.

Round ratios against the plaintext round, three definitions (reported side by side, none replaces another):
``bare`` = (client + server compute) / (plaintext client + server compute); ``serialized`` = the same with
every mode's Flower message serialization added on both sides; ``link`` = ``serialized`` plus the per-client
transfer time of its up + down bytes over a modelled link of ``--link-mbps`` (default 100 Mbit/s; a model, not a
measurement). None includes local training.
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
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_secagg_flower as flower_peer  # noqa: E402

from secagg import ckks, masking  # noqa: E402
from secagg.config import CkksConfig, MaskingConfig  # noqa: E402
from secagg.keys import Identity, Roster  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out" / "bench_secagg"
PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "img" / "secagg_costs.png"
MODES = ("none", "masking", "secagg+", "ckks", "flower-secagg", "flower-secagg+")
_STYLES = (("o", "-"), ("s", "-"), ("^", "--"), ("D", "-"), ("v", "-"), ("<", "--"))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _plain_upload(x: np.ndarray) -> bytes:
    return struct.pack("<Q", 1) + x.astype(np.float32).tobytes()


def bench_none(updates: dict[int, np.ndarray]) -> dict[str, float]:
    """Plaintext FedAvg: float32 upload, weighted mean on the server."""
    client_t, msgs = 0.0, {}
    for u, x in updates.items():
        msg, t = _timed(partial(_plain_upload, x))
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


def bench_none_with_serde(updates: dict[int, np.ndarray]) -> dict[str, float]:
    """Bare plaintext round (:func:`bench_none`) plus the Flower serialization of the float32 update."""
    out = bench_none(updates)
    serde = flower_peer.bench_none_flower(updates)
    out.update({key: v for key, v in serde.items() if key.endswith("serde_s")})
    return out


def bench_masking(
    updates: dict[int, np.ndarray],
    cfg: MaskingConfig,
    ids: dict[int, Identity],
    roster: Roster,
    exact: np.ndarray,
) -> dict[str, float]:
    """One full masking round (no drop-outs); client time is the mean over clients of their five stages."""
    nodes = sorted(updates)
    d = next(iter(updates.values())).size
    run_id, graph_seed, model = os.urandom(16), os.urandom(32), os.urandom(32)
    pinned = {"run_id": run_id, "graph_seed": graph_seed, "model_digest": model}
    clients = {u: masking.ClientState.create(cfg, ids[u], roster, **pinned) for u in nodes}
    client_t = dict.fromkeys(nodes, 0.0)
    up = dict.fromkeys(nodes, 0)
    down = dict.fromkeys(nodes, 0)
    server_t = 0.0
    sent: dict[int, list[bytes]] = {u: [] for u in nodes}
    received: dict[int, list[bytes]] = {u: [] for u in nodes}

    def client_stage(fn: Callable[..., bytes], requests: dict[int, bytes], *extra: Any) -> dict[int, bytes]:
        replies = {}
        for u in sorted(requests):
            down[u] += len(requests[u])
            received[u].append(requests[u])
            reply, t = _timed(partial(fn, clients[u], requests[u], *[e[u] for e in extra]))
            client_t[u] += t
            up[u] += len(reply)
            sent[u].append(reply)
            replies[u] = reply
        return replies

    (state, req), t = _timed(lambda: masking.server_start_round(cfg, nodes, d, 1, roster=roster, **pinned))
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
    rep = client_stage(masking.consistency_check, req)
    req, t = _timed(lambda: masking.server_collect_consistency(state, rep))
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
        **flower_peer.transport_costs(received, sent),
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
    with_transport: bool = False,
) -> dict[str, float]:
    """One CKKS round; at most ``real_clients`` encrypt for real (see the module docstring).

    ``with_transport`` adds the Flower serialization cost of every upload and of the aggregate sent to each
    client.
    """
    nodes = sorted(updates)
    run = os.urandom(16)
    msgs, enc_t = {}, []
    for u in nodes[:real_clients]:
        encrypt = partial(ckks.encrypt_update, secret, cfg, updates[u], 1, run_id=run, round_number=1, sender=u)
        m, t = _timed(partial(encrypt, key_id=key_id))
        msgs[u] = m
        enc_t.append(t)
    for i, u in enumerate(nodes[real_clients:]):
        msgs[u] = _rewrite_sender(msgs[nodes[i % real_clients]], u)
    agg, server_t = _timed(lambda: ckks.aggregate(server_ctx, cfg, msgs, run_id=run, round_number=1, key_id=key_id))
    # Every upload signed by its sender; the decrypting client verifies them and re-sums them itself.
    ids = {u: Identity.generate(u) for u in nodes}
    signed = {u: ckks.sign_upload(ids[u], msgs[u]) for u in nodes}
    roster = Roster.from_identities(ids)
    verify = partial(ckks.decrypt_verified, secret, cfg, signed, roster, run_id=run, round_number=1, key_id=key_id)
    res, dec_t = _timed(partial(verify, threshold=min(len(nodes), max(2, 2 * len(nodes) // 3 + 1))))
    # Node j >= real_clients re-sent the bytes of node j % real_clients.
    used = [updates[nodes[j % real_clients]] for j in range(len(nodes))]
    exact_used = np.mean([np.clip(x, -cfg.clip_range, cfg.clip_range) for x in used], axis=0)
    err = float(np.max(np.abs(res.mean - exact_used)))
    out = {
        "client_s": float(np.mean(enc_t)) + dec_t,
        "encrypt_s": float(np.mean(enc_t)),
        "decrypt_s": dec_t,
        "server_s": server_t,
        "up_bytes": float(np.mean([len(m) for m in msgs.values()])),
        "down_bytes": float(sum(len(m) for m in signed.values())),  # every signed upload, to re-sum
        "max_abs_error": err,
        "error_bound": res.error_bound,
    }
    if with_transport:
        out.update(flower_peer.transport_costs({u: [agg] for u in nodes}, {u: [msgs[u]] for u in nodes}))
    return out


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


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def bench_primitives(repeats: int = 200) -> dict[str, dict[str, float]]:
    """Per-operation cost (ms) of the public-key steps every masking client repeats once per peer."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    signer = Ed25519PrivateKey.generate()
    message = os.urandom(120)
    signature, public = signer.sign(message), signer.public_key()
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key()
    out = {}
    for name, fn in (
        ("ed25519_verify_ms", partial(public.verify, signature, message)),
        ("x25519_exchange_ms", partial(a.exchange, b)),
    ):
        times = [_timed(fn)[1] * 1e3 for _ in range(repeats)]
        out[name] = _stats(times)
    return out


def bench_focused(
    rng: np.random.Generator, repeats_small: int, repeats_large: int, with_flower: bool, link_mbps: float
) -> dict[str, Any]:
    """The three target cells measured again with interleaved repetitions (median, min, max per quantity).

    * n = 10, d = 1e5: plaintext (bare and serialized) vs masking, ``repeats_small`` interleaved rounds.
    * n = 10, d = 1e6: masking vs Flower's SecAgg (complete graph), ``repeats_large`` interleaved rounds.
    * d = 1e6: CKKS encryption time of one client, ``repeats_large`` encryptions.

    Interleaving puts every mode under the same background load; the ratio of medians is the headline.
    """
    link = link_mbps * 1e6 / 8
    ids = {u: Identity.generate(u) for u in range(1, 11)}
    roster = Roster.from_identities(ids)
    cfg = MaskingConfig(threshold=6, scale=2.0**16)
    out: dict[str, Any] = {"repeats_small": repeats_small, "repeats_large": repeats_large}

    updates = {u: rng.normal(0, 0.02, 10**5) for u in range(1, 11)}
    exact = np.mean(list(updates.values()), axis=0)
    series: dict[str, list[float]] = {k: [] for k in ("none_bare", "none_ser", "none_link", "mask_bare", "mask_ser")}
    series["mask_link"] = []
    for _ in range(repeats_small):
        base = bench_none_with_serde(updates)
        mask = bench_masking(updates, cfg, ids, roster, exact)
        for key, m in (("none", base), ("mask", mask)):
            bare = m["client_s"] + m["server_s"]
            ser = bare + m["client_serde_s"] + m["server_serde_s"]
            series[f"{key}_bare"].append(bare)
            series[f"{key}_ser"].append(ser)
            series[f"{key}_link"].append(ser + (m["up_bytes"] + m["down_bytes"]) / link)
    cell: dict[str, Any] = {key: _stats(v) for key, v in series.items()}
    for kind in ("bare", "ser", "link"):
        cell[f"ratio_{kind}"] = cell[f"mask_{kind}"]["median"] / cell[f"none_{kind}"]["median"]
    out["masking_vs_plaintext_n10_d1e5"] = cell

    updates = {u: rng.normal(0, 0.02, 10**6) for u in range(1, 11)}
    exact = np.mean(list(updates.values()), axis=0)
    if with_flower:
        big: dict[str, list[float]] = {"masking": [], "flower-secagg": []}
        for _ in range(repeats_large):
            m = bench_masking(updates, cfg, ids, roster, exact)
            f = flower_peer.bench_flower_secaggplus(updates, 10, 6, 1.0, exact)
            big["masking"].append(m["client_s"] + m["server_s"])
            big["flower-secagg"].append(f["client_s"] + f["server_s"])
        cell = {key: _stats(v) for key, v in big.items()}
        cell["ratio"] = cell["flower-secagg"]["median"] / cell["masking"]["median"]
        out["flower_vs_masking_n10_d1e6"] = cell

    ckks_cfg = CkksConfig(clip_range=1.0)
    secret = ckks.create_secret_context(ckks_cfg)
    key_id = ckks.new_key_id()
    run = os.urandom(16)
    enc = [
        _timed(
            partial(
                ckks.encrypt_update,
                secret,
                ckks_cfg,
                updates[1],
                1,
                run_id=run,
                round_number=1,
                sender=1,
                key_id=key_id,
            )
        )[1]
        for _ in range(repeats_large)
    ]
    out["ckks_encrypt_1e6_s"] = _stats(enc)
    out["primitives"] = bench_primitives()
    return out


def _secaggplus_k(n: int) -> int | None:
    k = max(4, 2 * math.ceil(math.log2(n)))
    k += k % 2
    return k if k < n - 1 else None


def _add_ratios(row: dict[str, Any], link_bytes_per_s: float) -> None:
    """Round ratios of every mode against the plaintext round, under the three definitions of the docstring."""
    base = row["none"]

    def rounds(m: dict[str, float]) -> tuple[float, float, float]:
        bare = m["client_s"] + m["server_s"]
        serialized = bare + m["client_serde_s"] + m["server_serde_s"]
        link = serialized + (m["up_bytes"] + m["down_bytes"]) / link_bytes_per_s
        return bare, serialized, link

    base_rounds = rounds(base)
    for mode in MODES:
        if mode in row:
            m = row[mode]
            mine = rounds(m)
            m["round_s"], m["round_serialized_s"], m["round_link_s"] = mine
            m["round_ratio_vs_none"] = mine[0] / base_rounds[0]
            m["round_ratio_vs_none_serialized"] = mine[1] / base_rounds[1]
            m["round_ratio_vs_none_link"] = mine[2] / base_rounds[2]
            m["up_ratio_vs_none"] = m["up_bytes"] / base["up_bytes"]


def _median_of(fn: Callable[[], dict[str, float]], repeats: int) -> dict[str, Any]:
    """Run one round ``repeats`` times; the median of every number (each metric separately)."""
    runs = [fn() for _ in range(repeats)]
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def run_grid(
    clients: list[int],
    sizes: list[int],
    rng: np.random.Generator,
    with_flower: bool,
    link_mbps: float,
    repeats: int,
) -> list[dict[str, Any]]:
    """Every mode on the same vectors for each (d, n); one row per (n, d). Cells with d <= 1e5 are run
    ``repeats`` times (median per metric), d = 1e6 once, to keep the grid's CPU time bounded."""
    ids = {u: Identity.generate(u) for u in range(1, max(clients) + 1)}
    ckks_cfg = CkksConfig(clip_range=1.0, max_clients=max(64, max(clients)))
    secret = ckks.create_secret_context(ckks_cfg)
    server_ctx = ckks.load_server_context(ckks.server_context_bytes(secret), ckks_cfg)
    key_id = ckks.new_key_id()
    rows: list[dict[str, Any]] = []
    for d in sizes:
        for n in clients:
            updates = {u: rng.normal(0, 0.02, d) for u in range(1, n + 1)}
            exact = np.mean(list(updates.values()), axis=0)
            reps = repeats if d <= 10**5 else 1
            row: dict[str, Any] = {"n": n, "d": d, "repeats": reps}
            row["none"] = _median_of(partial(bench_none_with_serde, updates), reps)
            t = n // 2 + 1
            cfg = MaskingConfig(threshold=t, scale=2.0**16)
            # The provisioned roster of this federation is its n nodes (the SecAgg+ ring is placed over the roster).
            roster = Roster.from_identities({u: ids[u] for u in updates})
            row["masking"] = _median_of(partial(bench_masking, updates, cfg, ids, roster, exact), reps)
            k = _secaggplus_k(n)
            if k is not None:
                cfg_k = MaskingConfig(threshold=k // 2 + 1, neighbourhood_size=k, scale=2.0**16)
                row["secagg+"] = _median_of(partial(bench_masking, updates, cfg_k, ids, roster, exact), reps)
                row["secagg+"]["k"] = k
            row["ckks"] = _median_of(
                partial(bench_ckks, updates, ckks_cfg, secret, server_ctx, key_id, exact, with_transport=True), reps
            )
            if with_flower:
                row["flower-secagg"] = _median_of(
                    partial(flower_peer.bench_flower_secaggplus, updates, n, t, 1.0, exact), reps
                )
                if k is not None:
                    row["flower-secagg+"] = _median_of(
                        partial(flower_peer.bench_flower_secaggplus, updates, k + 1, k // 2 + 1, 1.0, exact), reps
                    )
                    row["flower-secagg+"]["k"] = k
            _add_ratios(row, link_mbps * 1e6 / 8)
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n in {5,10}, d in {1e4,1e5}")
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+ (the slowest mode)")
    parser.add_argument(
        "--focused-repeats", type=int, default=21, help="interleaved rounds of the n=10, d=1e5 target cell"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per cell with d <= 1e5 (median)")
    parser.add_argument("--link-mbps", type=float, default=100.0, help="modelled per-client link for 'link' ratios")
    parser.add_argument("--plot", type=Path, default=PLOT_PATH, help="where to draw the cost plot")
    parser.add_argument("--plot-only", type=Path, metavar="RESULTS_JSON", help="only redraw the plot from a JSON")
    args = parser.parse_args(argv)
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot)
        print(f"wrote {args.plot}")
        return 0
    if not args.link_mbps > 0:
        parser.error(f"--link-mbps must be > 0, got {args.link_mbps}")
    if args.focused_repeats < 1:
        parser.error(f"--focused-repeats must be >= 1, got {args.focused_repeats}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    flower_peer.setup_flower_process()
    clients, sizes = ([5, 10], [10**4, 10**5]) if args.quick else (args.clients, args.sizes)
    rng = np.random.default_rng(args.seed)
    load_start = os.getloadavg()
    started = time.perf_counter()
    rows = run_grid(clients, sizes, rng, not args.no_flower, args.link_mbps, args.repeats)
    options = bench_ckks_options(10, 10**5, rng, clip=0.1, noise_std=0.1)
    focused = bench_focused(
        rng, args.focused_repeats, max(3, args.focused_repeats // 4), not args.no_flower, args.link_mbps
    )
    command = "python experiments/bench_secagg.py" + (" --quick" if args.quick else "")
    if args.no_flower:
        command += " --no-flower"
    meta = {
        "command": command,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": load_start,
        "load_avg_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "link_mbps": args.link_mbps,
        "repeats_d_le_1e5": args.repeats,
        "flwr": _flwr_version(),
        "note": "wall-clock on a shared machine; ratios are from the same run",
    }
    results = {"meta": meta, "rows": rows, "ckks_options": options, "focused": focused}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = _markdown(rows, options, meta, focused)
    (args.out / "results.md").write_text(md)
    plot(results, args.plot)
    print(md)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} and {args.plot}")
    return 0


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def _label(mode: str, m: dict[str, Any]) -> str:
    return f"{mode} (k={m['k']})" if "k" in m else mode


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"n={row['n']:>3} d={row['d']:>8}"]
    for mode in MODES:
        if mode in row:
            m = row[mode]
            parts.append(f"{mode}: c={m['client_s']:.3f}s s={m['server_s']:.3f}s up={m['up_bytes'] / 1e6:.2f}MB")
    return " | ".join(parts)


def _markdown(rows: list[dict[str, Any]], options: list[dict], meta: dict[str, Any], focused: dict[str, Any]) -> str:
    out = [
        f"Command: `{meta['command']}` (flwr {meta['flwr']}, {meta['cpu_count']} CPUs, load average "
        f"{meta['load_avg_at_start'][0]:.1f} at start, {meta['load_avg_at_end'][0]:.1f} at end, "
        f"{meta['wall_s']:.0f} s; median of {meta['repeats_d_le_1e5']} rounds per cell for d <= 1e5, one round at 1e6)",
        "",
        "| n | d | mode | client s | server s | serde s | up MB/client | down MB/client | round / none: bare |"
        f" serialized | + {meta['link_mbps']:g} Mbit/s link | up / none | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for mode in MODES:
            if mode not in row:
                continue
            m = row[mode]
            out.append(
                f"| {row['n']} | {row['d']:.0e} | {_label(mode, m)} | {m['client_s']:.4f} | {m['server_s']:.4f} | "
                f"{m['client_serde_s'] + m['server_serde_s']:.4f} | "
                f"{m['up_bytes'] / 1e6:.3f} | {m['down_bytes'] / 1e6:.3f} | "
                f"{m['round_ratio_vs_none']:.2f} | {m['round_ratio_vs_none_serialized']:.2f} | "
                f"{m['round_ratio_vs_none_link']:.2f} | {m['up_ratio_vs_none']:.2f} | "
                f"{m.get('max_abs_error', 0.0):.2e} |"
            )
    out += ["", *_targets(rows), "", *_focused_lines(focused, meta)]
    out += [
        "",
        "CKKS encoding options (n=10 clients, d=1e5, updates N(0, 0.02), clip 0.1; DP noise std 0.1):",
        "",
        "| option | bytes/param | encrypt s | max abs err | err / DP noise std | relative err |",
        "|---|---|---|---|---|---|",
    ]
    for o in options:
        out.append(
            f"| {o['option']} | {o['bytes_per_param']:.1f} | {o['encrypt_s']:.3f} | {o['max_abs_error']:.2e} |"
            f" {o['error_over_dp_noise_std']:.1e} | {o['relative_error']:.1e} |"
        )
    return "\n".join(out) + "\n"


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's three targets, read off the rows (only those the grid contains)."""
    out = ["Targets:", ""]
    for row in rows:
        if row["n"] == 10 and row["d"] == 10**5:
            m = row["masking"]
            out.append(
                "* masking round / plaintext round at n=10, d=1e5 (target <= 1.25): "
                f"bare {m['round_ratio_vs_none']:.2f}, serialized {m['round_ratio_vs_none_serialized']:.2f}, "
                f"with link {m['round_ratio_vs_none_link']:.2f}"
            )
    d_max = max(r["d"] for r in rows)
    for row in rows:
        if row["d"] != d_max:
            continue
        for ours, theirs in (("masking", "flower-secagg"), ("secagg+", "flower-secagg+")):
            if ours in row and theirs in row:
                a, b = row[ours], row[theirs]
                out.append(
                    f"* {theirs} round / {ours} round at n={row['n']}, d={d_max:.0e} (target >= 3): "
                    f"compute {b['round_s'] / a['round_s']:.1f}x, serialized "
                    f"{b['round_serialized_s'] / a['round_serialized_s']:.1f}x; client "
                    f"{b['client_s'] / a['client_s']:.1f}x, server {b['server_s'] / a['server_s']:.1f}x, "
                    f"upload {b['up_bytes'] / a['up_bytes']:.1f}x"
                )
    enc = [f"{r['ckks']['encrypt_s']:.2f}" for r in rows if r["d"] == 10**6]
    if enc:
        out.append(f"* CKKS encryption of 1e6 parameters (target <= 1 s): {', '.join(enc)} s (one per n)")
    return out


def _focused_lines(focused: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Markdown of :func:`bench_focused`: medians (min-max) and ratios of medians."""

    def ms(stat: dict[str, float]) -> str:
        return f"{stat['median'] * 1e3:.1f} ms ({stat['min'] * 1e3:.1f}-{stat['max'] * 1e3:.1f})"

    c = focused["masking_vs_plaintext_n10_d1e5"]
    out = [
        f"Target cells re-measured with interleaved repetitions (median (min-max)); {focused['repeats_small']} "
        f"rounds at d=1e5, {focused['repeats_large']} at d=1e6:",
        "",
        "| n=10, d=1e5 round | plaintext | masking | masking / plaintext (target <= 1.25) |",
        "|---|---|---|---|",
        f"| bare compute | {ms(c['none_bare'])} | {ms(c['mask_bare'])} | {c['ratio_bare']:.2f} |",
        f"| + Flower serialization | {ms(c['none_ser'])} | {ms(c['mask_ser'])} | {c['ratio_ser']:.2f} |",
        f"| + serialization + {meta['link_mbps']:g} Mbit/s link (modelled) | {ms(c['none_link'])} | "
        f"{ms(c['mask_link'])} | {c['ratio_link']:.2f} |",
        "",
    ]
    if "flower_vs_masking_n10_d1e6" in focused:
        f = focused["flower_vs_masking_n10_d1e6"]
        out.append(
            f"* n=10, d=1e6 compute per round: masking {ms(f['masking'])}, Flower SecAgg {ms(f['flower-secagg'])}: "
            f"Flower / masking = {f['ratio']:.1f}x (target >= 3)"
        )
    e = focused["ckks_encrypt_1e6_s"]
    out.append(
        f"* CKKS encryption of 1e6 parameters: {e['median']:.2f} s median ({e['min']:.2f}-{e['max']:.2f}) "
        "(target <= 1 s)"
    )
    p = focused["primitives"]
    out.append(
        f"* per-peer public-key steps of a masking client: Ed25519 verify {p['ed25519_verify_ms']['median']:.3f} ms, "
        f"X25519 exchange {p['x25519_exchange_ms']['median']:.3f} ms (median of 200)"
    )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Cost vs number of clients (largest d) and vs update size (n = 10, else the largest n), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = results["rows"]
    d_max = max(r["d"] for r in rows)
    ns = sorted({r["n"] for r in rows})
    n_ref = 10 if 10 in ns else ns[-1]
    metrics = [("client_s", "client s / round"), ("server_s", "server s / round"), ("up_bytes", "upload B / client")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for col, (key, ylabel) in enumerate(metrics):
        for row_i, (xkey, fixed_key, fixed, xlabel) in enumerate(
            (("n", "d", d_max, "clients n"), ("d", "n", n_ref, "update size d"))
        ):
            ax = axes[row_i][col]
            xs: set[int] = set()
            for mode, (marker, style) in zip(MODES, _STYLES, strict=True):
                pts = sorted((r[xkey], r[mode][key]) for r in rows if r[fixed_key] == fixed and mode in r)
                if pts:
                    xs.update(p[0] for p in pts)
                    ax.plot(
                        [p[0] for p in pts],
                        [max(p[1], 1e-6) for p in pts],
                        marker=marker,
                        linestyle=style,
                        label=mode,
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sorted(xs), [f"{x:g}" if xkey == "n" else f"1e{round(math.log10(x))}" for x in sorted(xs)])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            fixed_text = f"d = {fixed:.0e}" if fixed_key == "d" else f"n = {fixed}"
            ax.set_title(f"{ylabel} vs {xlabel} ({fixed_text})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"Secure aggregation cost per round ({meta['command']}; {meta['cpu_count']} shared CPUs, "
        f"load {meta['load_avg_at_end'][0]:.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
