"""PASCAL VOC2007 as a 20-class multi-label dataset, labels from the XML annotations.

Layout (as unpacked from the official tars)::

    <root>/VOCdevkit/VOC2007/            (``root`` may also be the VOCdevkit or the VOC2007 folder itself)
        JPEGImages/<id>.jpg
        Annotations/<id>.xml
        ImageSets/Main/{train,val,trainval,test}.txt   (one image id per line)

Label of class ``c`` for an image: POSITIVE if the XML has a non-difficult ``<object>`` of class ``c``;
otherwise, if it has only *difficult* objects of class ``c``, the ``difficult`` option decides: ``"unknown"``
(default, UNKNOWN = -1: the VOC evaluation ignores difficult objects, so neither answer is right),
``"positive"`` or ``"negative"``; with no object of class ``c`` the label is NEGATIVE.

The XML files are the user's local dataset files, parsed with the standard library's ElementTree (not meant
for untrusted input; never feed it files received from peers).
"""

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Literal

import numpy as np

from fedmpt.data.classnames import VOC2007_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE, NEGATIVE, POSITIVE, UNKNOWN
from fedmpt.data.layout import read_lines, require_dir, require_split
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "trainval", "test")
DifficultPolicy = Literal["unknown", "positive", "negative"]
_DIFFICULT_LABEL = {"unknown": UNKNOWN, "positive": POSITIVE, "negative": NEGATIVE}

__all__ = ["SPLITS", "find_voc2007_dir", "load_voc2007", "parse_voc_annotation"]


def find_voc2007_dir(root: Path) -> Path:
    """Return the ``VOC2007`` folder: ``root/VOCdevkit/VOC2007``, ``root/VOC2007`` or ``root`` itself."""
    for candidate in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root):
        if (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise DatasetError(f"VOC2007 folder not found under {root}: expected {root / 'VOCdevkit/VOC2007/ImageSets/Main'}")


def parse_voc_annotation(path: Path, difficult: DifficultPolicy) -> np.ndarray:
    """Return the int8 label row of the VOC XML annotation ``path`` under the ``difficult`` policy.

    Raises:
        DatasetError: the XML is missing or malformed, or names a class outside the 20 VOC classes.
    """
    try:
        tree = ElementTree.parse(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"VOC annotation not found: {path}") from exc
    except (ElementTree.ParseError, OSError) as exc:
        raise DatasetError(f"malformed VOC annotation {path}: {exc}") from exc
    index = {name: i for i, name in enumerate(VOC2007_CLASSES)}
    has_plain = np.zeros(len(VOC2007_CLASSES), dtype=bool)
    has_difficult = np.zeros(len(VOC2007_CLASSES), dtype=bool)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DatasetError(f"VOC annotation {path}: unknown class {name!r}; VOC2007 classes are {VOC2007_CLASSES}")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DatasetError(f"VOC annotation {path}: <difficult> must be 0 or 1, got {flag!r}")
        (has_difficult if flag == "1" else has_plain)[index[name]] = True
    row = np.full(len(VOC2007_CLASSES), NEGATIVE, dtype=LABEL_DTYPE)
    row[has_difficult] = _DIFFICULT_LABEL[difficult]
    row[has_plain] = POSITIVE
    return row


@register_dataset("voc2007")
def load_voc2007(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    difficult: DifficultPolicy = "unknown",
) -> ImageFileDataset:
    """Load split ``split`` (train/val/trainval/test) of PASCAL VOC2007 from ``root``.

    ``difficult`` chooses the label of a class whose only instances in an image are marked difficult.
    """
    require_split("voc2007", split, SPLITS)
    if difficult not in _DIFFICULT_LABEL:
        raise ConfigError(f"voc2007 option difficult must be one of {sorted(_DIFFICULT_LABEL)}, got {difficult!r}")
    voc = find_voc2007_dir(Path(root))
    split_file = voc / "ImageSets" / "Main" / f"{split}.txt"
    ids = [line.split()[0] for line in read_lines(split_file, "VOC2007 split file")]
    annotations = require_dir(voc / "Annotations", "VOC2007 Annotations folder")
    images = voc / "JPEGImages"
    rows = [parse_voc_annotation(annotations / f"{image_id}.xml", difficult) for image_id in ids]
    labels = np.stack(rows) if rows else np.zeros((0, len(VOC2007_CLASSES)), dtype=LABEL_DTYPE)
    return ImageFileDataset.from_rows(
        name="voc2007",
        split=split,
        classnames=VOC2007_CLASSES,
        labels=labels,
        root=voc,
        paths=[images / f"{image_id}.jpg" for image_id in ids],
        source=split_file,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )
