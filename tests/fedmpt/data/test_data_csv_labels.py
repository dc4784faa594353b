"""The generic ``path,labels`` CSV loader."""

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmpt.data import check_same_classnames, load_dataset
from fedmpt.errors import ConfigError, DatasetError


@pytest.fixture
def csv_root(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    for name in ("a.png", "b.png", "sub/c.png"):
        make_image(tmp_path / "img" / name)
    (tmp_path / "train.csv").write_text("path,labels\nimg/a.png,dog|cat\nimg/b.png,\nimg/sub/c.png, bird \n")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\nfish\n")
    return tmp_path


def test_union_class_list(csv_root: Path) -> None:
    ds = load_dataset("csv", csv_root, "train")
    assert ds.classnames == ("bird", "cat", "dog")
    assert ds.labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert ds.paths[2] == csv_root / "img" / "sub" / "c.png"
    assert ds[2][0].size == (12, 8)


def test_explicit_class_list(csv_root: Path) -> None:
    ds = load_dataset("csv", csv_root, "train", classnames_file="classes.txt", dataset_name="pets")
    assert ds.name == "pets"
    assert ds.classnames == ("cat", "dog", "bird", "fish")
    assert ds.labels.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    same = load_dataset(
        "csv", csv_root, "train", classnames=("cat", "dog", "bird", "fish"), dataset_name="pets"
    )
    assert same.fingerprint() == ds.fingerprint()


def test_custom_separator_and_csv_file(csv_root: Path) -> None:
    (csv_root / "other.csv").write_text("labels,path\ncat;dog,img/a.png\n")
    ds = load_dataset("csv", csv_root, "x", csv_file="other.csv", separator=";")
    assert ds.classnames == ("cat", "dog") and ds.labels.tolist() == [[1, 1]]
    with pytest.raises(ConfigError, match="separator"):
        load_dataset("csv", csv_root, "train", separator=",")


def test_unknown_class_with_explicit_list(csv_root: Path) -> None:
    (csv_root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"train\.csv line 4: unknown class 'bird'"):
        load_dataset("csv", csv_root, "train", classnames_file="classes.txt")


def test_union_lists_differ_between_clients(csv_root: Path) -> None:
    (csv_root / "client2.csv").write_text("path,labels\nimg/a.png,cat|fish\n")
    one = load_dataset("csv", csv_root, "train")
    two = load_dataset("csv", csv_root, "c2", csv_file="client2.csv")
    with pytest.raises(DatasetError, match=r"only in #1: \['fish'\]; only in #0: \['bird', 'dog'\]"):
        check_same_classnames([one, two])


def test_bad_files(
    csv_root: Path, truncate: Callable[[Path], Path], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(DatasetError, match="test.csv"):
        load_dataset("csv", csv_root, "test")
    (csv_root / "bad.csv").write_text("file,labels\na.png,cat\n")
    with pytest.raises(DatasetError, match="needs columns 'path' and 'labels'"):
        load_dataset("csv", csv_root, "bad", csv_file="bad.csv")
    (csv_root / "empty.csv").write_text("path,labels\n")
    with pytest.raises(DatasetError, match="no class names"):
        load_dataset("csv", csv_root, "e", csv_file="empty.csv")
    with pytest.raises(DatasetError, match="split 'e' is empty"):
        load_dataset("csv", csv_root, "e", csv_file="empty.csv", classnames=("cat",))
    truncate(csv_root / "img" / "b.png")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("csv", csv_root, "train", skip_unreadable=True)
    assert ds.skipped == [csv_root / "img" / "b.png"]
    assert "skipped 1 unreadable image(s) of 3" in caplog.text
    with pytest.raises(ConfigError, match="exclusive"):
        load_dataset("csv", csv_root, "train", classnames=("a",), classnames_file="classes.txt")
