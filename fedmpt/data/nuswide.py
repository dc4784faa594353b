"""NUS-WIDE as an 81-concept multi-label dataset, from the official image lists and per-concept label files.

Layout::

    <root>/ImageList/TrainImagelist.txt, TestImagelist.txt          (one image per line)
    <root>/TrainTestLabels/Labels_<concept>_Train.txt, ..._Test.txt  (one 0/1 per line, same order)
    <root>/Flickr/<folder>/<image>.jpg                               (the image archive, ``image_dir`` option)

Image-list lines are Windows paths such as ``actor\\0001_2124494179.jpg``; backslashes become ``/`` and
anything up to and including a ``Flickr`` component is dropped, so each image is read from
``<root>/<image_dir>/<folder>/<image>.jpg``. Splits: ``"train"``, ``"test"`` (the official 161,789 / 107,859
split). Label 1 is POSITIVE, 0 NEGATIVE (the 81 concepts were annotated exhaustively for every image); no
image is filtered out (the FedMPT authors' code keeps only images with many labels; we do not).
"""

from pathlib import Path, PurePosixPath

import numpy as np

from fedmpt.data.classnames import NUSWIDE_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE
from fedmpt.data.layout import read_lines, require_dir, require_split
from fedmpt.data.registry import register_dataset
from fedmpt.errors import DatasetError

SPLITS = ("train", "test")
_SPLIT_WORD = {"train": "Train", "test": "Test"}

__all__ = ["SPLITS", "load_nuswide", "nuswide_relative_path"]


def nuswide_relative_path(line: str) -> PurePosixPath:
    """Map an image-list line to the image's path relative to the image folder (``<folder>/<file>``)."""
    parts = [p for p in line.strip().replace("\\", "/").split("/") if p]
    lowered = [p.lower() for p in parts]
    if "flickr" in lowered:
        last = len(lowered) - 1 - lowered[::-1].index("flickr")
        parts = parts[last + 1 :]
    return PurePosixPath(*parts)


@register_dataset("nuswide")
def load_nuswide(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    image_dir: str = "Flickr",
) -> ImageFileDataset:
    """Load split ``split`` (train/test) of NUS-WIDE (81 concepts) from ``root``."""
    require_split("nuswide", split, SPLITS)
    root = Path(root)
    word = _SPLIT_WORD[split]
    list_file = root / "ImageList" / f"{word}Imagelist.txt"
    lines = read_lines(list_file, "NUS-WIDE image list")
    if not lines:
        raise DatasetError(f"dataset 'nuswide': split {split!r} is empty ({list_file} lists no images)")
    label_dir = require_dir(root / "TrainTestLabels", "NUS-WIDE TrainTestLabels folder")
    known = set(NUSWIDE_CLASSES)
    for extra in sorted(label_dir.glob(f"Labels_*_{word}.txt")):
        concept = extra.name[len("Labels_") : -len(f"_{word}.txt")]
        if concept not in known:
            raise DatasetError(f"NUS-WIDE label file {extra} is for unknown concept {concept!r}")
    labels = np.zeros((len(lines), len(NUSWIDE_CLASSES)), dtype=LABEL_DTYPE)
    for column, concept in enumerate(NUSWIDE_CLASSES):
        label_file = label_dir / f"Labels_{concept}_{word}.txt"
        values = read_lines(label_file, f"NUS-WIDE label file for concept {concept!r}")
        if len(values) != len(lines):
            raise DatasetError(
                f"NUS-WIDE label file {label_file} has {len(values)} lines but {list_file} lists {len(lines)} images"
            )
        for row, value in enumerate(values):
            if value not in ("0", "1"):
                raise DatasetError(f"NUS-WIDE label file {label_file} line {row + 1}: expected 0 or 1, got {value!r}")
            labels[row, column] = int(value)
    images = root / image_dir
    return ImageFileDataset.from_rows(
        name="nuswide",
        split=split,
        classnames=NUSWIDE_CLASSES,
        labels=labels,
        root=root,
        paths=[images / nuswide_relative_path(line) for line in lines],
        source=list_file,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )
