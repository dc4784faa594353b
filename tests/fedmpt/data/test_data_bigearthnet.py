"""BigEarthNet-S2 loader: the six genuine example patches of bigearthnet-common, and made-up patches."""

import json
import shutil
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmpt.data import load_dataset
from fedmpt.data.bigearthnet import BIGEARTHNET19_FROM_43
from fedmpt.data.classnames import BIGEARTHNET19_CLASSES, BIGEARTHNET43_CLASSES
from fedmpt.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def genuine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example archive of bigearthnet-common, unpacked (genuine folder layout, bands and metadata)."""
    pytest.importorskip("bigearthnet_common")
    archive = resources.files("bigearthnet_common") / "BigEarthNet-S2-Example.tar.bz2"
    target = tmp_path_factory.mktemp("ben")
    with resources.as_file(archive) as path, tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
    root = target / "BigEarthNet-S2-Example"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(names) == 6
    (root / "train.csv").write_text("\n".join(names[:4]) + "\n")
    (root / "test.csv").write_text("\n".join(names[4:]) + "\n")
    return root


def _metadata_labels(root: Path, patch: str) -> list[str]:
    data = json.loads((root / patch / f"{patch}_labels_metadata.json").read_text())
    labels: list[str] = data["labels"]
    return labels


def test_genuine_patches_19_classes(genuine_root: Path) -> None:
    from bigearthnet_common.constants import OLD2NEW_LABELS_DICT  # the package's own 43 -> 19 mapping

    ds = load_dataset("bigearthnet", genuine_root, "train")
    assert ds.classnames == BIGEARTHNET19_CLASSES
    for row, patch_dir in enumerate(ds.paths):
        expected = {OLD2NEW_LABELS_DICT[x] for x in _metadata_labels(genuine_root, patch_dir.name)} - {None}
        assert {ds.classnames[c] for c in np.flatnonzero(ds.labels[row] == 1)} == expected
    image, _ = ds[0]
    assert image.mode == "RGB" and image.size == (120, 120)


def test_genuine_patches_43_classes_and_rgb_scaling(genuine_root: Path) -> None:
    ds = load_dataset("bigearthnet", genuine_root, "test", nomenclature="43", white_point=2000)
    for row, patch_dir in enumerate(ds.paths):
        expected = set(_metadata_labels(genuine_root, patch_dir.name))
        assert {ds.classnames[c] for c in np.flatnonzero(ds.labels[row] == 1)} == expected
    patch = ds.paths[1]
    bands = [
        np.asarray(Image.open(patch / f"{patch.name}_{b}.tif"), dtype=np.float64)
        for b in ("B04", "B03", "B02")
    ]
    expected_rgb = np.clip(np.round(np.stack(bands, axis=-1) * 255 / 2000), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(ds[1][0]), expected_rgb)


def test_mapping_agrees_with_bigearthnet_common() -> None:
    constants = pytest.importorskip("bigearthnet_common.constants")
    ours = {old: new for new, olds in BIGEARTHNET19_FROM_43.items() for old in olds}
    theirs = {old: new for old, new in constants.OLD2NEW_LABELS_DICT.items() if new is not None}
    assert ours == theirs
    assert set(BIGEARTHNET19_FROM_43) == set(BIGEARTHNET19_CLASSES)


def _make_patch(root: Path, name: str, labels: list[str], dn: tuple[int, int, int] = (0, 1500, 600)) -> Path:
    patch = root / name
    patch.mkdir(parents=True)
    for band, value in zip(("B04", "B03", "B02"), dn, strict=True):
        Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(patch / f"{name}_{band}.tif")
    (patch / f"{name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    return patch


@pytest.fixture
def made_root(tmp_path: Path) -> Path:
    _make_patch(tmp_path, "S2A_X_1_1", ["Airports"], dn=(6000, 1500, 600))  # no 19-class label
    _make_patch(tmp_path, "S2A_X_1_2", ["Peatbogs", "Inland marshes", "Sea and ocean"])
    (tmp_path / "train.csv").write_text("name\nS2A_X_1_1\nS2A_X_1_2\n")
    return tmp_path


def test_made_patches_labels_and_pixels(made_root: Path) -> None:
    ds = load_dataset("bigearthnet", made_root, "train")
    assert ds.labels[0].tolist() == [0] * 19  # kept, not filtered, with no positive
    assert {BIGEARTHNET19_CLASSES[c] for c in np.flatnonzero(ds.labels[1])} == {
        "Inland wetlands",
        "Marine waters",
    }
    # DN -> round(255 * clip(DN / 3000, 0, 1)): 6000 -> 255, 1500 -> 127.5 -> 128 (half to even), 600 -> 51
    assert ds[0][0].getpixel((2, 3)) == (255, 128, 51)
    ds43 = load_dataset("bigearthnet", made_root, "train", nomenclature="43")
    assert ds43.labels[0, BIGEARTHNET43_CLASSES.index("Airports")] == 1


def test_unknown_label_and_bad_options(made_root: Path) -> None:
    meta = made_root / "S2A_X_1_2" / "S2A_X_1_2_labels_metadata.json"
    meta.write_text(json.dumps({"labels": ["Peat bogs"]}))
    with pytest.raises(DatasetError, match="unknown label 'Peat bogs'"):
        load_dataset("bigearthnet", made_root, "train")
    meta.write_text("{")
    with pytest.raises(DatasetError, match="malformed"):
        load_dataset("bigearthnet", made_root, "train")
    with pytest.raises(ConfigError, match="nomenclature"):
        load_dataset("bigearthnet", made_root, "train", nomenclature="44")
    with pytest.raises(ConfigError, match="white_point"):
        load_dataset("bigearthnet", made_root, "train", white_point=0)


def test_missing_patch_band_and_split(made_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="val.csv"):
        load_dataset("bigearthnet", made_root, "val")
    (made_root / "S2A_X_1_1" / "S2A_X_1_1_B03.tif").unlink()
    ds = load_dataset("bigearthnet", made_root, "train")
    with pytest.raises(DatasetError, match=r"S2A_X_1_1_B03\.tif"):
        ds[0]
    ds = load_dataset("bigearthnet", made_root, "train", skip_unreadable=True)
    assert [p.name for p in ds.skipped] == ["S2A_X_1_1"] and len(ds) == 1
    shutil.rmtree(made_root / "S2A_X_1_2")
    with pytest.raises(DatasetError, match="patch folder not found: .*S2A_X_1_2"):
        load_dataset("bigearthnet", made_root, "train")
    with pytest.raises(DatasetError, match="empty after skipping 2"):
        load_dataset("bigearthnet", made_root, "train", skip_unreadable=True)
    (made_root / "train.csv").write_text("name\n")
    with pytest.raises(DatasetError, match="split 'train' is empty"):
        load_dataset("bigearthnet", made_root, "train")
