"""The node config of a SuperNode (``--node-config``, or the simulation's virtual nodes): its partition.

Kept apart from :mod:`fedmpt.apps.config` so that a ClientApp can read it without importing the task (torch,
open_clip): the secure-aggregation stages after training need only this and the run config's secure-aggregation
keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmpt.errors import ConfigError, check_int


@dataclass(frozen=True)
class NodeConfig:
    """The partition a SuperNode serves: ``partition-id`` in [0, ``num-partitions``)."""

    partition_id: int
    num_partitions: int
    data_root: str = ""  # the site's own dataset folder (deployment), else "" (a partition of the run's dataset)

    def __post_init__(self) -> None:
        check_int("num-partitions", self.num_partitions, 1, where="node config")
        check_int("partition-id", self.partition_id, 0, where="node config")
        if not isinstance(self.data_root, str):
            raise ConfigError(f"node config 'data-root' must be a path string, got {self.data_root!r}")
        if self.partition_id >= self.num_partitions:
            raise ConfigError(
                f"node config 'partition-id' must be < num-partitions={self.num_partitions}, got {self.partition_id}"
            )


def read_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """The partition of this node from its node config (``partition-id``, ``num-partitions``).

    Raises:
        ConfigError: a key is missing or out of range (the message names it).
    """
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ConfigError(
            f"node config lacks {missing}; start the SuperNode with "
            f'--node-config "partition-id=<k> num-partitions=<n>", got {dict(node_config)!r}'
        )
    return NodeConfig(
        partition_id=node_config["partition-id"],
        num_partitions=node_config["num-partitions"],
        data_root=node_config.get("data-root", ""),
    )
