"""Multi-label datasets: a label matrix over canonical classes, plus a way to produce each row's image.

:class:`MultiLabelDataset` is the common interface (``classnames``, ``labels``, ``name``, ``split``, indexing,
``fingerprint``). Two concrete kinds exist:

- :class:`ImageFileDataset`: one file (or, for BigEarthNet, one patch folder) per row, listed in ``paths``;
  every built-in loader returns one of these. Rows whose file cannot be read are dropped at load time only
  when the loader is asked to (``skip_unreadable=True``); they are listed in ``skipped``.
- :class:`ArrayImageDataset`: images held in memory as a ``(N, H, W, 3)`` uint8 array, for generated data
  (e.g. the synthetic world), which has no files and therefore no ``paths``.

Label matrices are read-only; :meth:`MultiLabelDataset.with_labels` and :meth:`MultiLabelDataset.subset`
return new datasets instead of mutating one (partial labels and client partitions are built that way).
"""

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset

from fedmpt.data.image_files import ImageReader, find_unreadable, open_rgb
from fedmpt.data.labels import validate_label_matrix
from fedmpt.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]

__all__ = [
    "ArrayImageDataset",
    "ImageFileDataset",
    "MultiLabelDataset",
    "Transform",
    "check_same_classnames",
]


class MultiLabelDataset(Dataset[tuple[Any, torch.Tensor]]):
    """A multi-label dataset: ``labels[i, c]`` in {1, 0, -1} for image ``i`` and class ``classnames[c]``.

    ``dataset[i]`` is ``(image, labels_row)``: ``image`` is ``transform(rgb_pil_image)`` (the PIL image itself
    when ``transform`` is None) and ``labels_row`` an int8 tensor of shape ``(n_classes,)``.
    Subclasses provide :meth:`load_image` and :meth:`_row_keys` and, if they hold per-row data besides the
    labels, :meth:`_take_rows`.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        classnames: Sequence[str],
        labels: npt.ArrayLike,
        transform: Transform | None = None,
    ) -> None:
        names = tuple(classnames)
        if not names:
            raise ConfigError(f"dataset {name!r} split {split!r}: classnames must not be empty")
        if len(set(names)) != len(names):
            duplicates = sorted({c for c in names if names.count(c) > 1})
            raise ConfigError(f"dataset {name!r} split {split!r}: duplicate class names {duplicates}")
        self.name: str = name
        self.split: str = split
        self.classnames: tuple[str, ...] = names
        self.labels: npt.NDArray[np.int8] = validate_label_matrix(
            labels, len(names), source=f"dataset {name!r} split {split!r}"
        )
        self.transform: Transform | None = transform

    # -- the interface ------------------------------------------------------------------------------------
    def load_image(self, index: int) -> Image.Image:
        """Return row ``index``'s image as an RGB PIL image (before ``transform``)."""
        raise NotImplementedError

    def _row_keys(self) -> Iterator[str]:
        """Yield one string per row identifying its image (relative path or content digest)."""
        raise NotImplementedError

    def _take_rows(self, indices: npt.NDArray[np.intp]) -> None:
        """Restrict this (freshly copied) object's per-row data, other than ``labels``, to ``indices``."""

    # -- shared behaviour ---------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Number of classes (columns of ``labels``)."""
        return len(self.classnames)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {n} images")
        index = index % n
        image = self.load_image(index)
        row = torch.from_numpy(self.labels[index].copy())
        return (self.transform(image) if self.transform is not None else image), row

    def fingerprint(self) -> str:
        """Hex SHA-256 over name, split, class names, each row's key (relative path or digest) and labels.

        Two datasets with equal fingerprints list the same images with the same labels in the same order; it
        is a cache key, not an integrity check of the pixel data of file-backed datasets.
        """
        digest = hashlib.sha256()
        header = {
            "name": self.name,
            "split": self.split,
            "classnames": list(self.classnames),
            "shape": list(self.labels.shape),
        }
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        for key in self._row_keys():
            digest.update(key.encode("utf-8"))
            digest.update(b"\x00")
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()

    def with_labels(self, labels: npt.ArrayLike) -> "MultiLabelDataset":
        """Return a copy of this dataset with ``labels`` (same shape) in place of its label matrix."""
        new_labels = validate_label_matrix(
            labels, self.n_classes, source=f"with_labels on dataset {self.name!r} split {self.split!r}"
        )
        if new_labels.shape != self.labels.shape:
            raise DatasetError(
                f"with_labels on dataset {self.name!r}: shape {new_labels.shape} differs from {self.labels.shape}"
            )
        clone = copy.copy(self)
        clone.labels = new_labels
        return clone

    def subset(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> "MultiLabelDataset":
        """Return the dataset restricted to rows ``indices`` (in that order; repeats allowed)."""
        index_array = np.asarray(indices, dtype=np.intp).reshape(-1)
        n = len(self)
        if index_array.size and (index_array.min() < 0 or index_array.max() >= n):
            raise ConfigError(f"subset of dataset {self.name!r}: indices must lie in [0, {n}), got {indices!r}")
        clone = copy.copy(self)
        labels = self.labels[index_array]
        labels.flags.writeable = False
        clone.labels = labels
        clone._take_rows(index_array)
        return clone

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n_images={len(self)}, "
            f"n_classes={self.n_classes})"
        )


class ImageFileDataset(MultiLabelDataset):
    """A dataset whose row ``i`` is read from ``paths[i]`` by ``reader`` (default: :func:`open_rgb`).

    ``root`` is the dataset's root folder; the fingerprint uses paths relative to it (POSIX form) so that the
    same data mounted elsewhere has the same fingerprint. ``skipped`` lists files dropped at load time.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        classnames: Sequence[str],
        labels: npt.ArrayLike,
        root: Path,
        paths: Sequence[Path],
        transform: Transform | None = None,
        reader: ImageReader = open_rgb,
        skipped: Sequence[Path] = (),
    ) -> None:
        super().__init__(name=name, split=split, classnames=classnames, labels=labels, transform=transform)
        if len(paths) != len(self.labels):
            raise DatasetError(
                f"dataset {name!r} split {split!r}: {len(paths)} image paths but {len(self.labels)} label rows"
            )
        self.root: Path = Path(root)
        self.paths: list[Path] = [Path(p) for p in paths]
        self.reader: ImageReader = reader
        self.skipped: list[Path] = [Path(p) for p in skipped]

    @classmethod
    def from_rows(
        cls,
        *,
        name: str,
        split: str,
        classnames: Sequence[str],
        labels: npt.ArrayLike,
        root: Path,
        paths: Sequence[Path],
        source: Path,
        transform: Transform | None = None,
        reader: ImageReader = open_rgb,
        skip_unreadable: bool = False,
    ) -> "ImageFileDataset":
        """Build a dataset from parsed rows, checking the images exist (and, optionally, can be decoded).

        ``source`` is the annotation or split file the rows came from; errors name it. Without
        ``skip_unreadable`` every listed file must exist (one ``stat`` per row) and unreadable files fail
        later, in ``__getitem__``, naming the file. With ``skip_unreadable`` each image is decoded once now
        (one full pass over the data) and the rows that fail are dropped, logged and listed in ``skipped``.

        Raises:
            DatasetError: the split lists no images, an image is missing (without ``skip_unreadable``), or
                nothing is left after skipping.
        """
        label_matrix = np.asarray(labels)
        if len(paths) == 0:
            raise DatasetError(f"dataset {name!r}: split {split!r} is empty ({source} lists no images)")
        skipped: list[Path] = []
        if skip_unreadable:
            bad = find_unreadable(paths, reader)
            if bad:
                skipped = [paths[i] for i in bad]
                keep = np.setdiff1d(np.arange(len(paths)), np.asarray(bad, dtype=np.intp))
                paths = [paths[i] for i in keep]
                label_matrix = label_matrix[keep]
                logger.warning(
                    "dataset %r split %r: skipped %d unreadable image(s) of %d (first: %s)",
                    name,
                    split,
                    len(skipped),
                    len(skipped) + len(paths),
                    skipped[0],
                )
            if not paths:
                raise DatasetError(
                    f"dataset {name!r}: split {split!r} is empty after skipping {len(skipped)} "
                    f"unreadable images (listed in {source})"
                )
        else:
            missing = [p for p in paths if not p.exists()]
            if missing:
                raise DatasetError(
                    f"dataset {name!r} split {split!r}: image not found: {missing[0]} "
                    f"({len(missing)} of {len(paths)} listed in {source} are missing; "
                    "pass skip_unreadable=True to drop them)"
                )
        return cls(
            name=name,
            split=split,
            classnames=classnames,
            labels=label_matrix,
            root=root,
            paths=paths,
            transform=transform,
            reader=reader,
            skipped=skipped,
        )

    def load_image(self, index: int) -> Image.Image:
        return self.reader(self.paths[index])

    def _row_keys(self) -> Iterator[str]:
        for path in self.paths:
            try:
                yield path.relative_to(self.root).as_posix()
            except ValueError:
                yield path.as_posix()

    def _take_rows(self, indices: npt.NDArray[np.intp]) -> None:
        self.paths = [self.paths[i] for i in indices]


class ArrayImageDataset(MultiLabelDataset):
    """A dataset of in-memory images: ``images`` is a ``(N, H, W, 3)`` uint8 array, one image per row.

    There are no files, hence no ``paths``; the fingerprint hashes each image's bytes instead.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        classnames: Sequence[str],
        labels: npt.ArrayLike,
        images: npt.NDArray[np.uint8],
        transform: Transform | None = None,
    ) -> None:
        super().__init__(name=name, split=split, classnames=classnames, labels=labels, transform=transform)
        array = np.asarray(images)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
            raise DatasetError(
                f"dataset {name!r} split {split!r}: images must be a (N, H, W, 3) uint8 array, "
                f"got dtype {array.dtype} shape {array.shape}"
            )
        if array.shape[0] != len(self.labels):
            raise DatasetError(
                f"dataset {name!r} split {split!r}: {array.shape[0]} images but {len(self.labels)} label rows"
            )
        self.images: npt.NDArray[np.uint8] = array

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def _row_keys(self) -> Iterator[str]:
        for image in self.images:
            yield hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    def _take_rows(self, indices: npt.NDArray[np.intp]) -> None:
        self.images = self.images[indices]


def check_same_classnames(datasets: Sequence[MultiLabelDataset]) -> tuple[str, ...]:
    """Return the class list shared by all ``datasets``; raise if any differs in names or order.

    Federated clients must agree on the label space column by column: a client whose class list is a
    permutation of the others' would silently train the wrong prompts.

    Raises:
        ConfigError: ``datasets`` is empty.
        DatasetError: a dataset's class list differs from the first one's; the message names the dataset and
            the classes only one side has (or the first position where the order differs).
    """
    if not datasets:
        raise ConfigError("check_same_classnames needs at least one dataset, got none")
    reference = datasets[0].classnames
    for position, dataset in enumerate(datasets[1:], start=1):
        names = dataset.classnames
        if names == reference:
            continue
        only_here = sorted(set(names) - set(reference))
        only_reference = sorted(set(reference) - set(names))
        where = (
            f"dataset #{position} ({dataset.name!r} split {dataset.split!r}) vs dataset #0 "
            f"({datasets[0].name!r} split {datasets[0].split!r})"
        )
        if only_here or only_reference:
            raise DatasetError(
                f"class lists differ: {where}: only in #{position}: {only_here}; only in #0: {only_reference}"
            )
        first = next(i for i, (a, b) in enumerate(zip(names, reference, strict=True)) if a != b)
        raise DatasetError(
            f"class lists differ in order: {where}: position {first} is {names[first]!r} vs {reference[first]!r}"
        )
    return reference
