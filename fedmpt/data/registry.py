"""The dataset registry: names mapped to loader functions, and :func:`load_dataset`.

A loader is a function ``loader(root: Path, split: str, *, transform, skip_unreadable, **options)``
returning a :class:`~fedmpt.data.dataset.MultiLabelDataset`. Built-in loaders register themselves when
``fedmpt.data`` is imported; other packages add theirs with ``@register_dataset("name")`` (e.g. the
synthetic world). Options are checked against the loader's signature before it runs, so a misspelt option
is a :class:`ConfigError` naming it, not a ``TypeError`` from deep inside.
"""

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmpt.data.dataset import MultiLabelDataset, Transform
from fedmpt.errors import ConfigError

DatasetLoader = Callable[..., MultiLabelDataset]

#: Registered loaders by dataset name.
DATASETS: dict[str, DatasetLoader] = {}

__all__ = ["DATASETS", "DatasetLoader", "load_dataset", "register_dataset"]

_RESERVED = ("root", "split", "transform", "skip_unreadable")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering ``loader`` under ``name`` in :data:`DATASETS`.

    Raises:
        ConfigError: ``name`` is empty or already registered (to a different function).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        existing = DATASETS.get(name)
        if existing is not None and existing is not loader:
            raise ConfigError(f"dataset name {name!r} is already registered (to {existing.__qualname__})")
        DATASETS[name] = loader
        return loader

    return decorator


def load_dataset(
    name: str,
    root: str | Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    **options: Any,
) -> MultiLabelDataset:
    """Load split ``split`` of the dataset registered as ``name`` from ``root``.

    ``transform`` is applied to each RGB PIL image in ``__getitem__``; ``skip_unreadable`` drops rows whose
    image cannot be decoded (costs one decode of every image at load time); ``options`` are the loader's own
    keyword options (see ``docs/datasets.md``).

    Raises:
        ConfigError: unknown dataset name (the message lists the known ones) or unknown option.
        DatasetError: the files are missing, malformed or inconsistent (raised by the loader).
    """
    if not isinstance(root, (str, Path)):
        raise ConfigError(f"dataset root must be a path (str or Path), got {type(root).__name__}: {root!r}")
    if not isinstance(split, str) or not split:
        raise ConfigError(f"dataset split must be a non-empty string, got {split!r}")
    loader = DATASETS.get(name)
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    signature = inspect.signature(loader)
    try:
        signature.bind(Path(root), split, transform=transform, skip_unreadable=skip_unreadable, **options)
    except TypeError as exc:
        accepted = [p for p in signature.parameters if p not in _RESERVED]
        raise ConfigError(f"bad options {sorted(options)} for dataset {name!r} ({exc}); it accepts {accepted}") from exc
    dataset = loader(Path(root), split, transform=transform, skip_unreadable=skip_unreadable, **options)
    if not isinstance(dataset, MultiLabelDataset):
        raise ConfigError(f"loader for {name!r} returned {type(dataset).__name__}, not a MultiLabelDataset")
    return dataset
