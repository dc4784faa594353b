"""MS-COCO (2014 or 2017 file naming) as an 80-class multi-label dataset, labels from instance annotations.

Layout (as unpacked from the official zips)::

    <root>/annotations/instances_{train,val}{2014,2017}.json
    <root>/{train,val}{2014,2017}/<file_name from the JSON>

Registered as ``"coco2014"`` and ``"coco2017"`` (same images and categories, different file names and
train/val assignment). Splits: ``"train"``, ``"val"``.

Rows are the JSON's ``images`` sorted by image id; *every* image is kept, including those with no annotation
(all-negative rows) -- unlike the FedMPT authors' code, we do not drop images with few labels. Class ``c`` is
POSITIVE for an image when at least one instance annotation of category ``c`` refers to it (crowd annotations
count unless ``include_crowd=False``), else NEGATIVE: COCO's 80 categories are exhaustively annotated, so
there is no UNKNOWN. Columns follow category id order, and the JSON's category names must equal
:data:`~fedmpt.data.classnames.COCO_CLASSES`.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmpt.data.classnames import COCO_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE, NEGATIVE, POSITIVE
from fedmpt.data.layout import require_dir, require_file, require_split
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

SPLITS = ("train", "val")
YEARS = (2014, 2017)

__all__ = ["SPLITS", "YEARS", "coco_labels_from_json", "load_coco"]


def _read_json(path: Path) -> dict[str, Any]:
    require_file(path, "COCO annotation file")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"malformed COCO annotation file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DatasetError(f"COCO annotation file {path} lacks one of 'images', 'annotations', 'categories'")
    return data


def coco_labels_from_json(
    data: dict[str, Any], *, source: Path, include_crowd: bool = True
) -> tuple[list[str], np.ndarray]:
    """Return ``(file_names, labels)`` from a parsed COCO instances JSON, rows sorted by image id.

    Raises:
        DatasetError: the categories are not the 80 COCO categories, or an annotation refers to an unknown
            image or category id.
    """
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        category_names = tuple(str(c["name"]) for c in categories)
        column = {int(c["id"]): i for i, c in enumerate(categories)}
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        row_of = {int(im["id"]): i for i, im in enumerate(images)}
        file_names = [str(im["file_name"]) for im in images]
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"COCO annotation file {source}: malformed image or category record ({exc!r})") from exc
    if category_names != COCO_CLASSES:
        unknown = sorted(set(category_names) - set(COCO_CLASSES))
        missing = sorted(set(COCO_CLASSES) - set(category_names))
        raise DatasetError(
            f"COCO annotation file {source}: categories (by id) differ from the 80 COCO classes: "
            f"unknown {unknown}, missing {missing}"
            + ("" if unknown or missing else " (same names, different id order)")
        )
    labels = np.full((len(images), len(categories)), NEGATIVE, dtype=LABEL_DTYPE)
    for annotation in data["annotations"]:
        try:
            image_id = int(annotation["image_id"])
            category_id = int(annotation["category_id"])
            crowd = bool(annotation.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"COCO annotation file {source}: malformed annotation {annotation!r:.200}") from exc
        if image_id not in row_of:
            raise DatasetError(f"COCO annotation file {source}: annotation refers to unknown image id {image_id}")
        if category_id not in column:
            raise DatasetError(f"COCO annotation file {source}: annotation has unknown category id {category_id}")
        if crowd and not include_crowd:
            continue
        labels[row_of[image_id], column[category_id]] = POSITIVE
    return file_names, labels


def load_coco(
    root: Path,
    split: str,
    *,
    year: int,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    include_crowd: bool = True,
) -> ImageFileDataset:
    """Load split ``split`` (train/val) of MS-COCO ``year`` (2014 or 2017 naming) from ``root``."""
    require_split(f"coco{year}", split, SPLITS)
    if year not in YEARS:
        raise ConfigError(f"COCO year must be one of {YEARS}, got {year!r}")
    root = Path(root)
    annotation_file = root / "annotations" / f"instances_{split}{year}.json"
    data = _read_json(annotation_file)
    file_names, labels = coco_labels_from_json(data, source=annotation_file, include_crowd=include_crowd)
    image_dir = require_dir(root / f"{split}{year}", f"COCO {split}{year} image folder")
    return ImageFileDataset.from_rows(
        name=f"coco{year}",
        split=split,
        classnames=COCO_CLASSES,
        labels=labels,
        root=root,
        paths=[image_dir / name for name in file_names],
        source=annotation_file,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )


@register_dataset("coco2014")
def load_coco2014(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    include_crowd: bool = True,
) -> ImageFileDataset:
    """Load MS-COCO with 2014 file naming (``instances_train2014.json``, ``train2014/``)."""
    return load_coco(
        root,
        split,
        year=2014,
        transform=transform,
        skip_unreadable=skip_unreadable,
        include_crowd=include_crowd,
    )


@register_dataset("coco2017")
def load_coco2017(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    include_crowd: bool = True,
) -> ImageFileDataset:
    """Load MS-COCO with 2017 file naming (``instances_train2017.json``, ``train2017/``)."""
    return load_coco(
        root,
        split,
        year=2017,
        transform=transform,
        skip_unreadable=skip_unreadable,
        include_crowd=include_crowd,
    )
