"""MS-COCO loader: a hand-made 2014-layout fixture, and the genuine coco_tiny sample (2017 naming)."""

import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmpt.data import load_dataset
from fedmpt.data.classnames import COCO_CLASSES
from fedmpt.errors import ConfigError, DatasetError

# Official COCO category ids run 1..90 with gaps; these are the real ids of the 80 classes.
COCO_IDS = [
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
]  # fmt: skip


def _categories() -> list[dict[str, Any]]:
    # Written in reverse order: the loader must sort by id, not trust the file's order.
    return [
        {"id": i, "name": n, "supercategory": "x"}
        for i, n in reversed(list(zip(COCO_IDS, COCO_CLASSES, strict=True)))
    ]


def _write_coco2014(root: Path, make_image: Callable[..., Path], annotations: list[dict[str, Any]]) -> None:
    images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 12, "height": 8},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 12, "height": 8},
        {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "width": 12, "height": 8},
    ]
    for image in images:
        make_image(root / "val2014" / image["file_name"])
    data = {"images": images, "annotations": annotations, "categories": _categories()}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))


def _ann(image_id: int, category_id: int, crowd: int = 0) -> dict[str, Any]:
    return {"id": 1, "image_id": image_id, "category_id": category_id, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}


def test_coco2014_fixture(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    # image 42: person (id 1) twice + toothbrush (id 90); image 7: traffic light (id 10), crowd;
    # image 99: no annotation at all -> kept as an all-negative row.
    _write_coco2014(tmp_path, make_image, [_ann(42, 1), _ann(42, 1), _ann(42, 90), _ann(7, 10, crowd=1)])
    ds = load_dataset("coco2014", tmp_path, "val")
    assert ds.name == "coco2014"
    assert ds.classnames == COCO_CLASSES
    assert [p.name for p in ds.paths] == [
        "COCO_val2014_000000000007.jpg",
        "COCO_val2014_000000000042.jpg",
        "COCO_val2014_000000000099.jpg",
    ]
    positives = [sorted(ds.classnames[c] for c in range(80) if ds.labels[r, c] == 1) for r in range(3)]
    assert positives == [["traffic light"], ["person", "toothbrush"], []]
    assert int(ds.labels.min()) == 0  # exhaustive annotation: no unknowns
    no_crowd = load_dataset("coco2014", tmp_path, "val", include_crowd=False)
    assert no_crowd.labels[0].tolist() == [0] * 80


def test_coco_bad_annotations(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    _write_coco2014(tmp_path, make_image, [_ann(5, 1)])
    with pytest.raises(DatasetError, match="unknown image id 5"):
        load_dataset("coco2014", tmp_path, "val")
    _write_coco2014(tmp_path, make_image, [_ann(42, 12)])  # 12 is one of COCO's unused ids
    with pytest.raises(DatasetError, match="unknown category id 12"):
        load_dataset("coco2014", tmp_path, "val")
    path = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "tooth brush"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"unknown \['tooth brush'\], missing \['toothbrush'\]"):
        load_dataset("coco2014", tmp_path, "val")
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="malformed"):
        load_dataset("coco2014", tmp_path, "val")
    with pytest.raises(DatasetError, match="instances_train2014.json"):
        load_dataset("coco2014", tmp_path, "train")
    with pytest.raises(ConfigError, match="test"):
        load_dataset("coco2014", tmp_path, "test")


def test_coco_empty_split(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    data = {"images": [], "annotations": [], "categories": _categories()}
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        load_dataset("coco2014", tmp_path, "val")


def _independent_counts(annotation_file: Path) -> tuple[int, dict[str, int]]:
    """Images per category name, counted straight from the JSON with sets (no label matrix)."""
    data = json.loads(annotation_file.read_text())
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    images_with = defaultdict(set)
    for annotation in data["annotations"]:
        images_with[name_of[annotation["category_id"]]].add(annotation["image_id"])
    return len(data["images"]), {name: len(ids) for name, ids in images_with.items()}


@pytest.mark.needs_coco_tiny
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_tiny_matches_independent_count(coco_tiny: Path, split: str) -> None:
    ds = load_dataset("coco2017", coco_tiny, split)
    n_images, counts = _independent_counts(coco_tiny / "annotations" / f"instances_{split}2017.json")
    assert len(ds) == n_images == 80
    assert {name: int(ds.labels[:, c].sum()) for c, name in enumerate(ds.classnames)} == {
        name: counts.get(name, 0) for name in COCO_CLASSES
    }
    assert all(p.is_file() and p.parent.name == f"{split}2017" for p in ds.paths)
    image, row = ds[0]
    assert image.mode == "RGB" and row.shape == (80,)


@pytest.mark.needs_coco_tiny
def test_coco_tiny_categories_equal_builtin_list(coco_tiny: Path) -> None:
    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    assert tuple(c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])) == COCO_CLASSES
    assert [c["id"] for c in sorted(data["categories"], key=lambda c: c["id"])] == COCO_IDS


@pytest.mark.needs_coco_tiny
def test_coco_tiny_in_2014_naming(coco_tiny: Path, tmp_path: Path) -> None:
    # The same genuine images and annotations laid out with the 2014 names.
    (tmp_path / "annotations").mkdir()
    shutil.copy(
        coco_tiny / "annotations" / "instances_val2017.json",
        tmp_path / "annotations" / "instances_val2014.json",
    )
    (tmp_path / "val2014").symlink_to(coco_tiny / "val2017", target_is_directory=True)
    a = load_dataset("coco2014", tmp_path, "val")
    b = load_dataset("coco2017", coco_tiny, "val")
    assert (a.labels == b.labels).all()
    assert [p.name for p in a.paths] == [p.name for p in b.paths]
