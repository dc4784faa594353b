"""``fedmpt report RUN_DIR [--out DIR] [--roster PATH | --kit DIR]``: write the audit report of a run (Markdown,
HTML, JSON, PNG plots).

The report (:mod:`privacy.report`) covers the run summary, utility per round, the privacy guarantee with the
final epsilon per client replayed from the signed ledger, the ledger verification result, the threat model of
the transport protection, the empirical audits, and known limitations. The ledger is verified against the
provisioned roster: ``--roster PATH`` (a ``roster.bin``), ``--kit DIR`` (``DIR/masking/roster.bin``), by default
the run's kit (the run config's ``secagg-dir``, else the simulation's per-run kit ``RUN_DIR/secagg``); without
one the ledger counts as not verified. Exit codes: 0 when the report finds no failure; 1 when it was written but
found a failure (the ledger fails verification, is missing for a DP run or has no roster to be verified against,
a client is over budget, or an audit's lower bound exceeds the claimed epsilon); 2 when ``RUN_DIR`` is not a run
directory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fedmpt.commands.ledger import add_roster_options

# privacy.report pulls in torch (through the accountants) and matplotlib; import it only when the command runs,
# so that building the CLI parser for other commands stays fast.


def _report(args: argparse.Namespace) -> int:
    from privacy.report import Severity, write_audit_report

    written = write_audit_report(args.run_dir, args.out, roster=args.roster, kit=args.kit)
    print(f"report written to {written.directory}")
    print(f"  {written.markdown}")
    print(f"  {written.html}")
    for finding in written.report.findings:
        stream = sys.stderr if finding.severity is Severity.FAILURE else sys.stdout
        print(f"  {finding.severity.value}: {finding.text}", file=stream)
    if not written.ok:
        print("REPORT FOUND FAILURES (see the top of the report)", file=sys.stderr)
        return 1
    return 0


def register(subparsers: Any) -> None:
    """Add the ``report`` sub-command."""
    parser = subparsers.add_parser(
        "report", help="write the audit report of a run (Markdown, HTML, PNG plots)", description=__doc__
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds config.json and metrics.jsonl)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default RUN_DIR/report)")
    add_roster_options(parser)
    parser.set_defaults(func=_report)
