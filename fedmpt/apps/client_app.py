"""The Flower ClientApp of fedmpt: a thin adapter from Flower messages to :mod:`fedmpt.apps.task`.

Each handler reads the run config and the node config (its partition) once, loads the client's own data,
calls the task, and moves arrays and metrics in Flower records. Images and labels never leave the client:
a reply carries only the trainable state (``train``) or metrics (``evaluate``). Protocol:
:mod:`fedmpt.apps.messages`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.clientapp import ClientApp

from fedmpt.apps.messages import Key, RecordName, from_array_record, to_array_record
from fedmpt.apps.node_config import read_node_config
from fedmpt.apps.secure_aggregation import client_evaluate, client_train
from fedmpt.errors import ConfigError

if TYPE_CHECKING:
    from fedmpt.apps import task
    from fedmpt.apps.config import AppConfig

#: Error code of a reply in which the site withholds what it was asked for (evaluation under DP, plain training
#: at a site that requires DP).
WITHHELD_CODE = 4301

# The task (torch, open_clip, the data) is imported inside the handlers that need it. Under the deployment engine
# every message runs in a fresh ClientApp process, and the secure-aggregation stages after training
# (share-keys, masked-input, unmask) need only numpy and cryptography: importing torch would cost them seconds.


def _client_data(context: Context, overrides: Mapping[str, Any]) -> tuple[AppConfig, int, task.ClientData]:
    from fedmpt.apps import task
    from fedmpt.apps.config import read_app_config

    config = read_app_config({**context.run_config, **overrides})
    node = read_node_config(context.node_config)
    data = task.load_client_data(
        config.task, node.partition_id, node.num_partitions, config.federation.seed, data_root=node.data_root
    )
    return config, node.partition_id, data


def dp_required(node_config: Mapping[str, Any]) -> bool:
    """Whether this site insists on DP whatever the run config says: node config ``dp-required = true``, or a
    site budget or site ledger of its own (``max-epsilon``, ``ledger-dir``). The run config is the server's."""
    flag = node_config.get("dp-required", False)
    if not isinstance(flag, bool):
        raise ConfigError(f"node config 'dp-required' must be true or false, got {flag!r}")
    return flag or "max-epsilon" in node_config or bool(node_config.get("ledger-dir", ""))


def _withheld(msg: Message, why: str) -> Message:
    from flwr.app import Error

    return Message(Error(code=WITHHELD_CODE, reason=why), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node serves."""
    node = read_node_config(context.node_config)
    reply = ConfigRecord({Key.PARTITION_ID: node.partition_id, Key.NUM_PARTITIONS: node.num_partitions})
    return Message(RecordDict({RecordName.CONFIG: reply}), reply_to=msg)


def train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Local training from the received global state; reply with the local state and the example count."""
    from fedmpt.apps import privacy_hooks, task

    config, partition_id, data = _client_data(context, overrides)
    if not config.privacy.dp and dp_required(context.node_config):
        return _withheld(msg, "this site trains only under DP (node config 'dp-required', 'max-epsilon' or "
                              "'ledger-dir'); the run config has dp = false")  # fmt: skip
    global_arrays = from_array_record(msg.content.array_records[RecordName.ARRAYS])
    server_round = int(msg.content.config_records[RecordName.CONFIG][Key.SERVER_ROUND])  # type: ignore[arg-type]
    run_seed = config.federation.seed
    if config.privacy.dp:  # DP-SGD, budget and signed ledger: fedmpt.apps.privacy_hooks
        private = privacy_hooks.private_update(
            context, {**context.run_config, **overrides}, config.privacy, config.task, global_arrays=global_arrays,
            data=data, partition_id=partition_id, server_round=server_round,
            num_rounds=config.federation.num_server_rounds, run_seed=run_seed,
            runs_dir=config.federation.runs_path, run_name=config.federation.run_name,
        )  # fmt: skip
        if private.arrays is None:  # budget exhausted: no update, the privacy record says why
            metrics = MetricRecord({**private.metrics, Key.PARTITION_ID: partition_id})
            refusal = RecordDict({RecordName.METRICS: metrics, privacy_hooks.PRIVACY_RECORD: private.record})
            return Message(refusal, reply_to=msg)
        local_arrays, num_examples, train_metrics = private.arrays, private.num_examples, private.metrics
    else:
        local_arrays, num_examples, train_metrics = task.client_update(
            global_arrays,
            data,
            config.task,
            seed=task.client_seed(run_seed, server_round, partition_id),
            run_seed=run_seed,
        )
    metrics = MetricRecord({**train_metrics, Key.NUM_EXAMPLES: num_examples, Key.PARTITION_ID: partition_id})
    content = RecordDict({RecordName.ARRAYS: to_array_record(local_arrays), RecordName.METRICS: metrics})
    if config.privacy.dp:
        content[privacy_hooks.PRIVACY_RECORD] = private.record
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Evaluate the received global state on this client's own test split.

    Under DP (the run's or the site's own, :func:`dp_required`) nothing is released: metrics on a site's
    private test records are un-noised functions of them, so the reply is an error saying so."""
    from fedmpt.apps import task

    config, partition_id, data = _client_data(context, overrides)
    if config.privacy.dp or dp_required(context.node_config):
        return _withheld(msg, "under DP this site releases no metrics of its private test records")
    global_arrays = from_array_record(msg.content.array_records[RecordName.ARRAYS])
    metrics: dict[str, MetricRecordValues] = {
        **task.evaluate(global_arrays, data.test, config.task, run_seed=config.federation.seed)
    }
    metrics[Key.PARTITION_ID] = partition_id
    return Message(RecordDict({RecordName.METRICS: MetricRecord(metrics)}), reply_to=msg)


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose handlers read ``context.run_config`` updated with ``overrides``.

    ``overrides`` serves the in-process simulation (``fedmpt run``), where Flower passes an empty run config;
    under ``flwr run`` it is empty and the run config comes from Flower.
    """
    fixed = dict(overrides or {})
    client_app = ClientApp()

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        # secure-aggregation stage messages are run by fedmpt.apps.secure_aggregation; plain ones by train()
        return client_train(msg, context, fixed, lambda m: train(m, context, fixed))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        # a CKKS-encrypted global state is decrypted by fedmpt.apps.secure_aggregation first
        return client_evaluate(msg, context, fixed, lambda m: evaluate(m, context, fixed))

    return client_app


app = build_client_app()
