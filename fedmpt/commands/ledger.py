"""``fedmpt ledger``: verify signed epsilon ledgers against the provisioned roster.

``fedmpt ledger verify PATH [--roster ROSTER | --kit DIR]`` checks a node ledger or a run ledger
(``<run_dir>/epsilon_ledger.jsonl``, or the run directory itself): hash chains, Ed25519 signatures by each node's
roster key, seq continuity, rounds, and a replay of every epsilon with both accountants
(:func:`privacy.ledger.verify_ledger`). The roster is the kit's ``masking/roster.bin`` (the same identities sign
secure aggregation): ``--roster`` names the file, ``--kit`` the kit directory; by default a run ledger is checked
against the run's kit (the run config's ``secagg-dir``, else the simulation's per-run kit ``<run_dir>/secagg``).
There is no verification without a roster: the keys embedded in the entries are never trusted on their own.

It prints the roster used (with its SHA-256, to compare with the provisioning output), one summary line per
node, and exits 0 if everything verifies, 1 with the first bad entry otherwise, 2 for unusable input (no
roster, a missing file). Node keys are made by ``fedmpt secagg provision`` or ``fedmpt secagg enroll``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedmpt.errors import ConfigError

# privacy.ledger pulls in opacus and torch (and privacy.report matplotlib); import them only when a ledger command
# runs, so that building the CLI parser for other commands stays fast.

#: File name of a run ledger in its run directory (privacy_hooks.RunLedgerFile.LEDGER, without importing flwr).
_RUN_LEDGER = "epsilon_ledger.jsonl"
_RUN_CONFIG = "config.json"


def add_roster_options(parser: argparse.ArgumentParser) -> None:
    """``--roster PATH`` / ``--kit DIR`` (one of them): the trust anchor ledger signatures are checked against."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--roster", type=Path, metavar="PATH", help="the provisioned roster.bin (default: the run's kit)"
    )
    group.add_argument(
        "--kit", type=Path, metavar="DIR", help="a provisioned kit directory: DIR/masking/roster.bin is used"
    )


def _verify(args: argparse.Namespace) -> int:
    from privacy.consistency import check_run_consistency, check_site_chain
    from privacy.ledger import LedgerEntry, read_chain, verify_ledger
    from privacy.report import NO_ROSTER_HINT, identity_keys_in_run_dir, ledger_trust

    path = Path(args.path)
    if path.is_dir():
        path = path / _RUN_LEDGER
    run_dir = path.parent
    in_run_dir = path.name == _RUN_LEDGER and (run_dir / _RUN_CONFIG).is_file()
    if args.roster is None and args.kit is None and not in_run_dir:
        raise ConfigError(f"no roster to verify {path} against (it is not a run directory's ledger); {NO_ROSTER_HINT}")
    trust = ledger_trust(run_dir, roster=args.roster, kit=args.kit)
    if trust.roster is None:
        raise ConfigError(trust.source)
    report = verify_ledger(path, trust.roster)
    print(f"ledger {report.path}: {report.lines} lines, {len(report.nodes)} nodes")
    print(f"  roster: {trust.source}, {len(trust.roster)} nodes, sha256 {trust.sha256}")
    for node_id in sorted(report.nodes, key=lambda n: (len(n), n)):
        node = report.nodes[node_id]
        status = "ok" if node.verified else "FAILED"
        print(
            f"  node {node_id}: {node.entries} entries verified, last round {node.last_round}, "
            f"epsilon_rdp={node.epsilon_rdp:.6g} epsilon_pld={node.epsilon_pld:.6g} at delta={node.delta:g} "
            f"[{node.key_id}] {status}"
        )
    for node_id in report.missing_nodes:
        print(f"  node {node_id}: in the roster, no entries")
    held = identity_keys_in_run_dir(run_dir) if in_run_dir else ()
    if held:
        print(
            f"  note: the identity keys of nodes {', '.join(map(str, held))} are in {run_dir} (a simulation's "
            "per-run kit): one process held them, so the signatures do not prove which party ran each step"
        )
    failure = report.first_failure
    if failure is not None:
        print(f"VERIFICATION FAILED at {failure}", file=sys.stderr)
        if len(report.failures) > 1:
            print(f"  ({len(report.failures) - 1} more failure(s) on other nodes)", file=sys.stderr)
        return 1
    entries = [LedgerEntry.from_line(line) for line in path.read_bytes().splitlines()]
    problems = check_run_consistency(run_dir, entries) if in_run_dir else []
    for chain in args.site_chain:  # a site's own record of this run: the anchor outside the run directory
        problems += [f"{chain}: {p}" for p in check_site_chain(entries, read_chain(Path(chain)))]
    if problems:
        for problem in problems:
            print(f"VERIFICATION FAILED: {problem}", file=sys.stderr)
        return 1
    checked = " and the run's other records agree" if in_run_dir else ""
    sites = f"; holds every entry of {len(args.site_chain)} site chain(s)" if args.site_chain else ""
    print(f"verified: all chains, signatures (against the roster) and epsilons check out{checked}{sites}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``ledger`` sub-command and its ``verify`` action."""
    parser = subparsers.add_parser("ledger", help="verify signed epsilon ledgers against the provisioned roster")
    actions = parser.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)

    verify = actions.add_parser("verify", help="verify a node or run epsilon ledger", description=__doc__)
    verify.add_argument("path", help="ledger file (JSON Lines), or a run directory")
    add_roster_options(verify)
    verify.add_argument(
        "--site-chain",
        action="append",
        default=[],
        metavar="FILE",
        help="a site's own chain of this run (its site ledger): the run ledger must hold every entry of it",
    )
    verify.set_defaults(func=_verify)
