"""End-to-end audit of a DP site's Flower train reply: epsilon_lb of every released field, honest and leaky sites.

Drives the real ClientApp (Poisson sampling, every local step, the site ledger, the reply with every value in
it) on D (15 records of the synthetic world) or D' = D plus a canary record, one fresh site per trial, and runs
:func:`fedmpt.apps.release_audit.audit_releases`. Three sites: the honest one, one that sends its record count
as the FedAvg weight, one that adds its un-noised training loss to the metrics.

Usage::

    .venv/bin/python experiments/audit_release.py                 # 200 trials per arm (~3 min on 2 cores)
    .venv/bin/python experiments/audit_release.py --trials 40     # smoke run

Writes ``experiments/results/audit_release.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmpt.apps import client_app, privacy_hooks, task
from fedmpt.apps.config import read_app_config
from fedmpt.apps.kit import ensure_run_kit
from fedmpt.apps.messages import Key, RecordName, to_array_record
from fedmpt.apps.release_audit import audit_releases
from privacy.accounting import DpSgdEvent, epsilon_rdp
from privacy.canary import concat, gradient_canary
from privacy.dpsgd import PUBLIC_METRICS

REPO = Path(__file__).resolve().parents[1]
SMALL = {"train-per-client": 16, "test-per-client": 8, "global-test-size": 24, "batch-size": 8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="fresh sites per arm (even)")
    parser.add_argument("--sigma", type=float, default=6.0)
    args = parser.parse_args(argv)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    root = Path(tempfile.mkdtemp(prefix="audit-release-"))
    run_config: dict[str, Any] = {
        "runs-dir": str(root / "runs"), "run-name": "audit", "num-server-rounds": 2, "seed": 5, "num-clients": 2,
        "method": "promptfl", "dp": True, "delta": 1e-3, "noise-multiplier": args.sigma,
        "cache-dir": str(REPO / "experiments" / "out" / "audit_release_cache"), **SMALL,
    }  # fmt: skip
    ensure_run_kit(root / "runs" / "audit" / "secagg", 2)
    app_config = read_app_config(run_config)
    full = task._client_data(app_config.task, 0, 5)
    d = task.ClientData(train=full.train.subset(range(len(full.train) - 1)), test=full.test)
    d_plus = task.ClientData(train=concat(d.train, gradient_canary(d.train, seed=3)), test=d.test)
    arrays = task.initial_arrays(app_config.task, 5)
    current: dict[str, task.ClientData] = {}
    task.load_client_data = lambda *a, **k: current["data"]  # type: ignore[assignment]  # the site's data
    app = client_app.build_client_app()
    counter = iter(range(10**9))

    def trial(with_record: bool) -> Message:
        current["data"] = d_plus if with_record else d
        content = RecordDict(
            {RecordName.ARRAYS: to_array_record(arrays), RecordName.CONFIG: ConfigRecord({Key.SERVER_ROUND: 1})}
        )
        message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")
        node = {"partition-id": 0, "num-partitions": 2, "ledger-dir": str(root / f"site-{next(counter)}")}
        return app(message, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config))

    plan = privacy_hooks.planned_event(app_config.privacy, app_config.task, 2)
    claim = epsilon_rdp([DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps)], 1e-3)
    results = {}
    real_update, real_metrics = privacy_hooks.private_update, privacy_hooks.PUBLIC_METRICS

    def leaks_n(*a: Any, **k: Any) -> privacy_hooks.PrivateUpdate:
        out = real_update(*a, **k)
        return privacy_hooks.PrivateUpdate(out.arrays, len(k["data"].train), out.metrics, out.record)

    for name in ("honest", "leaks-n", "leaks-loss"):
        privacy_hooks.private_update = leaks_n if name == "leaks-n" else real_update  # type: ignore[assignment]
        privacy_hooks.PUBLIC_METRICS = (*PUBLIC_METRICS, "loss") if name == "leaks-loss" else real_metrics
        audit = audit_releases(trial, args.trials, claim=claim, delta=1e-3)
        results[name] = {
            "epsilon_lb": audit.epsilon_lb, "worst_field": audit.worst_field, "passed": audit.passed,
            "update_projection_lb": audit.per_field.get("update.projection"),
        }  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    out = {"trials_per_arm": args.trials, "sigma": plan.noise_multiplier, "q": plan.sample_rate, "steps": plan.steps,
           "delta": 1e-3, "claim_epsilon_rdp": claim, "sites": results}  # fmt: skip
    path = REPO / "experiments" / "results" / "audit_release"
    path.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"One round of a DP site (sigma {plan.noise_multiplier:g}, q {plan.sample_rate:g}, {plan.steps} steps, "
        f"delta 1e-3): claimed epsilon {claim:.3f} (RDP). {args.trials} fresh sites per arm, D vs D plus a canary; "
        "the second half of the trials is scored (95% Clopper-Pearson).",
        "",
        "| site | epsilon_lb (max over fields) | field | update projection epsilon_lb | caught |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['epsilon_lb']:.3f} | `{r['worst_field']}` | "
                     f"{r['update_projection_lb']:.3f} | {'yes' if not r['passed'] else 'no'} |")  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
