"""The synthetic world as a dataset of :func:`fedmpt.data.load_dataset` (name ``"synthetic"``).

``load_dataset("synthetic", root, split, num_clients=5, seed=0, ...)`` renders the split of the federated
benchmark (:func:`fedmpt.world.make_federated_world`) into an in-memory
:class:`~fedmpt.data.dataset.ArrayImageDataset`. ``root`` is unused (nothing is read from disk); splits are
``client<k>-train``, ``client<k>-test``, ``test-iid`` and ``test-decorrelated``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmpt.data.dataset import ArrayImageDataset, Transform
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError
from fedmpt.world.dataset import FederatedWorldConfig, WorldDataset, make_federated_world


def world_split(config: FederatedWorldConfig, split: str) -> WorldDataset:
    """The :class:`WorldDataset` of ``split`` in the benchmark built from ``config``."""
    world = make_federated_world(config)
    named = {"test-iid": world.test_in_distribution, "test-decorrelated": world.test_decorrelated}
    for k, client in enumerate(world.clients):
        named[f"client{k}-train"] = client.train
        named[f"client{k}-test"] = client.test
    if split not in named:
        raise ConfigError(f"unknown synthetic split {split!r}; known: {sorted(named)}")
    return named[split]


@register_dataset("synthetic")
def load_synthetic(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    **world_options: Any,
) -> ArrayImageDataset:
    """Render ``split`` of the synthetic benchmark; ``world_options`` are :class:`FederatedWorldConfig` fields."""
    try:
        config = FederatedWorldConfig(**world_options)
    except TypeError as err:
        raise ConfigError(f"bad synthetic world option: {err}") from err
    data = world_split(config, split)
    return ArrayImageDataset(
        name="synthetic",
        split=split,
        classnames=data.classnames,
        labels=data.labels,
        images=data.images(),
        transform=transform,
    )
