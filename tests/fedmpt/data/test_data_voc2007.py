"""PASCAL VOC2007 loader against a fixture in the genuine VOCdevkit layout."""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmpt.data import UNKNOWN, load_dataset
from fedmpt.data.classnames import VOC2007_CLASSES
from fedmpt.errors import ConfigError, DatasetError

# (image id, [(class, difficult)]) -- written to XML, expected labels worked out by hand below.
IMAGES = {
    "000005": [("chair", 0), ("chair", 1), ("diningtable", 1)],
    "000007": [("car", 0)],
    "000009": [("horse", 0), ("person", 0), ("person", 1)],
    "000012": [("tvmonitor", 1)],
}
SPLITS = {"train": ["000005", "000007"], "val": ["000009", "000012"], "test": ["000012"]}


def _xml(image_id: str, objects: list[tuple[str, int]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object>"
        for name, difficult in objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>12</width><height>8</height><depth>3</depth></size><segmented>0</segmented>{body}"
        "</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in IMAGES.items():
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
        make_image(voc / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in SPLITS.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    trainval = SPLITS["train"] + SPLITS["val"]
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    return tmp_path


def _row(
    positive: list[str], difficult_only: tuple[str, ...] | list[str] = (), value: int = UNKNOWN
) -> list[int]:
    row = [0] * 20
    for name in positive:
        row[VOC2007_CLASSES.index(name)] = 1
    for name in difficult_only:
        row[VOC2007_CLASSES.index(name)] = value
    return row


def test_trainval_labels_with_difficult_unknown(voc_root: Path) -> None:
    ds = load_dataset("voc2007", voc_root, "trainval")
    assert ds.classnames == VOC2007_CLASSES
    assert [p.name for p in ds.paths] == ["000005.jpg", "000007.jpg", "000009.jpg", "000012.jpg"]
    expected = [
        _row(["chair"], ["diningtable"]),  # a difficult chair next to a plain one stays positive
        _row(["car"]),
        _row(["horse", "person"]),
        _row([], ["tvmonitor"]),
    ]
    assert ds.labels.tolist() == expected
    assert ds[3][1].tolist() == expected[3]


@pytest.mark.parametrize(("policy", "value"), [("positive", 1), ("negative", 0)])
def test_difficult_policy(voc_root: Path, policy: str, value: int) -> None:
    ds = load_dataset("voc2007", voc_root, "train", difficult=policy)
    assert ds.labels.tolist() == [_row(["chair"], ["diningtable"], value), _row(["car"])]
    with pytest.raises(ConfigError, match="difficult"):
        load_dataset("voc2007", voc_root, "train", difficult="ignore")


def test_root_may_be_the_voc2007_folder(voc_root: Path) -> None:
    a = load_dataset("voc2007", voc_root, "val")
    b = load_dataset("voc2007", voc_root / "VOCdevkit" / "VOC2007", "val")
    assert a.fingerprint() == b.fingerprint()


def test_bad_split_and_missing_folder(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'trainval'"):
        load_dataset("voc2007", voc_root, "training")
    with pytest.raises(DatasetError, match="VOC2007 folder not found"):
        load_dataset("voc2007", tmp_path / "empty", "train")


def test_missing_annotation_and_split_file(voc_root: Path) -> None:
    voc = voc_root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations" / "000007.xml").unlink()
    with pytest.raises(DatasetError, match="000007.xml"):
        load_dataset("voc2007", voc_root, "train")
    (voc / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DatasetError, match="val.txt"):
        load_dataset("voc2007", voc_root, "val")


def test_unknown_class_in_annotation(voc_root: Path) -> None:
    path = voc_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000009.xml"
    path.write_text(_xml("000009", [("unicorn", 0)]))
    with pytest.raises(DatasetError, match=r"000009\.xml.*unknown class 'unicorn'"):
        load_dataset("voc2007", voc_root, "val")
    path.write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="malformed"):
        load_dataset("voc2007", voc_root, "val")


def test_empty_split(voc_root: Path) -> None:
    (voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("\n")
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        load_dataset("voc2007", voc_root, "test")


def test_missing_and_truncated_images(
    voc_root: Path,
    truncate: Callable[[Path], Path],
    make_image: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = voc_root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    (images / "000005.jpg").unlink()
    with pytest.raises(DatasetError, match="000005.jpg"):
        load_dataset("voc2007", voc_root, "trainval")
    truncate(make_image(images / "000009.jpg", size=(64, 48)))
    with caplog.at_level(logging.WARNING, logger="fedmpt.data.dataset"):
        ds = load_dataset("voc2007", voc_root, "trainval", skip_unreadable=True)
    assert [p.name for p in ds.skipped] == ["000005.jpg", "000009.jpg"]
    assert [p.name for p in ds.paths] == ["000007.jpg", "000012.jpg"]
    assert ds.labels.tolist() == [_row(["car"]), _row([], ["tvmonitor"])]
    assert "skipped 2 unreadable image(s) of 4" in caplog.text
    # Without skipping, the truncated file fails when read, naming itself.
    (images / "000005.jpg").write_bytes((images / "000007.jpg").read_bytes())
    ds = load_dataset("voc2007", voc_root, "val")
    with pytest.raises(DatasetError, match="000009.jpg"):
        ds[0]
    assert np.asarray(ds[1][0]).shape == (8, 12, 3)
