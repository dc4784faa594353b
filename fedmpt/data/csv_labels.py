"""A generic multi-label dataset described by a CSV file of ``path,labels`` rows.

Format::

    path,labels
    images/0001.jpg,cat|dog
    images/0002.jpg,            <- no positive label: an all-NEGATIVE row
    images/0003.jpg,dog

``path`` is relative to the CSV's folder (absolute paths are used as they are); ``labels`` holds class names
joined by ``separator`` (default ``|``). Every class not listed is NEGATIVE. The CSV is ``<root>/<split>.csv``
unless ``csv_file`` names another file (relative to ``root``).

Class list: from ``classnames_file`` (one name per line, in column order) or ``classnames`` when given, in
which case a label outside it is an error; otherwise the sorted union of the labels in this CSV. Federated
clients with different local label sets must NOT rely on the union (their columns would differ): pass the
shared class list, and check with :func:`~fedmpt.data.dataset.check_same_classnames`. The dataset's
``name`` (part of its fingerprint) is ``dataset_name``, default ``"csv"``.
"""

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE, POSITIVE
from fedmpt.data.layout import read_lines, require_file
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

__all__ = ["load_csv_dataset"]


@register_dataset("csv")
def load_csv_dataset(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    csv_file: str | Path | None = None,
    separator: str = "|",
    classnames_file: str | Path | None = None,
    classnames: Sequence[str] | None = None,
    dataset_name: str = "csv",
) -> ImageFileDataset:
    """Load a ``path,labels`` CSV (``<root>/<split>.csv`` by default) as a multi-label dataset."""
    if not separator or separator == ",":
        raise ConfigError(f"csv option separator must be a non-empty string other than ',', got {separator!r}")
    if classnames is not None and classnames_file is not None:
        raise ConfigError("csv options classnames and classnames_file are exclusive; pass one")
    root = Path(root)
    path = require_file(root / (csv_file if csv_file is not None else f"{split}.csv"), "label CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or ()]
            if "path" not in columns or "labels" not in columns:
                raise DatasetError(f"label CSV {path} needs columns 'path' and 'labels', has {columns}")
            records = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read label CSV {path}: {exc}") from exc
    row_labels = [[t.strip() for t in r["labels"].split(separator) if t.strip()] for r in records]
    if classnames_file is not None:
        names = tuple(read_lines(root / classnames_file, "class names file"))
    elif classnames is not None:
        names = tuple(classnames)
    else:
        names = tuple(sorted({label for labels in row_labels for label in labels}))
        logger.info("label CSV %s: class list is the sorted union of its %d labels", path, len(names))
    if not names:
        raise DatasetError(f"label CSV {path}: no class names (empty class list and no labels)")
    column = {n: i for i, n in enumerate(names)}
    labels = np.zeros((len(records), len(names)), dtype=LABEL_DTYPE)
    for row, tokens in enumerate(row_labels):
        for token in tokens:
            if token not in column:
                where = "class names file" if classnames_file is not None else "given classnames"
                raise DatasetError(f"label CSV {path} line {row + 2}: unknown class {token!r} (not in the {where})")
            labels[row, column[token]] = POSITIVE
    base = path.parent
    empty = next((i for i, r in enumerate(records) if not r["path"].strip()), None)
    if empty is not None:
        raise DatasetError(f"label CSV {path} line {empty + 2}: empty 'path'")
    paths = [base / r["path"].strip() for r in records]
    return ImageFileDataset.from_rows(
        name=dataset_name,
        split=split,
        classnames=names,
        labels=labels,
        root=base,
        paths=paths,
        source=path,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )
