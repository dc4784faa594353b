"""The three label states of a multi-label matrix and their validation.

A label matrix ``Y`` has one row per image and one column per class (in the dataset's canonical class order),
dtype ``int8``, with ``Y[i, c]`` one of:

- ``POSITIVE = 1``: class ``c`` is annotated as present in image ``i``;
- ``NEGATIVE = 0``: class ``c`` is annotated as absent (or not annotated, in exhaustively annotated datasets);
- ``UNKNOWN = -1``: the annotation says nothing reliable (VOC "difficult"-only instances, partial labels).

Losses and metrics must treat ``UNKNOWN`` entries as missing, never as negatives.
"""

import numpy as np
import numpy.typing as npt

from fedmpt.errors import DatasetError

POSITIVE: int = 1
NEGATIVE: int = 0
UNKNOWN: int = -1

LABEL_DTYPE = np.int8

__all__ = ["LABEL_DTYPE", "NEGATIVE", "POSITIVE", "UNKNOWN", "validate_label_matrix"]


def validate_label_matrix(labels: npt.ArrayLike, n_classes: int, *, source: str) -> npt.NDArray[np.int8]:
    """Return ``labels`` as a read-only ``(n_images, n_classes)`` int8 matrix with entries in {-1, 0, 1}.

    Any numeric dtype is accepted as long as every value is exactly -1, 0 or 1. The input is copied (so
    later mutation of the caller's array cannot change a dataset) and the copy is made read-only.
    ``source`` names where the labels came from and appears in every error message.

    Raises:
        DatasetError: the array is not 2-D, has the wrong number of columns, or holds a value outside
            {UNKNOWN, NEGATIVE, POSITIVE}.
    """
    array = np.asarray(labels)
    if array.ndim != 2:
        raise DatasetError(f"{source}: label matrix must be 2-D (n_images, n_classes), got shape {array.shape}")
    if array.shape[1] != n_classes:
        raise DatasetError(f"{source}: label matrix has {array.shape[1]} columns but there are {n_classes} classes")
    if not (np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)):
        raise DatasetError(f"{source}: label matrix must be numeric, got dtype {array.dtype}")
    bad = ~np.isin(array, (UNKNOWN, NEGATIVE, POSITIVE))
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DatasetError(
            f"{source}: label value {array[row, col]!r} at row {row}, column {col} is not one of "
            f"{UNKNOWN} (unknown), {NEGATIVE} (negative), {POSITIVE} (positive)"
        )
    out = np.array(array, dtype=LABEL_DTYPE, copy=True)
    out.flags.writeable = False
    return out
