"""Federated data partitions: label-cluster and Dirichlet client splits, partial labels, client participation.

Every function is seeded by an integer and deterministic: the seed and a per-mechanism stream tag form a
``numpy.random.SeedSequence``, so the same seed used for two mechanisms still gives independent streams, and
no global RNG is ever touched. A split is a :class:`Partition`: a frozen tuple of sorted index arrays, one per
client, that covers ``range(num_samples)`` exactly once (checked on construction).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.cluster import KMeans

from fedmpt.data.labels import NEGATIVE, POSITIVE, UNKNOWN, validate_label_matrix
from fedmpt.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_KMEANS_N_INIT = 10
DEFAULT_DIRICHLET_MAX_TRIES = 100
# Flower-style floor(fraction * n) would turn 0.29 * 100 = 28.999999999999996 into 28; this slack avoids that.
_FLOOR_SLACK = 1e-9


class _Stream(IntEnum):
    """Tags that separate the random streams of the mechanisms drawn from one user seed."""

    LABEL_CLUSTER = 1
    DIRICHLET = 2
    PARTIAL_LABELS = 3
    PARTICIPATION = 4


class MaskMode(StrEnum):
    """What a masked positive becomes in :func:`mask_partial_labels`."""

    UNKNOWN = "unknown"  # the partial-label benchmark as described in the paper: the label is missing
    NEGATIVE = "negative"  # the authors' code: the positive silently becomes a (wrong) negative


def _rng(seed: int, stream: _Stream, *extra: int) -> np.random.Generator:
    """A generator for ``(seed, stream, *extra)``; seeds must be non-negative integers."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), *extra]))


def _check_labels(labels: ArrayLike) -> NDArray[np.int8]:
    """Return ``labels`` as a read-only int8 ``(n_images, n_classes)`` matrix with entries in {-1, 0, 1}.

    Raises ``DatasetError`` naming the bad shape or entry (via
    :func:`fedmpt.data.labels.validate_label_matrix`).
    """
    array = np.asarray(labels)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DatasetError(
            f"partition labels must be a non-empty 2-D (n_images, n_classes) matrix, got shape {array.shape}"
        )
    return validate_label_matrix(array, array.shape[1], source="partition labels")


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= num_samples:
        raise ConfigError(f"num_clients must be in [1, n_images={num_samples}], got {num_clients}")


def _is_real(value: object) -> bool:
    """True for int/float/numpy scalars, False for bool (a flag is never a rate) and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _read_only(array: NDArray[Any]) -> NDArray[Any]:
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class PartitionSummary:
    """Per-client sizes and positive-label frequencies (read-only ``(num_clients, n_classes)`` array)."""

    sizes: tuple[int, ...]
    positive_frequency: NDArray[np.float64] = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"sizes": [...], "positive_frequency": [[...], ...]}``."""
        return {"sizes": list(self.sizes), "positive_frequency": self.positive_frequency.tolist()}


@dataclass(frozen=True, eq=False)
class Partition:
    """A split of the images ``0..num_samples-1`` among clients; every image belongs to exactly one client.

    ``client_indices[k]`` holds client k's image indices, sorted, as a read-only int64 array. A client may be
    empty (e.g. when test images are routed to the clients of a training clustering); the partitioners of
    training splits guarantee non-empty clients themselves.
    """

    client_indices: tuple[NDArray[np.int64], ...]
    num_samples: int

    def __post_init__(self) -> None:
        if len(self.client_indices) == 0:
            raise ConfigError("a Partition needs at least one client, got 0")
        if isinstance(self.num_samples, bool) or self.num_samples < 0:
            raise ConfigError(f"num_samples must be a non-negative integer, got {self.num_samples!r}")
        cleaned = []
        for k, indices in enumerate(self.client_indices):
            array = np.asarray(indices)
            if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
                raise ConfigError(f"client {k}: indices must be a 1-D integer array, got {array.dtype} {array.shape}")
            cleaned.append(_read_only(np.sort(array.astype(np.int64))))
        all_indices = np.sort(np.concatenate(cleaned)) if cleaned else np.empty(0, np.int64)
        if all_indices.size != self.num_samples or not np.array_equal(all_indices, np.arange(self.num_samples)):
            counts = np.bincount(all_indices[all_indices >= 0], minlength=self.num_samples)
            missing = np.flatnonzero(counts[: self.num_samples] == 0)[:5].tolist()
            repeated = np.flatnonzero(counts > 1)[:5].tolist()
            out_of_range = all_indices[(all_indices < 0) | (all_indices >= self.num_samples)][:5].tolist()
            raise ConfigError(
                f"client indices must cover 0..{self.num_samples - 1} exactly once; missing {missing}, "
                f"repeated {repeated}, out of range {out_of_range} (first five of each)"
            )
        object.__setattr__(self, "client_indices", tuple(cleaned))

    @classmethod
    def from_assignment(cls, assignment: ArrayLike, num_clients: int) -> Partition:
        """Build from ``assignment[i]`` = the client of image i (values in ``0..num_clients-1``)."""
        array = np.asarray(assignment)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ConfigError(f"assignment must be a 1-D integer array, got {array.dtype} {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= num_clients):
            raise ConfigError(f"assignment values must be in [0, {num_clients - 1}], got {array.min()}..{array.max()}")
        return cls(tuple(np.flatnonzero(array == k) for k in range(num_clients)), int(array.size))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            self.num_samples == other.num_samples
            and self.num_clients == other.num_clients
            and all(np.array_equal(a, b) for a, b in zip(self.client_indices, other.client_indices, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays; equality is by value

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def sizes(self) -> tuple[int, ...]:
        """Number of images of each client."""
        return tuple(int(indices.size) for indices in self.client_indices)

    def assignment(self) -> NDArray[np.int64]:
        """The inverse view: ``out[i]`` is the client that holds image i."""
        out = np.empty(self.num_samples, dtype=np.int64)
        for k, indices in enumerate(self.client_indices):
            out[indices] = k
        return out

    def summary(self, labels: ArrayLike) -> PartitionSummary:
        """Per-client sizes and, for each class, the fraction of the client's images labelled POSITIVE."""
        label_array = _check_labels(labels)
        if label_array.shape[0] != self.num_samples:
            raise DatasetError(
                f"partition labels have {label_array.shape[0]} rows but the partition has {self.num_samples}"
            )
        frequency = np.zeros((self.num_clients, label_array.shape[1]), dtype=np.float64)
        for k, indices in enumerate(self.client_indices):
            if indices.size:
                frequency[k] = np.mean(label_array[indices] == POSITIVE, axis=0)
        return PartitionSummary(sizes=self.sizes(), positive_frequency=_read_only(frequency))


# ------------------------------------------------------------------------------------------- label clusters


def label_cluster_features(labels: ArrayLike) -> NDArray[np.float64]:
    """The clustering feature of the authors' code: softmax over classes of the multi-hot label vector.

    softmax(y)_c = exp(y_c) / sum_c' exp(y_c') with y = 1[label == POSITIVE] (UNKNOWN counts as not positive).
    For an image with p positives among N classes the positives get e / (p e + N - p) and the others
    1 / (p e + N - p), so images with many labels sit closer together than their multi-hot vectors do.
    """
    positive = (_check_labels(labels) == POSITIVE).astype(np.float64)  # (n, N)
    exp = np.exp(positive)
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LabelClusterModel:
    """KMeans fitted on the TRAINING split's label features; routes any split's images to clients by predict.

    The authors' code reuses the training split's cluster ids for the test split by row index (reference
    section 3.2), which assigns test images arbitrarily; :meth:`assign` instead predicts the nearest fitted
    centre of each test image's own label feature.
    """

    kmeans: KMeans = field(repr=False, compare=False)
    train_partition: Partition
    num_classes: int

    @property
    def num_clients(self) -> int:
        return self.train_partition.num_clients

    @property
    def centers(self) -> NDArray[np.float64]:
        """Cluster centres, ``(num_clients, num_classes)``, in the softmax feature space."""
        return np.asarray(self.kmeans.cluster_centers_, dtype=np.float64)

    def assign(self, labels: ArrayLike) -> Partition:
        """Send each image of another split (e.g. test) to the client whose centre is nearest its feature.

        Some clients may receive no image of a small split; that is reported, not an error.
        """
        features = label_cluster_features(labels)
        if features.shape[1] != self.num_classes:
            raise DatasetError(
                f"labels to assign have {features.shape[1]} classes, the clustering was fitted on {self.num_classes}"
            )
        partition = Partition.from_assignment(self.kmeans.predict(features).astype(np.int64), self.num_clients)
        empty = [k for k, size in enumerate(partition.sizes()) if size == 0]
        if empty:
            logger.info("label-cluster assign: clients %s receive no image of this split", empty)
        return partition


def fit_label_clusters(
    train_labels: ArrayLike,
    num_clients: int,
    *,
    seed: int,
    n_init: int = DEFAULT_KMEANS_N_INIT,
) -> LabelClusterModel:
    """Partition the training split into ``num_clients`` clients by KMeans on the label features (the paper's
    "heterogeneous" benchmark, K clusters = K clients).

    Fitted on the training labels only; sklearn ``KMeans(n_clusters=num_clients, n_init=n_init,
    random_state=<from seed>)``. Identical feature vectors are fitted once with their multiplicity as sample
    weight (the same k-means objective, much faster on COCO-sized label sets). Training images are assigned by
    ``predict`` so that train and test use the same rule.

    Raises:
        ConfigError: ``num_clients`` outside ``[1, n_images]``, larger than the number of distinct label
            vectors (k-means cannot then give every client an image), ``n_init < 1``, or a clustering that
            leaves a client empty.
    """
    features = label_cluster_features(train_labels)
    _check_num_clients(num_clients, features.shape[0])
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ConfigError(f"n_init must be a positive integer, got {n_init!r}")
    unique, counts = np.unique(features, axis=0, return_counts=True)
    if num_clients > unique.shape[0]:
        raise ConfigError(
            f"num_clients={num_clients} exceeds the {unique.shape[0]} distinct label vectors of the training "
            "split: label clustering cannot give every client an image; use fewer clients or Dirichlet skew"
        )
    random_state = int(_rng(seed, _Stream.LABEL_CLUSTER).integers(0, 2**31 - 1))
    kmeans = KMeans(n_clusters=num_clients, n_init=n_init, random_state=random_state)
    with warnings.catch_warnings():
        # Equal distinct points may still collapse; the empty-client check below reports it clearly.
        warnings.filterwarnings("ignore", message="Number of distinct clusters", category=UserWarning)
        kmeans.fit(unique, sample_weight=counts.astype(np.float64))
    partition = Partition.from_assignment(kmeans.predict(features).astype(np.int64), num_clients)
    empty = [k for k, size in enumerate(partition.sizes()) if size == 0]
    if empty:
        raise ConfigError(
            f"label clustering with num_clients={num_clients} left clients {empty} without a training image; "
            "use fewer clients"
        )
    logger.debug("label clusters: sizes %s (inertia %.4g)", partition.sizes(), kmeans.inertia_)
    return LabelClusterModel(kmeans=kmeans, train_partition=partition, num_classes=features.shape[1])


# ---------------------------------------------------------------------------------------------- Dirichlet


def dirichlet_partition(
    labels: ArrayLike,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_size: int = 1,
    max_tries: int = DEFAULT_DIRICHLET_MAX_TRIES,
) -> Partition:
    """Label-skewed split: each class's images are spread over clients with Dirichlet(alpha) proportions.

    Multi-label scheme (Hsu et al. 2019's class-wise Dirichlet, extended to several labels per image):

    1. each image gets one *primary class*, drawn uniformly among its POSITIVE labels; images without a
       positive form one extra pseudo-class;
    2. for every (pseudo-)class c, proportions p_c ~ Dirichlet(alpha * 1_K) over the K clients;
    3. every image of primary class c goes to client k with probability p_c[k], independently.

    Small alpha concentrates each class on few clients (strong skew); alpha -> infinity tends to an IID split.
    If a client gets fewer than ``min_size`` images, the whole draw is repeated (continuing the same random
    stream, so the result stays deterministic), at most ``max_tries`` times.

    Raises:
        ConfigError: alpha <= 0 or not finite, num_clients outside [1, n_images], min_size * num_clients >
            n_images, max_tries < 1, or no draw met ``min_size`` within ``max_tries``.
    """
    label_array = _check_labels(labels)
    n_images = label_array.shape[0]
    _check_num_clients(num_clients, n_images)
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ConfigError(f"min_size must be a non-negative integer, got {min_size!r}")
    if min_size * num_clients > n_images:
        raise ConfigError(
            f"min_size={min_size} x num_clients={num_clients} exceeds the {n_images} images to distribute"
        )
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ConfigError(f"max_tries must be a positive integer, got {max_tries!r}")

    rng = _rng(seed, _Stream.DIRICHLET)
    n_classes = label_array.shape[1]
    positive = label_array == POSITIVE  # (n, N)
    n_positive = positive.sum(axis=1)  # (n,)
    rank_in_row = np.cumsum(positive, axis=1) - 1  # (n, N): index of each positive within its row
    for attempt in range(1, max_tries + 1):
        # Primary class: the j-th positive of the row with j uniform; pseudo-class N for rows without one.
        choice = np.floor(rng.random(n_images) * np.maximum(n_positive, 1)).astype(np.int64)
        primary = np.full(n_images, n_classes, dtype=np.int64)
        rows, cols = np.nonzero(positive & (rank_in_row == choice[:, None]))
        primary[rows] = cols
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=n_classes + 1)  # (N+1, K)
        # Inverse-CDF draw of each image's client from its primary class's proportions.
        cdf = np.cumsum(proportions[primary], axis=1)  # (n, K)
        uniform = rng.random((n_images, 1))
        assignment = np.minimum(np.sum(cdf <= uniform, axis=1), num_clients - 1)
        sizes = np.bincount(assignment, minlength=num_clients)
        if sizes.min() >= min_size:
            logger.debug("dirichlet partition: sizes %s after %d draw(s)", sizes.tolist(), attempt)
            return Partition.from_assignment(assignment, num_clients)
    raise ConfigError(
        f"dirichlet_partition: no draw in max_tries={max_tries} gave every one of num_clients={num_clients} "
        f"clients at least min_size={min_size} images at alpha={alpha}; raise alpha or max_tries, or lower "
        "min_size or num_clients"
    )


# ------------------------------------------------------------------------------------------- partial labels


def mask_partial_labels(
    labels: ArrayLike,
    rho: float,
    *,
    seed: int,
    mode: MaskMode | str = MaskMode.UNKNOWN,
) -> NDArray[np.int8]:
    """Partial-label benchmark: hide each POSITIVE label independently with probability ``rho``.

    ``mode="unknown"`` (default) turns a hidden positive into UNKNOWN, the partial-label setting the paper
    describes; ``mode="negative"`` turns it into NEGATIVE, which is what the authors' code does (reference
    section 3.3) and which teaches the model false negatives. NEGATIVE and UNKNOWN entries are left as they
    are. Apply to the training split only. Returns a new int8 matrix; the input is not modified.
    """
    label_array = _check_labels(labels)
    if not (_is_real(rho) and 0.0 <= rho < 1.0):
        raise ConfigError(f"rho must be in [0, 1), got {rho!r}")
    try:
        mask_mode = MaskMode(mode)
    except ValueError:
        raise ConfigError(f"mode must be one of {[m.value for m in MaskMode]}, got {mode!r}") from None
    hidden_value = UNKNOWN if mask_mode is MaskMode.UNKNOWN else NEGATIVE
    hide = (label_array == POSITIVE) & (_rng(seed, _Stream.PARTIAL_LABELS).random(label_array.shape) < rho)
    out = label_array.copy()
    out[hide] = hidden_value
    return out


# ---------------------------------------------------------------------------------------------- participation


def participants_per_round(num_clients: int, fraction: float, min_clients: int = 1) -> int:
    """m = max(min_clients, floor(fraction * num_clients)): how many clients :func:`sample_participants` draws."""
    return max(min_clients, math.floor(fraction * num_clients + _FLOOR_SLACK))


def sample_participants(
    num_clients: int,
    fraction: float,
    round: int,
    seed: int,
    min_clients: int = 1,
) -> list[int]:
    """The sorted ids of the clients that take part in ``round``: a uniform sample without replacement.

    m = max(min_clients, floor(fraction * num_clients)), Flower's rule for ``fraction_fit`` and
    ``min_fit_clients``. The sample depends only on (seed, round), so a resumed run or a second process draws
    the same clients, and successive rounds are independent draws.

    Raises:
        ConfigError: num_clients < 1, fraction outside (0, 1], min_clients outside [1, num_clients], or a
            negative round or seed.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not (_is_real(fraction) and 0.0 < fraction <= 1.0):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or not 1 <= min_clients <= num_clients:
        raise ConfigError(f"min_clients must be an integer in [1, num_clients={num_clients}], got {min_clients!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ConfigError(f"round must be a non-negative integer, got {round!r}")
    count = participants_per_round(num_clients, fraction, min_clients)
    rng = _rng(seed, _Stream.PARTICIPATION, round)
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))
