"""ChestX-ray14 loader against a fixture in the NIH layout (Data_Entry_2017.csv, split lists, images/)."""

from collections.abc import Callable
from pathlib import Path

import pytest

from fedmpt.data import load_dataset
from fedmpt.data.classnames import CHESTXRAY14_CLASSES
from fedmpt.errors import ConfigError, DatasetError

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)
ENTRIES = {
    "00000001_000.png": "Cardiomegaly",
    "00000001_001.png": "Cardiomegaly|Emphysema",
    "00000002_000.png": "No Finding",
    "00000003_000.png": "Hernia|Pleural_Thickening|Effusion",
}


def _csv(entries: dict[str, str]) -> str:
    return HEADER + "".join(
        f"{name},{labels},0,1,58,M,PA,2682,2749,0.143,0.143,\n" for name, labels in entries.items()
    )


@pytest.fixture
def cxr_root(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    (tmp_path / "Data_Entry_2017.csv").write_text(_csv(ENTRIES))
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    for name in ENTRIES:
        make_image(tmp_path / "images" / name)
    return tmp_path


def _positives(row: list[int]) -> set[str]:
    return {CHESTXRAY14_CLASSES[i] for i, v in enumerate(row) if v == 1}


def test_labels_and_splits(cxr_root: Path) -> None:
    train = load_dataset("chestxray14", cxr_root, "train_val")
    assert train.classnames == CHESTXRAY14_CLASSES
    assert [p.name for p in train.paths] == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert [_positives(r) for r in train.labels.tolist()] == [
        {"Cardiomegaly"},
        {"Cardiomegaly", "Emphysema"},
        set(),
    ]
    test = load_dataset("chestxray14", cxr_root, "test")
    assert _positives(test.labels[0].tolist()) == {"Hernia", "Pleural_Thickening", "Effusion"}
    assert int(test.labels.min()) == 0
    assert test[0][0].mode == "RGB"  # grayscale radiographs are converted to RGB for CLIP


def test_unknown_finding(cxr_root: Path) -> None:
    (cxr_root / "Data_Entry_2017.csv").write_text(_csv({**ENTRIES, "00000002_000.png": "Pleural Thickening"}))
    with pytest.raises(
        DatasetError, match=r"Data_Entry_2017\.csv line 4: unknown finding 'Pleural Thickening'"
    ):
        load_dataset("chestxray14", cxr_root, "train_val")


def test_no_finding_combined_with_finding(cxr_root: Path) -> None:
    (cxr_root / "Data_Entry_2017.csv").write_text(_csv({**ENTRIES, "00000002_000.png": "No Finding|Mass"}))
    with pytest.raises(DatasetError, match="'No Finding' combined"):
        load_dataset("chestxray14", cxr_root, "train_val")


def test_csv_choice_and_missing_files(cxr_root: Path) -> None:
    (cxr_root / "Data_Entry_2017_v2020.csv").write_text(_csv(ENTRIES))
    with pytest.raises(ConfigError, match="csv_file"):
        load_dataset("chestxray14", cxr_root, "test")
    ds = load_dataset("chestxray14", cxr_root, "test", csv_file="Data_Entry_2017_v2020.csv")
    assert len(ds) == 1
    (cxr_root / "Data_Entry_2017_v2020.csv").unlink()
    (cxr_root / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DatasetError, match="Data_Entry_2017"):
        load_dataset("chestxray14", cxr_root, "test")


def test_split_list_problems(cxr_root: Path) -> None:
    (cxr_root / "test_list.txt").write_text("99999999_000.png\n")
    with pytest.raises(DatasetError, match=r"test_list\.txt: 1 image\(s\) absent .* '99999999_000.png'"):
        load_dataset("chestxray14", cxr_root, "test")
    (cxr_root / "test_list.txt").write_text("\n")
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        load_dataset("chestxray14", cxr_root, "test")
    (cxr_root / "test_list.txt").unlink()
    with pytest.raises(DatasetError, match="test_list.txt"):
        load_dataset("chestxray14", cxr_root, "test")


def test_missing_column(cxr_root: Path) -> None:
    (cxr_root / "Data_Entry_2017.csv").write_text("Image Index,Labels\na.png,Mass\n")
    with pytest.raises(DatasetError, match="no column 'Finding Labels'"):
        load_dataset("chestxray14", cxr_root, "test")
