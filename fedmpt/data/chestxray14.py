"""NIH ChestX-ray14 as a 14-finding multi-label dataset, from ``Data_Entry_2017*.csv`` and the official split.

Layout (as distributed by the NIH Clinical Center)::

    <root>/Data_Entry_2017.csv        (or Data_Entry_2017_v2020.csv; ``csv_file`` picks one if both exist)
    <root>/train_val_list.txt, test_list.txt   (one image name per line: the official patient-wise split)
    <root>/images/<Image Index>        (all twelve ``images_0NN.tar.gz`` archives extracted into one folder)

Splits: ``"train_val"`` and ``"test"``. ``Finding Labels`` holds ``|``-separated findings spelt as in
:data:`~fedmpt.data.classnames.CHESTXRAY14_CLASSES`; ``"No Finding"`` means no positive class. Labels were
mined from radiology reports by NLP, so "not mentioned" is recorded as NEGATIVE (the dataset's convention),
not UNKNOWN.
"""

import csv
from pathlib import Path

import numpy as np

from fedmpt.data.classnames import CHESTXRAY14_CLASSES
from fedmpt.data.dataset import ImageFileDataset, Transform
from fedmpt.data.labels import LABEL_DTYPE, NEGATIVE, POSITIVE
from fedmpt.data.layout import read_lines, require_file, require_split
from fedmpt.data.registry import register_dataset
from fedmpt.errors import ConfigError, DatasetError

SPLITS = ("train_val", "test")
NO_FINDING = "No Finding"
_SPLIT_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}

__all__ = ["NO_FINDING", "SPLITS", "find_data_entry_csv", "load_chestxray14", "read_data_entry"]


def find_data_entry_csv(root: Path, csv_file: str | None) -> Path:
    """Return the ``Data_Entry_2017*.csv`` under ``root`` (or ``root / csv_file`` when given)."""
    if csv_file is not None:
        return require_file(root / csv_file, "ChestX-ray14 data entry CSV")
    found = sorted(root.glob("Data_Entry_2017*.csv"))
    if not found:
        raise DatasetError(f"ChestX-ray14 data entry CSV not found: no Data_Entry_2017*.csv in {root}")
    if len(found) > 1:
        raise ConfigError(
            f"several ChestX-ray14 data entry CSVs in {root}: {[p.name for p in found]}; pass csv_file= to choose"
        )
    return found[0]


def read_data_entry(path: Path) -> dict[str, np.ndarray]:
    """Return ``{image index: int8 label row}`` from a ChestX-ray14 data entry CSV.

    Raises:
        DatasetError: a required column is missing, a finding is unknown, or ``No Finding`` is combined
            with findings.
    """
    index = {name: i for i, name in enumerate(CHESTXRAY14_CLASSES)}
    rows: dict[str, np.ndarray] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or ()]
            for required in ("Image Index", "Finding Labels"):
                if required not in columns:
                    raise DatasetError(f"ChestX-ray14 CSV {path} has no column {required!r} (columns: {columns})")
            for line_number, record in enumerate(reader, start=2):
                record = {(k or "").strip(): (v or "") for k, v in record.items()}
                image = record["Image Index"].strip()
                findings = [f.strip() for f in record["Finding Labels"].split("|") if f.strip()]
                row = np.full(len(CHESTXRAY14_CLASSES), NEGATIVE, dtype=LABEL_DTYPE)
                if NO_FINDING in findings and len(findings) > 1:
                    raise DatasetError(
                        f"ChestX-ray14 CSV {path} line {line_number}: {NO_FINDING!r} combined with findings"
                    )
                for finding in findings:
                    if finding == NO_FINDING:
                        continue
                    if finding not in index:
                        raise DatasetError(
                            f"ChestX-ray14 CSV {path} line {line_number}: unknown finding {finding!r}; "
                            f"known: {CHESTXRAY14_CLASSES}"
                        )
                    row[index[finding]] = POSITIVE
                rows[image] = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read ChestX-ray14 CSV {path}: {exc}") from exc
    return rows


@register_dataset("chestxray14")
def load_chestxray14(
    root: Path,
    split: str,
    *,
    transform: Transform | None = None,
    skip_unreadable: bool = False,
    csv_file: str | None = None,
    image_dir: str = "images",
) -> ImageFileDataset:
    """Load split ``split`` (train_val/test) of ChestX-ray14 from ``root``."""
    require_split("chestxray14", split, SPLITS)
    root = Path(root)
    entries = read_data_entry(find_data_entry_csv(root, csv_file))
    split_file = root / _SPLIT_FILES[split]
    names = read_lines(split_file, "ChestX-ray14 split list")
    missing = [n for n in names if n not in entries]
    if missing:
        raise DatasetError(
            f"ChestX-ray14 split list {split_file}: {len(missing)} image(s) absent from the data entry CSV, "
            f"first {missing[0]!r}"
        )
    labels = np.stack([entries[n] for n in names]) if names else np.zeros((0, len(CHESTXRAY14_CLASSES)), np.int8)
    images = root / image_dir
    return ImageFileDataset.from_rows(
        name="chestxray14",
        split=split,
        classnames=CHESTXRAY14_CLASSES,
        labels=labels,
        root=root,
        paths=[images / n for n in names],
        source=split_file,
        transform=transform,
        skip_unreadable=skip_unreadable,
    )
