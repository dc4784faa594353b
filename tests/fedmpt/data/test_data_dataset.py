"""MultiLabelDataset, its file and array kinds, label validation and class-list agreement."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from fedmpt.data import (
    NEGATIVE,
    POSITIVE,
    UNKNOWN,
    ArrayImageDataset,
    ImageFileDataset,
    check_same_classnames,
)
from fedmpt.data.labels import validate_label_matrix
from fedmpt.errors import ConfigError, DatasetError

MakeImage = Callable[..., Path]
Truncate = Callable[[Path], Path]
XYZ = ("x", "y", "z")


LABEL_MATRICES = hnp.arrays(
    np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=st.integers(-1, 1)
)


def test_label_constants() -> None:
    assert (POSITIVE, NEGATIVE, UNKNOWN) == (1, 0, -1)


@settings(max_examples=40, deadline=None)
@given(LABEL_MATRICES)
def test_validate_accepts_three_states_and_copies(matrix: np.ndarray) -> None:
    out = validate_label_matrix(matrix, matrix.shape[1], source="t")
    assert out.dtype == np.int8
    assert not out.flags.writeable
    np.testing.assert_array_equal(out.astype(np.int64), matrix)
    matrix[...] = 0  # the caller's later change must not reach the validated copy
    assert out.shape == matrix.shape


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=120) | st.integers(min_value=-120, max_value=-2))
def test_validate_rejects_other_values(value: int) -> None:
    matrix = np.zeros((2, 3), dtype=np.int64)
    matrix[1, 2] = value
    with pytest.raises(DatasetError, match=rf"{value}.*row 1, column 2"):
        validate_label_matrix(matrix, 3, source="t")


def test_validate_rejects_wrong_shape() -> None:
    with pytest.raises(DatasetError, match="3 columns but there are 4 classes"):
        validate_label_matrix(np.zeros((2, 3)), 4, source="t")
    with pytest.raises(DatasetError, match="2-D"):
        validate_label_matrix(np.zeros(3), 3, source="t")
    with pytest.raises(DatasetError, match="0.5"):
        validate_label_matrix(np.full((1, 2), 0.5), 2, source="t")
    with pytest.raises(DatasetError, match="numeric"):
        validate_label_matrix(np.array([["1", "0"]]), 2, source="t")
    np.testing.assert_array_equal(validate_label_matrix(np.array([[1.0, -1.0]]), 2, source="t"), [[1, -1]])


def _file_dataset(root: Path, make_image: MakeImage, labels: np.ndarray | None = None) -> ImageFileDataset:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    paths = [make_image(root / "img" / f"{i}.png", color=c) for i, c in enumerate(colors)]
    if labels is None:
        labels = np.array([[1, 0], [0, -1], [1, 1]])
    return ImageFileDataset(
        name="toy", split="train", classnames=("a", "b"), labels=labels, root=root, paths=paths
    )


def test_getitem_returns_rgb_image_and_label_tensor(tmp_path: Path, make_image: MakeImage) -> None:
    ds = _file_dataset(tmp_path, make_image)
    image, row = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 255, 0)  # PNG is lossless: exactly the written colour
    assert row.dtype == torch.int8
    assert row.tolist() == [0, -1]
    assert ds[-1][1].tolist() == [1, 1]
    with pytest.raises(IndexError):
        ds[3]


def test_transform_is_applied(tmp_path: Path, make_image: MakeImage) -> None:
    ds = _file_dataset(tmp_path, make_image)
    ds.transform = lambda im: np.asarray(im).shape
    assert ds[0][0] == (8, 12, 3)


def test_fingerprint_matches_documented_formula(tmp_path: Path, make_image: MakeImage) -> None:
    ds = _file_dataset(tmp_path, make_image)
    digest = hashlib.sha256()
    header = {"name": "toy", "split": "train", "classnames": ["a", "b"], "shape": [3, 2]}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for i in range(3):
        digest.update(f"img/{i}.png".encode() + b"\x00")
    digest.update(np.array([[1, 0], [0, -1], [1, 1]], dtype=np.int8).tobytes())
    assert ds.fingerprint() == digest.hexdigest()


def test_fingerprint_is_location_independent_and_label_sensitive(
    tmp_path: Path, make_image: MakeImage
) -> None:
    a = _file_dataset(tmp_path / "here", make_image)
    b = _file_dataset(tmp_path / "elsewhere", make_image)
    assert a.fingerprint() == b.fingerprint()
    changed = a.with_labels(np.array([[1, 0], [0, 0], [1, 1]]))
    assert changed.fingerprint() != a.fingerprint()
    assert a.labels[1, 1] == -1  # with_labels returned a copy


def test_subset_keeps_rows_paths_and_labels_aligned(tmp_path: Path, make_image: MakeImage) -> None:
    ds = _file_dataset(tmp_path, make_image)
    sub = ds.subset([2, 0])
    assert isinstance(sub, ImageFileDataset)
    assert [p.name for p in sub.paths] == ["2.png", "0.png"]
    assert sub.labels.tolist() == [[1, 1], [1, 0]]
    assert sub[0][0].getpixel((0, 0)) == (0, 0, 255)
    assert len(ds) == 3
    with pytest.raises(ConfigError, match=r"\[0, 3\)"):
        ds.subset([3])


def test_labels_are_read_only(tmp_path: Path, make_image: MakeImage) -> None:
    ds = _file_dataset(tmp_path, make_image)
    with pytest.raises(ValueError):
        ds.labels[0, 0] = 0


def test_mismatched_paths_and_labels(tmp_path: Path, make_image: MakeImage) -> None:
    with pytest.raises(DatasetError, match="3 image paths but 2 label rows"):
        _file_dataset(tmp_path, make_image, labels=np.zeros((2, 2)))


def test_duplicate_or_empty_classnames_rejected() -> None:
    images = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="duplicate"):
        ArrayImageDataset(name="x", split="s", classnames=("a", "a"), labels=[[0, 0]], images=images)
    with pytest.raises(ConfigError, match="empty"):
        ArrayImageDataset(name="x", split="s", classnames=(), labels=np.zeros((1, 0)), images=images)


def test_array_dataset() -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    labels = np.array([[1, 0, -1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    ds = ArrayImageDataset(name="syn", split="train", classnames=XYZ, labels=labels, images=images)
    image, row = ds[2]
    np.testing.assert_array_equal(np.asarray(image), images[2])
    assert row.tolist() == [1, 1, 1]
    other = images.copy()
    other[3, 0, 0, 0] ^= 1
    ds2 = ArrayImageDataset(name="syn", split="train", classnames=XYZ, labels=labels, images=other)
    assert ds.fingerprint() != ds2.fingerprint()  # content, not just position, is hashed
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(np.asarray(sub[0][0]), images[3])
    assert not hasattr(ds, "paths")
    with pytest.raises(DatasetError, match="uint8"):
        ArrayImageDataset(name="s", split="t", classnames=("x",), labels=[[0]], images=np.zeros((1, 2, 2, 3)))
    with pytest.raises(DatasetError, match="2 images but 1 label rows"):
        ArrayImageDataset(name="s", split="t", classnames=("x",), labels=[[0]], images=images[:2])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_subset_by_permutation_and_inverse_is_identity(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 8))
    labels = data.draw(hnp.arrays(np.int8, (n, 3), elements=st.integers(-1, 1)))
    images = data.draw(hnp.arrays(np.uint8, (n, 2, 2, 3)))
    permutation = np.asarray(data.draw(st.permutations(range(n))), dtype=np.intp)
    ds = ArrayImageDataset(name="p", split="s", classnames=XYZ, labels=labels, images=images)
    shuffled = ds.subset(permutation)
    np.testing.assert_array_equal(shuffled.labels, labels[permutation])
    np.testing.assert_array_equal(np.asarray(shuffled[0][0]), images[permutation[0]])
    restored = shuffled.subset(np.argsort(permutation))
    assert restored.fingerprint() == ds.fingerprint()


def _array(names: tuple[str, ...], name: str = "c") -> ArrayImageDataset:
    images = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    labels = np.zeros((1, len(names)))
    return ArrayImageDataset(name=name, split="train", classnames=names, labels=labels, images=images)


def test_check_same_classnames() -> None:
    assert check_same_classnames([_array(("a", "b")), _array(("a", "b"))]) == ("a", "b")
    with pytest.raises(DatasetError, match=r"only in #1: \['c'\]; only in #0: \['b'\]"):
        check_same_classnames([_array(("a", "b")), _array(("a", "c"))])
    with pytest.raises(DatasetError, match=r"order.*position 0 is 'b' vs 'a'"):
        check_same_classnames([_array(("a", "b")), _array(("a", "b")), _array(("b", "a"))])
    with pytest.raises(ConfigError):
        check_same_classnames([])


def test_unreadable_file_names_the_file_at_getitem(
    tmp_path: Path, make_image: MakeImage, truncate: Truncate
) -> None:
    ds = _file_dataset(tmp_path, make_image)
    broken = truncate(make_image(ds.paths[1].with_suffix(".jpg"), size=(64, 64)))
    ds.paths[1] = broken
    with pytest.raises(DatasetError, match=str(broken)):
        ds[1]
    ds.paths[2].write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=str(ds.paths[2])):
        ds[2]
