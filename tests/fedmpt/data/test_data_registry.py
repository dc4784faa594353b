"""The dataset registry and load_dataset's argument checking."""

from pathlib import Path

import numpy as np
import pytest

from fedmpt.data import DATASETS, ArrayImageDataset, MultiLabelDataset, load_dataset, register_dataset
from fedmpt.errors import ConfigError


def test_builtin_loaders_registered() -> None:
    builtin = {"voc2007", "coco2014", "coco2017", "nuswide", "chestxray14", "bigearthnet", "mlrsnet", "csv"}
    assert builtin <= set(DATASETS)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet'.*'voc2007'"):
        load_dataset("imagenet", "/nowhere", "train")


def test_bad_root_or_split_type() -> None:
    with pytest.raises(ConfigError, match="root"):
        load_dataset("voc2007", None, "train")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="split"):
        load_dataset("voc2007", "/nowhere", "")


def test_unknown_option_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"difficul.*accepts.*'difficult'"):
        load_dataset("voc2007", tmp_path, "train", difficul="unknown")
    with pytest.raises(ConfigError, match="accepts"):
        load_dataset("csv", tmp_path, "train", classnames_fle="x.txt")


def test_register_in_memory_dataset_and_reject_duplicates() -> None:
    def load_toy(
        root: Path,
        split: str,
        *,
        transform: object = None,
        skip_unreadable: bool = False,
        n: int = 2,
    ) -> MultiLabelDataset:
        images = np.zeros((n, 2, 2, 3), dtype=np.uint8)
        labels = np.eye(n, 2, dtype=np.int8)
        return ArrayImageDataset(name="toy", split=split, classnames=("a", "b"), labels=labels, images=images)

    try:
        register_dataset("toy-registry-test")(load_toy)
        register_dataset("toy-registry-test")(load_toy)  # re-registering the same function is harmless
        ds = load_dataset("toy-registry-test", "unused", "train", n=3)
        assert len(ds) == 3
        assert ds.labels.tolist() == np.eye(3, 2, dtype=np.int8).tolist()
        with pytest.raises(ConfigError, match="already registered"):
            register_dataset("toy-registry-test")(lambda root, split, **kw: None)
    finally:
        DATASETS.pop("toy-registry-test", None)
    with pytest.raises(ConfigError):
        register_dataset("  ")
