"""BigEarthNet-S2 (v1.0) as a multi-label dataset: RGB from bands B04/B03/B02, labels from the metadata JSON.

Layout (as unpacked from ``BigEarthNet-S2-v1.0.tar.gz``)::

    <root>/<patch>/<patch>_B02.tif, _B03.tif, _B04.tif, ...   (120 x 120 px, uint16, 10 m bands)
    <root>/<patch>/<patch>_labels_metadata.json               ({"labels": [43-class CORINE names], ...})
    <split_dir>/{train,val,test}.csv       (one patch name per line; split_dir defaults to root)

The split CSVs are the official train/val/test lists of Sumbul et al. (which already leave out the patches
covered by seasonal snow, clouds or shadow); any ``<split>.csv`` of patch names works, so other splits are
files, not code. A first row reading ``name``/``patch``/``patch_name`` is taken as a header.

Nomenclature (``nomenclature`` option): ``"19"`` (default) maps each original label to the 19-class
nomenclature of Sumbul et al. (2021); labels without a 19-class counterpart (e.g. "Airports") are dropped, and
a patch left with none keeps an all-NEGATIVE row (we do not filter). ``"43"`` keeps the original labels.

RGB: each band's digital number (L2A surface reflectance x 10000) is mapped linearly to 8 bits as
``round(255 * clip(DN / white_point, 0, 1))`` with one fixed ``white_point`` (default 3000, i.e. reflectance
0.3) for all bands and patches -- no per-image stretching, so the same scene looks the same on every client.
"""

import json
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fedmpt.data.classnames import BIGEARTHNET19_CLASSES, BIGEARTHNET43_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE, NEGATIVE, POSITIVE
from fedmpt.data.layout import read_lines, require_dir
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

RGB_BANDS = ("B04", "B03", "B02")
DEFAULT_WHITE_POINT = 3000.0
Nomenclature = Literal["19", "43"]
_HEADER_WORDS = frozenset({"name", "patch", "patch_name"})

#: Which original (43-class) labels each of the 19 classes merges; unlisted originals have no 19-class label.
BIGEARTHNET19_FROM_43: dict[str, tuple[str, ...]] = {
    "Urban fabric": ("Continuous urban fabric", "Discontinuous urban fabric"),
    "Industrial or commercial units": ("Industrial or commercial units",),
    "Arable land": ("Non-irrigated arable land", "Permanently irrigated land", "Rice fields"),
    "Permanent crops": (
        "Vineyards",
        "Fruit trees and berry plantations",
        "Olive groves",
        "Annual crops associated with permanent crops",
    ),
    "Pastures": ("Pastures",),
    "Complex cultivation patterns": ("Complex cultivation patterns",),
    "Land principally occupied by agriculture, with significant areas of natural vegetation": (
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    ),
    "Agro-forestry areas": ("Agro-forestry areas",),
    "Broad-leaved forest": ("Broad-leaved forest",),
    "Coniferous forest": ("Coniferous forest",),
    "Mixed forest": ("Mixed forest",),
    "Natural grassland and sparsely vegetated areas": ("Natural grassland", "Sparsely vegetated areas"),
    "Moors, heathland and sclerophyllous vegetation": ("Moors and heathland", "Sclerophyllous vegetation"),
    "Transitional woodland, shrub": ("Transitional woodland/shrub",),
    "Beaches, dunes, sands": ("Beaches, dunes, sands",),
    "Inland wetlands": ("Inland marshes", "Peatbogs"),
    "Coastal wetlands": ("Salt marshes", "Salines"),
    "Inland waters": ("Water courses", "Water bodies"),
    "Marine waters": ("Coastal lagoons", "Estuaries", "Sea and ocean"),
}

__all__ = [
    "BIGEARTHNET19_FROM_43",
    "DEFAULT_WHITE_POINT",
    "RGB_BANDS",
    "load_bigearthnet",
    "read_bigearthnet_labels",
    "read_bigearthnet_rgb",
]


def read_bigearthnet_rgb(patch_dir: Path, white_point: float = DEFAULT_WHITE_POINT) -> Image.Image:
    """Return the RGB image of a BigEarthNet-S2 patch folder from its B04, B03, B02 GeoTIFFs.

    ``uint8 = round(255 * clip(DN / white_point, 0, 1))`` per band (see the module docstring).

    Raises:
        DatasetError: a band file is missing, unreadable, not single-band, or the three sizes differ.
    """
    channels = []
    for band in RGB_BANDS:
        path = patch_dir / f"{patch_dir.name}_{band}.tif"
        try:
            with Image.open(path) as image:
                image.load()
                values = np.asarray(image, dtype=np.float64)
        except FileNotFoundError as exc:
            raise DatasetError(f"BigEarthNet band file not found: {path}") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot read BigEarthNet band file {path}: {exc}") from exc
        if values.ndim != 2:
            raise DatasetError(f"BigEarthNet band file {path} is not single-band (array shape {values.shape})")
        channels.append(values)
    if len({c.shape for c in channels}) != 1:
        raise DatasetError(
            f"BigEarthNet patch {patch_dir}: bands {RGB_BANDS} differ in size {[c.shape for c in channels]}"
        )
    scaled = np.rint(255.0 * np.clip(np.stack(channels, axis=-1) / white_point, 0.0, 1.0)).astype(np.uint8)
    return Image.fromarray(scaled)


def read_bigearthnet_labels(patch_dir: Path) -> list[str]:
    """Return the original (43-class) labels listed in ``<patch>/<patch>_labels_metadata.json``.

    Raises:
        DatasetError: the file is missing or malformed, or lists a label outside the 43 original ones.
    """
    path = patch_dir / f"{patch_dir.name}_labels_metadata.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"BigEarthNet label metadata not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"malformed BigEarthNet label metadata {path}: {exc}") from exc
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DatasetError(f"BigEarthNet label metadata {path} has no list of strings under 'labels'")
    known = set(BIGEARTHNET43_CLASSES)
    for label in labels:
        if label not in known:
            raise DatasetError(f"BigEarthNet label metadata {path}: unknown label {label!r}")
    return labels


def _read_patch_names(split_file: Path) -> list[str]:
    names = [line.split(",")[0].strip() for line in read_lines(split_file, "BigEarthNet split CSV")]
    if names and names[0].lower() in _HEADER_WORDS:
        names = names[1:]
    return names


@register_dataset("bigearthnet")
def load_bigearthnet(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    split_dir: str | Path | None = None,
    nomenclature: Nomenclature = "19",
    white_point: float = DEFAULT_WHITE_POINT,
) -> ImageFileDataset:
    """Load the patches listed in ``<split_dir>/<split>.csv`` from the BigEarthNet-S2 folder ``root``."""
    if nomenclature not in ("19", "43"):
        raise ConfigError(f"bigearthnet option nomenclature must be '19' or '43', got {nomenclature!r}")
    if not white_point > 0:
        raise ConfigError(f"bigearthnet option white_point must be > 0, got {white_point!r}")
    if not split or "/" in split or "\\" in split:
        raise ConfigError(f"bigearthnet split must be a plain file stem such as 'train', got {split!r}")
    root = require_dir(Path(root), "BigEarthNet-S2 root folder")
    split_file = (Path(split_dir) if split_dir is not None else root) / f"{split}.csv"
    names = _read_patch_names(split_file)
    if nomenclature == "19":
        classnames = BIGEARTHNET19_CLASSES
        column = {old: BIGEARTHNET19_CLASSES.index(new) for new, olds in BIGEARTHNET19_FROM_43.items() for old in olds}
    else:
        classnames = BIGEARTHNET43_CLASSES
        column = {name: i for i, name in enumerate(BIGEARTHNET43_CLASSES)}
    labels = np.full((len(names), len(classnames)), NEGATIVE, dtype=LABEL_DTYPE)
    patch_dirs = [root / name for name in names]
    for row, patch_dir in enumerate(patch_dirs):
        if not patch_dir.is_dir():
            if skip_unreadable:
                continue  # from_rows drops it (its reader fails) and records it in `skipped`
            raise DatasetError(f"BigEarthNet patch folder not found: {patch_dir} (listed in {split_file})")
        for label in read_bigearthnet_labels(patch_dir):
            if label in column:
                labels[row, column[label]] = POSITIVE
    return ImageFileDataset.from_rows(
        name="bigearthnet",
        split=split,
        classnames=classnames,
        labels=labels,
        root=root,
        paths=patch_dirs,
        source=split_file,
        transform=transform,
        reader=partial(read_bigearthnet_rgb, white_point=float(white_point)),
        skip_unreadable=skip_unreadable,
    )
