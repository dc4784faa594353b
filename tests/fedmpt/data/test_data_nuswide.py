"""NUS-WIDE loader against a fixture in the official ImageList / TrainTestLabels / Flickr layout."""

from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from fedmpt.data import load_dataset
from fedmpt.data.classnames import NUSWIDE_CLASSES
from fedmpt.data.nuswide import nuswide_relative_path
from fedmpt.errors import ConfigError, DatasetError

# Image-list lines as the release writes them (Windows separators), and each image's positive concepts.
TRAIN = [
    ("actor\\0001_2124494179.jpg", {"person", "dancing"}),
    ("airport\\0002_1234567890.jpg", {"airport", "plane", "sky"}),
    ("zebra\\0003_42.jpg", set()),
]
TEST = [("beach\\0004_77.jpg", {"beach", "water", "waterfall"})]


def _write_split(
    root: Path, word: str, rows: list[tuple[str, set[str]]], make_image: Callable[..., Path]
) -> None:
    (root / "ImageList").mkdir(parents=True, exist_ok=True)
    (root / "ImageList" / f"{word}Imagelist.txt").write_text("\r\n".join(line for line, _ in rows) + "\r\n")
    (root / "TrainTestLabels").mkdir(exist_ok=True)
    for concept in NUSWIDE_CLASSES:
        values = "".join(f"{int(concept in positives)} \n" for _, positives in rows)
        (root / "TrainTestLabels" / f"Labels_{concept}_{word}.txt").write_text(values)
    for line, _ in rows:
        make_image(root / "Flickr" / line.replace("\\", "/"))


@pytest.fixture
def nus_root(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    _write_split(tmp_path, "Train", TRAIN, make_image)
    _write_split(tmp_path, "Test", TEST, make_image)
    return tmp_path


def test_relative_path_rules() -> None:
    assert nuswide_relative_path("actor\\0001_2.jpg") == PurePosixPath("actor/0001_2.jpg")
    assert nuswide_relative_path("C:\\ImageData\\Flickr\\actor\\0001_2.jpg") == PurePosixPath(
        "actor/0001_2.jpg"
    )


@pytest.mark.parametrize(("split", "rows"), [("train", TRAIN), ("test", TEST)])
def test_labels_follow_the_concept_files(
    nus_root: Path, split: str, rows: list[tuple[str, set[str]]]
) -> None:
    ds = load_dataset("nuswide", nus_root, split)
    assert ds.classnames == NUSWIDE_CLASSES
    assert len(ds) == len(rows)
    for i, (line, positives) in enumerate(rows):
        assert {ds.classnames[c] for c in range(81) if ds.labels[i, c] == 1} == positives
        assert ds.paths[i] == nus_root / "Flickr" / line.replace("\\", "/")
    assert ds[0][0].size == (12, 8)


def test_length_mismatch_and_bad_values(nus_root: Path) -> None:
    label_file = nus_root / "TrainTestLabels" / "Labels_sky_Train.txt"
    label_file.write_text("0\n1\n")
    with pytest.raises(DatasetError, match=r"Labels_sky_Train\.txt has 2 lines but .*lists 3 images"):
        load_dataset("nuswide", nus_root, "train")
    label_file.write_text("0\n2\n0\n")
    with pytest.raises(DatasetError, match=r"Labels_sky_Train\.txt line 2: expected 0 or 1, got '2'"):
        load_dataset("nuswide", nus_root, "train")


def test_missing_and_unknown_concept_files(nus_root: Path) -> None:
    (nus_root / "TrainTestLabels" / "Labels_unicorn_Test.txt").write_text("1\n")
    with pytest.raises(DatasetError, match="unknown concept 'unicorn'"):
        load_dataset("nuswide", nus_root, "test")
    (nus_root / "TrainTestLabels" / "Labels_unicorn_Test.txt").unlink()
    (nus_root / "TrainTestLabels" / "Labels_zebra_Test.txt").unlink()
    with pytest.raises(DatasetError, match=r"concept 'zebra' not found: .*Labels_zebra_Test\.txt"):
        load_dataset("nuswide", nus_root, "test")


def test_missing_image_and_empty_split(nus_root: Path) -> None:
    (nus_root / "Flickr" / "zebra" / "0003_42.jpg").unlink()
    with pytest.raises(DatasetError, match="0003_42.jpg"):
        load_dataset("nuswide", nus_root, "train")
    ds = load_dataset("nuswide", nus_root, "train", skip_unreadable=True)
    assert len(ds) == 2 and [p.name for p in ds.skipped] == ["0003_42.jpg"]
    (nus_root / "ImageList" / "TestImagelist.txt").write_text("")
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        load_dataset("nuswide", nus_root, "test")
    with pytest.raises(ConfigError):
        load_dataset("nuswide", nus_root, "val")
