"""``fedmpt ledger``: verify signed epsilon ledgers and make node signing keys.

``fedmpt ledger verify PATH [--keys roster.json]`` checks a node ledger or a run ledger
(``<run_dir>/epsilon_ledger.jsonl``): hash chains, Ed25519 signatures, seq continuity, rounds, and a replay of
every epsilon with both accountants (:func:`privacy.ledger.verify_ledger`). It prints one summary line per
node and exits 0 if everything verifies, 1 with the first bad entry otherwise (2 for unusable input).

``fedmpt ledger keygen KEY_FILE`` writes a new Ed25519 key (PEM, mode 0600) and prints its public key for
the roster.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

# privacy.ledger pulls in opacus and torch; import it only when a ledger command runs, so that building the
# CLI parser for other commands stays fast.


def _verify(args: argparse.Namespace) -> int:
    from privacy.ledger import load_roster, verify_ledger

    trusted = load_roster(args.keys) if args.keys else None
    report = verify_ledger(args.path, trusted)
    print(f"ledger {report.path}: {report.lines} lines, {len(report.nodes)} nodes")
    for node_id in sorted(report.nodes):
        node = report.nodes[node_id]
        status = "ok" if node.verified else "FAILED"
        print(
            f"  node {node_id}: {node.entries} entries verified, last round {node.last_round}, "
            f"epsilon_rdp={node.epsilon_rdp:.6g} epsilon_pld={node.epsilon_pld:.6g} at delta={node.delta:g} "
            f"[{node.key_id}] {status}"
        )
    for node_id in report.missing_nodes:
        print(f"  node {node_id}: in the roster, no entries")
    if not args.keys:
        print("  note: no --keys roster given; signatures were checked against each node's first key only")
    failure = report.first_failure
    if failure is not None:
        print(f"VERIFICATION FAILED at {failure}", file=sys.stderr)
        if len(report.failures) > 1:
            print(f"  ({len(report.failures) - 1} more failure(s) on other nodes)", file=sys.stderr)
        return 1
    print("verified: all chains, signatures and epsilons check out")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from privacy.ledger import NodeIdentity

    identity = NodeIdentity.generate()
    identity.save(args.key_file)
    print(f"wrote {args.key_file} ({identity.key_id})")
    print(f"public key (for the roster): {identity.public_key_hex}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``ledger`` sub-command and its ``verify`` / ``keygen`` actions."""
    parser = subparsers.add_parser("ledger", help="verify signed epsilon ledgers, make node keys")
    actions = parser.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)

    verify = actions.add_parser("verify", help="verify a node or run epsilon ledger")
    verify.add_argument("path", help="ledger file (JSON Lines)")
    verify.add_argument(
        "--keys", metavar="ROSTER", help="JSON object {node_id: public key hex or PEM} to pin node keys"
    )
    verify.set_defaults(func=_verify)

    keygen = actions.add_parser("keygen", help="create a node signing key (Ed25519, PEM, mode 0600)")
    keygen.add_argument("key_file", help="path of the new key file (must not exist)")
    keygen.set_defaults(func=_keygen)
