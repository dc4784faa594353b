"""MLRSNet loader against a fixture in the release layout (labels/<category>.csv, Images/<category>/)."""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.data import load_dataset
from fedmpt.data.classnames import MLRSNET_CLASSES
from fedmpt.data.mlrsnet import hash_split
from fedmpt.errors import ConfigError, DatasetError

# The release's header order is the canonical order; the fixture shuffles it to check matching by name.
SHUFFLED = tuple(np.random.default_rng(3).permutation(MLRSNET_CLASSES).tolist())


def _write_csv(path: Path, rows: dict[str, set[str]], header: tuple[str, ...] = SHUFFLED) -> None:
    lines = ["image," + ",".join(header)]
    lines += [
        name + "," + ",".join(str(int(c in positives)) for c in header) for name, positives in rows.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


ROWS = {
    "airplane": {f"airplane_{i:05d}.jpg": {"airplane", "cars", "pavement"} for i in range(1, 21)},
    "harbor&port": {f"harbor&port_{i:05d}.jpg": {"habor", "ships", "water"} for i in range(1, 21)},
}


@pytest.fixture
def mlrs_root(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    for category, rows in ROWS.items():
        _write_csv(tmp_path / "labels" / f"{category}.csv", rows)
        for name in rows:
            make_image(tmp_path / "Images" / category / name, size=(4, 4))
    return tmp_path


def test_all_split_labels_by_column_name(mlrs_root: Path) -> None:
    ds = load_dataset("mlrsnet", mlrs_root, "all")
    assert ds.classnames == MLRSNET_CLASSES
    assert len(ds) == 40
    for row, path in enumerate(ds.paths):
        category = path.parent.name
        expected = ROWS[category][path.name]
        assert {MLRSNET_CLASSES[c] for c in np.flatnonzero(ds.labels[row] == 1)} == expected


def test_hash_split_partitions_and_follows_the_documented_rule(mlrs_root: Path) -> None:
    parts = {s: load_dataset("mlrsnet", mlrs_root, s, split_seed=5) for s in ("train", "val", "test")}
    keys = {s: {f"{p.parent.name}/{p.name}" for p in ds.paths} for s, ds in parts.items()}
    assert sum(len(k) for k in keys.values()) == 40
    assert set.union(*keys.values()) == {f"{c}/{n}" for c, rows in ROWS.items() for n in rows}
    for split, members in keys.items():
        for key in members:
            u = int(hashlib.sha256(f"5:{key}".encode()).hexdigest()[:16], 16) / 2**64
            assert split == ("test" if u < 0.2 else "val" if u < 0.3 else "train")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.0, 0.5), st.floats(0.0, 0.45))
def test_hash_split_fractions(seed: int, val_fraction: float, test_fraction: float) -> None:
    # 4000 keys: each fraction's count is Binomial(4000, p); 6 standard deviations (plus 1) bound it with a
    # false-positive rate below 1e-8 per check.
    n = 4000
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(n):
        counts[hash_split(f"k/{i}", seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)] += 1
    for split, p in (("val", val_fraction), ("test", test_fraction)):
        assert abs(counts[split] - n * p) <= 6 * np.sqrt(n * p * (1 - p)) + 1


def test_split_file(mlrs_root: Path) -> None:
    split_file = mlrs_root / "fold0.txt"
    split_file.write_text("harbor&port/harbor&port_00003.jpg\nairplane/airplane_00001.jpg\n")
    ds = load_dataset("mlrsnet", mlrs_root, "fold0", split_file=split_file)
    assert [p.name for p in ds.paths] == ["harbor&port_00003.jpg", "airplane_00001.jpg"]
    split_file.write_text("airplane/airplane_99999.jpg\n")
    with pytest.raises(DatasetError, match="not in any label CSV, first 'airplane/airplane_99999.jpg'"):
        load_dataset("mlrsnet", mlrs_root, "fold0", split_file=split_file)


def test_unknown_or_missing_column(mlrs_root: Path) -> None:
    csv_path = mlrs_root / "labels" / "airplane.csv"
    _write_csv(csv_path, {"airplane_00001.jpg": {"airplane"}}, header=("harbor", *MLRSNET_CLASSES[1:]))
    with pytest.raises(DatasetError, match=r"airplane\.csv: unknown label column\(s\) \['harbor'\]"):
        load_dataset("mlrsnet", mlrs_root, "all")
    _write_csv(csv_path, {"airplane_00001.jpg": {"airplane"}}, header=MLRSNET_CLASSES[1:])
    with pytest.raises(DatasetError, match=r"missing: \['airplane'\]"):
        load_dataset("mlrsnet", mlrs_root, "all")
    csv_path.write_text("image," + ",".join(MLRSNET_CLASSES) + "\nairplane_00001.jpg" + ",2" * 60 + "\n")
    with pytest.raises(DatasetError, match="line 2: expected 0 or 1, got '2'"):
        load_dataset("mlrsnet", mlrs_root, "all")


def test_bad_arguments_and_missing_folders(mlrs_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fold1"):
        load_dataset("mlrsnet", mlrs_root, "fold1")
    with pytest.raises(ConfigError, match="sum < 1"):
        load_dataset("mlrsnet", mlrs_root, "train", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DatasetError, match="label CSV folder not found"):
        load_dataset("mlrsnet", tmp_path / "nothing", "all")
    (mlrs_root / "Images" / "airplane" / "airplane_00002.jpg").unlink()
    with pytest.raises(DatasetError, match="airplane_00002.jpg"):
        load_dataset("mlrsnet", mlrs_root, "all")


def test_empty_split(mlrs_root: Path) -> None:
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        load_dataset("mlrsnet", mlrs_root, "val", val_fraction=0.0)
