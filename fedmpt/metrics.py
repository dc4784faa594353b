"""Multi-label evaluation metrics: mAP and the class-wise / overall precision, recall and F1.

Conventions shared by every function here:

* ``scores`` is a float matrix ``(n_images, n_classes)``; larger means "more likely positive". Threshold
  metrics assume probabilities (sigmoid outputs); ranking metrics (AP, top-k) accept any monotone score.
* ``labels`` is an integer matrix of the same shape with ``POSITIVE = 1``, ``NEGATIVE = 0`` and
  ``UNKNOWN = -1`` (the partial-label convention of :mod:`fedmpt.data.labels`). An UNKNOWN entry is removed
  from every count: it is neither a positive, a negative, a true/false positive nor a false negative.
* Every metric is a **fraction in [0, 1]**; applications multiply by 100 when they print percent, as the
  paper's tables do.
* A ratio whose denominator is zero is defined as 0 (``0/0 = 0``), the convention of the multi-label
  literature (ML-GCN, ASL): a class never predicted has precision 0, a class without positives has recall 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedmpt.data.labels import NEGATIVE, POSITIVE, UNKNOWN, validate_label_matrix
from fedmpt.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_TOP_K = 3
# The grid the authors' evaluation sweeps (reference section 3.5); only used by the optimistic variant.
OPTIMISTIC_THRESHOLD_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _validated_labels(labels: ArrayLike, shape: tuple[int, ...]) -> NDArray[np.int8]:
    """Return ``labels`` as an int8 matrix of ``shape`` with entries in {-1, 0, 1}.

    Raises ``DatasetError`` (from :func:`fedmpt.data.labels.validate_label_matrix`) naming the bad entry.
    """
    label_array = validate_label_matrix(labels, shape[1], source="metric labels")
    if label_array.shape != shape:
        raise DatasetError(f"metric labels: shape {label_array.shape} differs from the score shape {shape}")
    return label_array


def _validated(scores: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int8]]:
    """Return ``scores`` as float64 and ``labels`` as int8, or raise ``ValueError`` naming the defect."""
    score_array = np.asarray(scores, dtype=np.float64)
    if score_array.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_images, n_classes) matrix, got shape {score_array.shape}")
    if score_array.shape[0] == 0 or score_array.shape[1] == 0:
        raise ValueError(f"scores must have at least one image and one class, got shape {score_array.shape}")
    if not np.all(np.isfinite(score_array)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(score_array))[0])
        raise ValueError(f"scores must be finite; scores{bad} = {score_array[bad]}")
    return score_array, _validated_labels(labels, score_array.shape)


def _class_average_precision(scores: NDArray[np.float64], positive: NDArray[np.bool_]) -> float:
    """Non-interpolated AP of one class over its known entries (``positive`` has at least one True).

    AP = sum_t (R_t - R_{t-1}) P_t over the distinct score values t in decreasing order, where P_t and R_t are
    the precision and recall of "predict positive iff score >= t". Tied scores form one operating point, which
    is what ``sklearn.metrics.average_precision_score`` computes.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_positive = positive[order]
    true_pos = np.cumsum(sorted_positive)  # (n,)
    # Last position of each run of tied scores: the operating points.
    ends = np.append(np.flatnonzero(np.diff(sorted_scores) != 0.0), sorted_scores.size - 1)
    tp_at = true_pos[ends].astype(np.float64)
    precision = tp_at / (ends + 1.0)
    recall_gain = np.diff(tp_at, prepend=0.0) / tp_at[-1]
    return float(np.sum(recall_gain * precision))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Per-class non-interpolated average precision, shape ``(n_classes,)``.

    For class c, the images whose label is UNKNOWN are dropped from the ranking, the remaining ones are sorted
    by decreasing score and AP_c = sum_t (R_t - R_{t-1}) P_t over the distinct scores t (ties are one
    operating point). A class with no known positive has no AP: its entry is NaN. Agrees with
    ``sklearn.metrics.average_precision_score`` on each class's known entries.
    """
    score_array, label_array = _validated(scores, labels)
    n_classes = score_array.shape[1]
    ap = np.full(n_classes, np.nan, dtype=np.float64)
    for c in range(n_classes):
        known = label_array[:, c] != UNKNOWN
        positive = label_array[known, c] == POSITIVE
        if positive.any():
            ap[c] = _class_average_precision(score_array[known, c], positive)
    return ap


def mean_average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Mean of the per-class AP over the classes that have at least one known positive, in [0, 1].

    Unlike the authors' evaluation (which counts a class without positives as AP 0), classes without positives
    are left out, the usual definition (VOC, ML-GCN, ASL). Returns NaN, with a warning, when no class has a
    positive (e.g. a client's tiny local test split).
    """
    ap = average_precision(scores, labels)
    defined = ~np.isnan(ap)
    if not defined.any():
        logger.warning("mean_average_precision: no class has a known positive; mAP is undefined (NaN)")
        return math.nan
    return float(np.mean(ap[defined]))


def _safe_ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]) -> NDArray[np.float64]:
    """Element-wise numerator / denominator with 0/0 (and x/0) defined as 0."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), defined as 0 when a + b = 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


@dataclass(frozen=True)
class PrecisionRecallF1:
    """Class-averaged (CP, CR, CF1) and overall (OP, OR, OF1) precision, recall and F1, each in [0, 1]."""

    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float


def precision_recall_f1(predicted: ArrayLike, labels: ArrayLike) -> PrecisionRecallF1:
    """CP/CR/CF1 and OP/OR/OF1 of a binary prediction matrix against multi-label ground truth.

    With TP_c, FP_c, FN_c counted over the known (non-UNKNOWN) entries of class c::

        CP = mean_c TP_c / (TP_c + FP_c)        OP = sum_c TP_c / sum_c (TP_c + FP_c)
        CR = mean_c TP_c / (TP_c + FN_c)        OR = sum_c TP_c / sum_c (TP_c + FN_c)
        CF1 = 2 CP CR / (CP + CR)               OF1 = 2 OP OR / (OP + OR)

    The class means run over **all** classes (the standard definition), each ratio with 0/0 = 0; so a class
    with no positive in the evaluation set contributes 0 to CR. CF1 is the harmonic mean of the averaged CP
    and CR, not the average of per-class F1.
    """
    predicted_array = np.asarray(predicted)
    if predicted_array.dtype != np.bool_ or predicted_array.ndim != 2:
        raise ValueError(
            f"predicted must be a 2-D boolean matrix, got dtype {predicted_array.dtype}, shape {predicted_array.shape}"
        )
    label_array = _validated_labels(labels, predicted_array.shape)
    positive = label_array == POSITIVE
    negative = label_array == NEGATIVE
    tp = np.sum(predicted_array & positive, axis=0).astype(np.float64)  # (C,)
    fp = np.sum(predicted_array & negative, axis=0).astype(np.float64)
    fn = np.sum(~predicted_array & positive, axis=0).astype(np.float64)
    cp = float(np.mean(_safe_ratio(tp, tp + fp)))
    cr = float(np.mean(_safe_ratio(tp, tp + fn)))
    op = float(_safe_ratio(np.array(tp.sum()), np.array(tp.sum() + fp.sum())))
    o_r = float(_safe_ratio(np.array(tp.sum()), np.array(tp.sum() + fn.sum())))
    return PrecisionRecallF1(CP=cp, CR=cr, CF1=_harmonic_mean(cp, cr), OP=op, OR=o_r, OF1=_harmonic_mean(op, o_r))


def _check_threshold(threshold: float) -> None:
    if not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")


def _check_top_k(top_k: int, n_classes: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_classes:
        raise ConfigError(f"top_k must be an integer in [1, n_classes={n_classes}], got {top_k!r}")


def threshold_predictions(scores: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> NDArray[np.bool_]:
    """Predict class c for an image iff its score is >= ``threshold`` (0.5 on sigmoid probabilities)."""
    _check_threshold(threshold)
    return np.asarray(scores, dtype=np.float64) >= threshold


def top_k_predictions(scores: ArrayLike, top_k: int = DEFAULT_TOP_K) -> NDArray[np.bool_]:
    """Predict, for each image, exactly its ``top_k`` highest-scoring classes.

    The ranking is over all classes (the model does not know which labels are UNKNOWN); ties are broken
    towards the lower class index so that the result is deterministic.
    """
    score_array = np.asarray(scores, dtype=np.float64)
    if score_array.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_images, n_classes) matrix, got shape {score_array.shape}")
    _check_top_k(top_k, score_array.shape[1])
    top = np.argsort(-score_array, axis=1, kind="stable")[:, :top_k]  # (n, k)
    predicted = np.zeros(score_array.shape, dtype=np.bool_)
    np.put_along_axis(predicted, top, True, axis=1)
    return predicted


@dataclass(frozen=True)
class MultiLabelMetrics:
    """The paper's metric set, every value a fraction in [0, 1] (multiply by 100 for percent).

    ``mAP`` from :func:`mean_average_precision`; ``CP..OF1`` from :func:`precision_recall_f1` on the
    predictions ``score >= threshold``; ``*_top_k`` on the predictions "the top_k highest-scoring classes".
    """

    mAP: float
    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float
    CP_top_k: float
    CR_top_k: float
    CF1_top_k: float
    OP_top_k: float
    OR_top_k: float
    OF1_top_k: float
    threshold: float
    top_k: int

    def to_dict(self) -> dict[str, float]:
        """The fields as a flat ``{name: value}`` dict (``top_k`` as a float), e.g. for metrics.jsonl."""
        return {name: float(value) for name, value in asdict(self).items()}


def multilabel_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    top_k: int = DEFAULT_TOP_K,
) -> MultiLabelMetrics:
    """Compute mAP, CP/CR/CF1/OP/OR/OF1 at ``threshold`` and at ``top_k``; UNKNOWN labels are ignored.

    ``scores`` should be probabilities for the threshold metrics to mean anything (apply the sigmoid first);
    the ranking metrics are invariant to any increasing transform.
    """
    score_array, label_array = _validated(scores, labels)
    _check_threshold(threshold)
    _check_top_k(top_k, score_array.shape[1])
    at_threshold = precision_recall_f1(threshold_predictions(score_array, threshold), label_array)
    at_top_k = precision_recall_f1(top_k_predictions(score_array, top_k), label_array)
    return MultiLabelMetrics(
        mAP=mean_average_precision(score_array, label_array),
        CP=at_threshold.CP,
        CR=at_threshold.CR,
        CF1=at_threshold.CF1,
        OP=at_threshold.OP,
        OR=at_threshold.OR,
        OF1=at_threshold.OF1,
        CP_top_k=at_top_k.CP,
        CR_top_k=at_top_k.CR,
        CF1_top_k=at_top_k.CF1,
        OP_top_k=at_top_k.OP,
        OR_top_k=at_top_k.OR,
        OF1_top_k=at_top_k.OF1,
        threshold=float(threshold),
        top_k=int(top_k),
    )


@dataclass(frozen=True)
class OptimisticF1:
    """Best CF1 and best OF1 over a threshold grid, each with the threshold that achieved it.

    OPTIMISTIC: the thresholds are selected on the evaluation set itself, and CF1 and OF1 may come from
    different thresholds. Only for comparison with the authors' reported numbers, never as a headline metric.
    """

    CF1: float
    CF1_threshold: float
    OF1: float
    OF1_threshold: float


def optimistic_best_threshold_f1(
    scores: ArrayLike,
    labels: ArrayLike,
    thresholds: Sequence[float] = OPTIMISTIC_THRESHOLD_GRID,
) -> OptimisticF1:
    """Maximum CF1 and maximum OF1 over ``thresholds``, each selected ON THE TEST SET (optimistic, biased up).

    Reproduces the authors' evaluation protocol (reference section 3.5: every metric is the maximum over the
    thresholds 0.1..0.9, independently), which leaks test labels into the choice of the operating point. Ties
    keep the first threshold in ``thresholds`` order.
    """
    score_array, label_array = _validated(scores, labels)
    if len(thresholds) == 0:
        raise ConfigError("thresholds must hold at least one value, got an empty sequence")
    results = [(precision_recall_f1(threshold_predictions(score_array, t), label_array), float(t)) for t in thresholds]
    # max() keeps the first maximum, i.e. ties go to the earliest threshold.
    best_cf1, cf1_threshold = max(results, key=lambda item: item[0].CF1)
    best_of1, of1_threshold = max(results, key=lambda item: item[0].OF1)
    return OptimisticF1(CF1=best_cf1.CF1, CF1_threshold=cf1_threshold, OF1=best_of1.OF1, OF1_threshold=of1_threshold)
