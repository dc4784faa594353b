"""MLRSNet as a 60-label multi-label dataset, from its per-category label CSVs.

Layout (as in the official release)::

    <root>/labels/<category>.csv     (header: ``image,<60 label names>``; one row of 0/1 per image)
    <root>/Images/<category>/<image> (each category's archive extracted into a folder named like its CSV)

Columns are matched by name (header spelling, e.g. ``"habor"``) and reordered to
:data:`~fedmpt.data.classnames.MLRSNET_CLASSES`; a header with an unknown or missing label name is an error.

Splits. MLRSNet has no official split. Either pass ``split_file`` (one ``<category>/<image>`` per line; the
rows listed there form the split, whatever its name), or use the built-in deterministic split: each image goes
to ``"test"`` when ``u < test_fraction``, to ``"val"`` when ``u < test_fraction + val_fraction``, else to
``"train"``, where ``u = int(sha256(f"{split_seed}:{category}/{image}")[:16], 16) / 2**64`` is uniform on
[0, 1). The assignment of an image never depends on the other images (adding files moves nothing) nor on any
RNG state; fractions hold in expectation, not exactly, and the split is not stratified. ``"all"`` returns
every image.
"""

import csv
import hashlib
from pathlib import Path

import numpy as np

from fedmpt.data.classnames import MLRSNET_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE
from fedmpt.data.layout import read_lines, require_dir, require_split
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test", "all")

__all__ = ["SPLITS", "hash_split", "load_mlrsnet", "read_mlrsnet_csv"]


def hash_split(key: str, *, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Return ``"train"``, ``"val"`` or ``"test"`` for ``key`` by the seeded hash rule (module docstring)."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_mlrsnet_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Return ``(image names, int8 labels in MLRSNET_CLASSES order)`` from one category label CSV.

    Raises:
        DatasetError: unknown or missing label columns, a duplicated column, or a value other than 0/1.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read MLRSNet label CSV {path}: {exc}") from exc
    if not rows:
        raise DatasetError(f"MLRSNet label CSV {path} is empty (no header)")
    header = [h.strip() for h in rows[0][1:]]
    unknown = sorted(set(header) - set(MLRSNET_CLASSES))
    if unknown:
        raise DatasetError(f"MLRSNet label CSV {path}: unknown label column(s) {unknown}")
    missing = sorted(set(MLRSNET_CLASSES) - set(header))
    if missing or len(header) != len(MLRSNET_CLASSES):
        raise DatasetError(f"MLRSNet label CSV {path}: missing or repeated label columns (missing: {missing})")
    order = np.asarray([header.index(name) for name in MLRSNET_CLASSES], dtype=np.intp)
    names: list[str] = []
    labels = np.zeros((len(rows) - 1, len(MLRSNET_CLASSES)), dtype=LABEL_DTYPE)
    for number, row in enumerate(rows[1:]):
        if len(row) != len(header) + 1:
            raise DatasetError(
                f"MLRSNet label CSV {path} line {number + 2}: {len(row)} fields, expected {len(header) + 1}"
            )
        values = [v.strip() for v in row[1:]]
        bad = next((v for v in values if v not in ("0", "1")), None)
        if bad is not None:
            raise DatasetError(f"MLRSNet label CSV {path} line {number + 2}: expected 0 or 1, got {bad!r}")
        labels[number] = np.asarray(values, dtype=np.int8)[order]
        names.append(row[0].strip())
    return names, labels


@register_dataset("mlrsnet")
def load_mlrsnet(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    split_file: str | Path | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    labels_dir: str = "labels",
    images_dir: str = "Images",
) -> ImageFileDataset:
    """Load split ``split`` of MLRSNet from ``root`` (see the module docstring for the split rules)."""
    if split_file is None:
        require_split("mlrsnet", split, SPLITS)
        if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"mlrsnet needs val_fraction >= 0, test_fraction >= 0 and their sum < 1, "
                f"got {val_fraction!r} and {test_fraction!r}"
            )
    root = Path(root)
    label_root = require_dir(root / labels_dir, "MLRSNet label CSV folder")
    csv_files = sorted(label_root.glob("*.csv"))
    if not csv_files:
        raise DatasetError(f"MLRSNet label CSV folder {label_root} holds no .csv files")
    keys: list[str] = []
    blocks: list[np.ndarray] = []
    for csv_file in csv_files:
        names, labels = read_mlrsnet_csv(csv_file)
        keys.extend(f"{csv_file.stem}/{name}" for name in names)
        blocks.append(labels)
    all_labels = np.concatenate(blocks)
    if split_file is not None:
        split_path = Path(split_file)
        wanted = read_lines(split_path, "MLRSNet split file")
        position = {key: i for i, key in enumerate(keys)}
        unknown = [w for w in wanted if w not in position]
        if unknown:
            raise DatasetError(
                f"MLRSNet split file {split_path}: {len(unknown)} entries not in any label CSV, first {unknown[0]!r}"
            )
        selected = [position[w] for w in wanted]
        source = split_path
    else:
        selected = [
            i
            for i, key in enumerate(keys)
            if split == "all"
            or hash_split(key, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction) == split
        ]
        source = label_root
    images = root / images_dir
    return ImageFileDataset.from_rows(
        name="mlrsnet",
        split=split,
        classnames=MLRSNET_CLASSES,
        labels=all_labels[selected] if selected else np.zeros((0, len(MLRSNET_CLASSES)), LABEL_DTYPE),
        root=root,
        paths=[images / keys[i] for i in selected],
        source=source,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )
