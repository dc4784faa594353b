"""``fedmpt secagg``: provision the kit of a federation (its one identity system), enroll sites, inspect key files.

The kit (:mod:`fedmpt.apps.kit`) is the federation's only identity system: node k's Ed25519 identity signs its
secure-aggregation messages *and* its epsilon-ledger entries, and the server and every verifier (``fedmpt
ledger verify``, ``fedmpt report``) pin to ``roster.bin``. There are two ways to make one.

Central provisioning, ``fedmpt secagg provision --out DIR --nodes N [--threshold T] [--neighbours K] [--ckks]
[--ckks-pack K ...]``, writes, by calling :func:`secagg.keys.provision_identities`,
:func:`fedmpt.apps.kit.write_protocol` and :func:`secagg.ckks.provision`::

    DIR/masking/roster.bin               node id -> Ed25519 identity public key     server + every node
    DIR/masking/protocol.json            run id, N, threshold t, SecAgg+ degree k   server + every node
    DIR/masking/identity_<id>.key        Ed25519 private key (mode 0600)            node <id> only
    DIR/ckks/server/server_context.tenseal + ckks_config.json  (no secret key)      server only
    DIR/ckks/client/client_context.tenseal (mode 0600) + ckks_config.json            every node, never the server
    DIR/DISTRIBUTION.txt                 which file goes to which party (no secrets)

Node ids are the nodes' ``partition-id`` (node config), ``0 .. N-1``. The roster is the trust anchor of masking
(signed key advertisements are checked against it, never against keys the server forwards), so it must reach
the nodes out of band: the command prints its SHA-256 for the nodes to compare. Nothing secret is printed or
logged. Existing key files are never overwritten (the command refuses before writing anything): re-keying a
deployment is a deliberate act of deleting the old kit first. ``--threshold 0`` / ``--neighbours 0`` (the
defaults) take the kit's defaults: t = floor(2m/3) + 1 for m share holders, the complete graph.

Enrollment, where no one but a site ever holds its private key:

1. on site k: ``fedmpt secagg enroll --out DIR --node K`` writes ``DIR/masking/identity_<K>.key`` (0600; never
   overwrites) and prints its public key and the key's SHA-256 fingerprint, which the site sends to the
   coordinator over a channel that authenticates the site (and reads back to it, e.g. by phone);
2. on the coordinator: ``fedmpt secagg roster --out DIR --node 0=HEX --node 1=HEX ... [--threshold T]
   [--neighbours K]`` assembles ``DIR/masking/roster.bin`` from the public keys only (node ids must be exactly
   0..N-1) and writes ``DIR/masking/protocol.json``; it prints every node's fingerprint and the roster's SHA-256;
3. the coordinator sends ``roster.bin`` and ``protocol.json`` to the server and to every site, which copies them
   into its own ``DIR/masking/`` and sets the node config ``secagg-dir = DIR``.

``fedmpt secagg inspect FILE`` says what a key file holds: for a TenSEAL context whether it carries the CKKS
secret key (a server kit must not), for a roster its node ids and fingerprint, for an identity key its public
key; it exits 1 when a file that holds a secret is readable by group or others.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmpt.apps.kit import CKKS_STATE_RANGE
from fedmpt.errors import ConfigError

if TYPE_CHECKING:
    from fedmpt.apps.kit import ProtocolParams

logger = logging.getLogger(__name__)

MASKING_DIR = "masking"  # = fedmpt.apps.kit.MASKING_DIR (imported lazily: it pulls in cryptography)
CKKS_DIR = "ckks"  # = fedmpt.apps.kit.CKKS_DIR
DISTRIBUTION_FILE = "DISTRIBUTION.txt"
#: Upper bound on --nodes: one identity file per node; a roster this size is already a large deployment.
MAX_NODES = 100_000
#: CLI flag -> CkksConfig field; only flags given on the command line override the library defaults.
_CKKS_FLAGS: dict[str, str] = {
    "ckks_pack": "pack",
    "ckks_lane_bits": "lane_bits",
    "ckks_packed_scale_bits": "packed_scale_bits",
    "ckks_coeff_bits": "coeff_mod_bit_sizes",
    "ckks_scale_bits": "scale_bits",
    "ckks_clip_range": "clip_range",
    "ckks_max_clients": "max_clients",
    "ckks_max_weight": "max_weight",
}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a (public) file, printed so a party can check it received the same bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def key_fingerprint(public: bytes) -> str:
    """Hex SHA-256 of a raw 32-byte identity public key: what a site and the coordinator compare out of band."""
    return hashlib.sha256(public).hexdigest()


def _protocol_params(nodes: int, threshold: int, neighbours: int) -> ProtocolParams:
    """:func:`fedmpt.apps.kit.new_protocol_params`, after checking ``--threshold`` and ``--neighbours``."""
    from fedmpt.apps.kit import new_protocol_params

    if not (threshold == 0 or 2 <= threshold <= nodes):
        raise ConfigError(
            f"--threshold must be 0 (the default) or an int in [2, {nodes}] (the roster size), got {threshold}"
        )
    if neighbours < 0 or neighbours % 2:
        raise ConfigError(f"--neighbours must be 0 (the complete graph) or an even int >= 2, got {neighbours}")
    return new_protocol_params(nodes, threshold, neighbours)


def _ckks_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, flag) for flag, field in _CKKS_FLAGS.items() if getattr(args, flag) is not None}


def _planned_files(out: Path, node_ids: list[int], with_ckks: bool) -> list[Path]:
    from fedmpt.apps.kit import PROTOCOL_FILE
    from secagg import ckks
    from secagg.keys import ROSTER_FILE, identity_file_name

    files = [out / MASKING_DIR / ROSTER_FILE, out / MASKING_DIR / PROTOCOL_FILE]
    files += [out / MASKING_DIR / identity_file_name(n) for n in node_ids]
    if with_ckks:
        files += [
            out / CKKS_DIR / "client" / ckks.CLIENT_CONTEXT_FILE,
            out / CKKS_DIR / "client" / ckks.CONFIG_FILE,
            out / CKKS_DIR / "server" / ckks.SERVER_CONTEXT_FILE,
            out / CKKS_DIR / "server" / ckks.CONFIG_FILE,
        ]
    return files + [out / DISTRIBUTION_FILE]


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700 where new: the kit directories hold secret keys."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def provision(args: argparse.Namespace) -> int:
    """Write the identity keys, roster, protocol parameters and (with ``--ckks``) the CKKS kits; print who gets
    which file."""
    from fedmpt.apps.kit import write_protocol
    from secagg import ckks
    from secagg.config import ckks_config_from_mapping
    from secagg.keys import ROSTER_FILE, identity_file_name, provision_identities

    nodes = args.nodes
    if not 2 <= nodes <= MAX_NODES:
        raise ConfigError(f"--nodes must be an int in [2, {MAX_NODES}] (aggregation needs >= 2 nodes), got {nodes}")
    overrides = _ckks_overrides(args)
    if overrides and not args.ckks:
        flags = ", ".join("--" + f.replace("_", "-") for f in _CKKS_FLAGS if getattr(args, f) is not None)
        raise ConfigError(f"{flags} given without --ckks")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    node_ids = list(range(nodes))
    params = _protocol_params(nodes, args.threshold, args.neighbours)  # validated before any file is written
    ckks_config = None
    if args.ckks:
        overrides.setdefault("max_clients", nodes)
        # The apps encrypt whole weighted states (not deltas), whose parameters (e.g. the logit bias) exceed +-1.
        overrides.setdefault("clip_range", CKKS_STATE_RANGE)
        ckks_config = ckks_config_from_mapping(overrides)  # validated before any file is written
    existing = [p for p in _planned_files(out, node_ids, args.ckks) if p.exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:5]) + (f" (+{len(existing) - 5} more)" if len(existing) > 5 else "")
        raise ConfigError(
            f"refusing to overwrite existing key material: {shown}; delete the old kit deliberately or choose "
            "another --out"
        )

    _make_private_dir(out)
    masking_dir = out / MASKING_DIR
    _make_private_dir(masking_dir)
    roster = provision_identities(node_ids, masking_dir)
    protocol_path = write_protocol(masking_dir, params)
    roster_path = masking_dir / ROSTER_FILE
    roster_sha = sha256_file(roster_path)
    lines = [
        f"fedmpt secure-aggregation kit for {nodes} nodes (node id = partition-id, 0..{nodes - 1})",
        "",
        "masking (pairwise masking, secagg.masking):",
        f"  {roster_path}  roster of {len(roster)} Ed25519 identity public keys, sha256 {roster_sha}",
        "      -> the server and every node; nodes must receive it out of band (not via the server) and",
        "         compare its sha256 with the one above",
        f"  {protocol_path}  {_describe_protocol(params)}",
        "      -> the server and every node, with the roster",
        f"  {masking_dir / identity_file_name(0)} .. {identity_file_name(nodes - 1)}  Ed25519 identity private "
        "keys (mode 0600)",
        "      -> identity_<id>.key to node <id> only; never to the server or another node",
    ]
    if ckks_config is not None:
        ckks_dir = out / CKKS_DIR
        _make_private_dir(ckks_dir)
        for sub in ("client", "server"):
            _make_private_dir(ckks_dir / sub)
        kit = ckks.provision(ckks_config, ckks_dir)
        lines += [
            "",
            f"ckks (TenSEAL CKKS, secagg.ckks; key id {kit.key_id.hex()}, public label):",
            f"  {kit.server_context}  context WITHOUT secret key, sha256 {sha256_file(kit.server_context)}",
            f"  {kit.config}  parameters and key id",
            "      -> the server only",
            f"  {kit.client_context}  context WITH the shared CKKS secret key (mode 0600)",
            f"  {kit.client_context.parent / ckks.CONFIG_FILE}  parameters and key id",
            "      -> every node; NEVER the server: the server plus any one node holding this file decrypts",
            "         every individual update (see docs/secure_aggregation.md section 5.1)",
        ]
    lines += [
        "",
        "Whoever ran this command has seen every secret: delete the secret files from this machine once",
        "they are delivered. The identity keys also sign the nodes' epsilon ledgers; so that no one but a site",
        "ever holds its key, enroll the sites instead ('fedmpt secagg enroll', then 'fedmpt secagg roster').",
    ]
    text = "\n".join(lines) + "\n"
    (out / DISTRIBUTION_FILE).write_text(text)
    print(text, end="")
    logger.info("provisioned %d node identities%s under %s", nodes, " and CKKS kits" if args.ckks else "", out)
    return 0


def _describe_protocol(params: ProtocolParams) -> str:
    graph = f"SecAgg+ degree {params.neighbours}" if params.neighbourhood_size else "complete graph"
    return f"protocol parameters: N = {params.roster_size}, threshold t = {params.threshold}, {graph}"


def enroll(args: argparse.Namespace) -> int:
    """On site K: create its identity key ``DIR/masking/identity_<K>.key`` (0600, never overwritten); print the
    public key and its fingerprint for the coordinator's roster. The private key is never printed."""
    from secagg.keys import Identity, check_node_id, identity_file_name

    node = args.node
    try:
        check_node_id(node)
    except ConfigError:
        raise ConfigError(f"--node must be a partition id, an int in [0, 2**64 - 1), got {node}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    key_path = out / MASKING_DIR / identity_file_name(node)
    if key_path.exists():
        raise ConfigError(
            f"refusing to overwrite the existing identity key {key_path} (--node {node}); re-keying a node is a "
            "deliberate act of deleting the old key (and re-assembling the roster)"
        )
    _make_private_dir(out)
    _make_private_dir(out / MASKING_DIR)
    identity = Identity.generate(node)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(identity.private_bytes())
    public = identity.public
    print(f"wrote {key_path} (Ed25519 identity private key of node {node}, mode 0600; it never leaves this site)")
    print(f"public key: {public.hex()}")
    print(f"sha256 fingerprint: {key_fingerprint(public)}")
    print(f"send the coordinator: --node {node}={public.hex()}  (and confirm the fingerprint out of band)")
    logger.info("enrolled node %d: %s", node, key_path)
    return 0


def _parse_roster_nodes(specs: list[str]) -> dict[int, bytes]:
    """``["K=HEX", ...]`` -> {K: 32 raw bytes}; the ids must be exactly 0..N-1, N >= 2, each once."""
    from secagg.keys import PUBLIC_KEY_BYTES

    keys: dict[int, bytes] = {}
    for spec in specs:
        node_text, sep, hex_text = spec.partition("=")
        if not sep or not node_text.strip().isdigit():
            raise ConfigError(f"--node must be K=HEX (partition id = 64 hex digits of the public key), got {spec!r}")
        node = int(node_text)
        if node in keys:
            raise ConfigError(f"--node {node} is given twice; every node id appears once")
        try:
            raw = bytes.fromhex(hex_text.strip())
        except ValueError:
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ConfigError(
                f"--node {node}: the public key must be {2 * PUBLIC_KEY_BYTES} hex digits (the 'public key' that "
                f"'fedmpt secagg enroll' printed), got {hex_text!r}"
            )
        twin = next((other for other, key in keys.items() if key == raw), None)
        if twin is not None:  # one key under two ids: one party would hold two roster places
            raise ConfigError(f"--node {twin} and --node {node} have the same public key; every site enrolls its own")
        keys[node] = raw
    if not 2 <= len(keys) <= MAX_NODES:
        raise ConfigError(f"--node must be given for 2 to {MAX_NODES} nodes (aggregation needs >= 2), got {len(keys)}")
    missing = sorted(set(range(len(keys))) - set(keys))
    if missing:
        unexpected = sorted(set(keys) - set(range(len(keys))))
        raise ConfigError(
            f"--node ids must be exactly 0..{len(keys) - 1} (node id = partition-id); missing {missing}, "
            f"unexpected {unexpected}"
        )
    return keys


def assemble_roster(args: argparse.Namespace) -> int:
    """On the coordinator: write ``DIR/masking/roster.bin`` from the sites' public keys and ``protocol.json``; print
    every node's fingerprint (to compare with what the site read out) and the roster's SHA-256."""
    from fedmpt.apps.kit import PROTOCOL_FILE, write_protocol
    from secagg.keys import ROSTER_FILE, Roster

    keys = _parse_roster_nodes(args.node)
    params = _protocol_params(len(keys), args.threshold, args.neighbours)
    try:
        roster = Roster(keys)
    except ValueError as err:  # a 32-byte string that is no Ed25519 public key
        raise ConfigError(f"--node: not an Ed25519 public key ({err})") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    masking_dir = out / MASKING_DIR
    existing = [p for p in (masking_dir / ROSTER_FILE, masking_dir / PROTOCOL_FILE) if p.exists()]
    if existing:
        raise ConfigError(
            f"refusing to overwrite {', '.join(map(str, existing))}; a new roster is a new kit: choose another "
            "--out or delete the old files deliberately"
        )
    masking_dir.mkdir(parents=True, exist_ok=True)  # public material only
    roster_path = masking_dir / ROSTER_FILE
    fd = os.open(roster_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(roster.to_bytes())
    protocol_path = write_protocol(masking_dir, params)
    print(f"{roster_path}: roster of {len(roster)} Ed25519 identity public keys, sha256 {sha256_file(roster_path)}")
    for node in sorted(keys):
        print(f"  node {node}: sha256 fingerprint {key_fingerprint(keys[node])}  (compare with the site's)")
    print(f"{protocol_path}: {_describe_protocol(params)}")
    print("-> roster.bin and protocol.json to the server and to every site (into its DIR/masking/), out of band")
    logger.info("assembled a roster of %d nodes under %s", len(roster), out)
    return 0


def _mode_too_open(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def inspect(args: argparse.Namespace) -> int:
    """Print what a key file holds (never the secret itself); exit 1 for a secret readable by others."""
    from secagg.keys import PRIVATE_KEY_BYTES, Identity, Roster

    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    holds_secret: bool
    if data[:4] == b"FMRS":
        roster = Roster.from_bytes(data)
        ids = sorted(roster)
        shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
        print(f"{path}: masking roster, {len(ids)} identity public keys, node ids {shown}")
        print(f"  sha256 {hashlib.sha256(data).hexdigest()} (compare with the provisioning output)")
        holds_secret = False
    elif len(data) == PRIVATE_KEY_BYTES:
        # A raw 32-byte file is an identity key written by provision_identities; the node id is only a label.
        public = Identity.from_private_bytes(0, data).public
        print(f"{path}: Ed25519 identity private key (SECRET); its roster entry is the public key {public.hex()}")
        holds_secret = True
    else:
        import tenseal as ts

        try:
            context = ts.context_from(data)
        except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on foreign bytes.
            raise ConfigError(
                f"{path} is neither a roster, an identity key nor a TenSEAL context ({len(data)} bytes): {err}"
            ) from err
        holds_secret = bool(context.is_private())
        try:
            public_key = bool(context.has_public_key())
        except (AttributeError, ValueError):  # a symmetric-key context has none to report
            public_key = False
        print(f"{path}: TenSEAL context, {len(data)} bytes")
        print(f"  holds CKKS secret key: {'YES (client kit only)' if holds_secret else 'no'}")
        print(f"  holds public key: {'yes' if public_key else 'no'}")
    if holds_secret and _mode_too_open(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        print(f"  WARNING: {path} holds a secret but has mode {mode:04o}; it must be 0600")
        return 1
    return 0


def _add_protocol_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=int, default=0, help="Shamir threshold t (0 = floor(2m/3) + 1 for m share holders)"
    )
    parser.add_argument("--neighbours", type=int, default=0, help="even SecAgg+ degree k (0 = the complete graph)")


def register(subparsers: Any) -> None:
    """Add the ``secagg`` sub-command and its ``provision`` / ``enroll`` / ``roster`` / ``inspect`` actions."""
    parser = subparsers.add_parser(
        "secagg",
        help="provision secure-aggregation keys, inspect key files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="secagg_command", metavar="ACTION", required=True)

    prov = actions.add_parser("provision", help="create identity keys, roster and (--ckks) CKKS kits")
    prov.add_argument("--out", required=True, type=Path, help="output directory (existing key files are refused)")
    prov.add_argument("--nodes", required=True, type=int, help="number of nodes; node ids 0..N-1 (partition-id)")
    _add_protocol_options(prov)
    prov.add_argument("--ckks", action="store_true", help="also create the CKKS client and server kits")
    ckks_group = prov.add_argument_group("CKKS parameters (with --ckks; defaults are secagg.config.CkksConfig's)")
    ckks_group.add_argument("--ckks-pack", type=int, help="values packed per slot (1 = float encoding)")
    ckks_group.add_argument("--ckks-lane-bits", type=int, help="bits per packed lane")
    ckks_group.add_argument("--ckks-packed-scale-bits", type=int, help="log2 CKKS scale in packed mode")
    ckks_group.add_argument("--ckks-coeff-bits", type=int, nargs="+", help="coefficient-modulus prime bit sizes")
    ckks_group.add_argument("--ckks-scale-bits", type=int, help="log2 CKKS scale in float mode")
    ckks_group.add_argument(
        "--ckks-clip-range", type=float, help=f"clip range of every state value (default {CKKS_STATE_RANGE:g})"
    )
    ckks_group.add_argument("--ckks-max-clients", type=int, help="most clients per aggregate (default: --nodes)")
    ckks_group.add_argument("--ckks-max-weight", type=int, help="largest integer client weight")
    prov.set_defaults(func=provision)

    enr = actions.add_parser("enroll", help="on a site: create its identity key, print the public key")
    enr.add_argument("--out", required=True, type=Path, help="the site's kit directory (identity in DIR/masking/)")
    enr.add_argument("--node", required=True, type=int, help="this site's node id (its partition-id)")
    enr.set_defaults(func=enroll)

    ros = actions.add_parser("roster", help="on the coordinator: assemble roster.bin and protocol.json")
    ros.add_argument("--out", required=True, type=Path, help="kit directory to write masking/roster.bin into")
    ros.add_argument(
        "--node", required=True, action="append", metavar="K=HEX", help="a site's node id and public key (repeat)"
    )
    _add_protocol_options(ros)
    ros.set_defaults(func=assemble_roster)

    insp = actions.add_parser("inspect", help="say whether a key file holds secret material")
    insp.add_argument("file", type=Path, help="roster.bin, identity_<id>.key or a .tenseal context")
    insp.set_defaults(func=inspect)
