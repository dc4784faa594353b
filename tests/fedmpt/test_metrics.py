"""Tests of fedmpt.metrics against scikit-learn, hand-computed examples and a brute-force implementation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score

from fedmpt.errors import ConfigError, DatasetError
from fedmpt.metrics import (
    MultiLabelMetrics,
    average_precision,
    mean_average_precision,
    multilabel_metrics,
    optimistic_best_threshold_f1,
    precision_recall_f1,
    threshold_predictions,
    top_k_predictions,
)

# A coarse grid of score values so that ties are frequent.
SCORE_VALUES = [0.0, 0.1, 0.25, 0.5, 0.5000001, 0.75, 0.9, 1.0]


@st.composite
def scored_labels(draw: st.DrawFn, min_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    n_images = draw(st.integers(1, 25))
    n_classes = draw(st.integers(min_classes, 6))
    scores = draw(hnp.arrays(np.float64, (n_images, n_classes), elements=st.sampled_from(SCORE_VALUES)))
    labels = draw(hnp.arrays(np.int8, (n_images, n_classes), elements=st.sampled_from([-1, 0, 1])))
    return scores, labels


def sklearn_per_class_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The oracle: sklearn's AP on each class's known entries; NaN where the class has no known positive."""
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        known = labels[:, c] != -1
        y_true = labels[known, c] == 1
        if y_true.any():
            out[c] = average_precision_score(y_true, scores[known, c])
    return out


def brute_force_prf(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Loop-by-loop CP/CR/CF1/OP/OR/OF1 with 0/0 = 0, written independently of the library."""
    n_images, n_classes = labels.shape

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    tp = [0] * n_classes
    fp = [0] * n_classes
    fn = [0] * n_classes
    for i in range(n_images):
        for c in range(n_classes):
            if labels[i, c] == -1:
                continue
            if predicted[i, c] and labels[i, c] == 1:
                tp[c] += 1
            elif predicted[i, c]:
                fp[c] += 1
            elif labels[i, c] == 1:
                fn[c] += 1
    cp = sum(ratio(tp[c], tp[c] + fp[c]) for c in range(n_classes)) / n_classes
    cr = sum(ratio(tp[c], tp[c] + fn[c]) for c in range(n_classes)) / n_classes
    op = ratio(sum(tp), sum(tp) + sum(fp))
    o_r = ratio(sum(tp), sum(tp) + sum(fn))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": ratio(2 * cp * cr, cp + cr),
        "OP": op,
        "OR": o_r,
        "OF1": ratio(2 * op * o_r, op + o_r),
    }


def brute_force_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k by repeated arg-max, lower index first on ties."""
    predicted = np.zeros(scores.shape, dtype=bool)
    for i in range(scores.shape[0]):
        remaining = list(range(scores.shape[1]))
        for _ in range(k):
            best = max(remaining, key=lambda c, row=scores[i]: (row[c], -c))
            predicted[i, best] = True
            remaining.remove(best)
    return predicted


# ---------------------------------------------------------------------------------------------- AP / mAP


def test_ap_hand_computed_no_ties() -> None:
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    labels = np.array([[1], [0], [1], [0]], dtype=np.int8)
    # Positives at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision(scores, labels)[0] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0, abs=1e-12)


def test_ap_ties_form_one_operating_point() -> None:
    scores = np.array([[0.9], [0.5], [0.5]])
    labels = np.array([[0], [1], [0]], dtype=np.int8)
    # The only operating point that reaches the positive includes all three images: precision 1/3.
    assert average_precision(scores, labels)[0] == pytest.approx(1.0 / 3.0, abs=1e-12)


def test_ap_unknown_entries_are_dropped_from_ranking() -> None:
    scores = np.array([[0.9], [0.95], [0.8], [0.7]])
    labels = np.array([[1], [-1], [0], [1]], dtype=np.int8)
    # Without the UNKNOWN image (rank 1): positives at ranks 1 and 3 of the remaining three.
    assert average_precision(scores, labels)[0] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0, abs=1e-12)


def test_map_excludes_classes_without_positives() -> None:
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]])
    labels = np.array([[1, 0, -1], [0, 0, -1]], dtype=np.int8)
    ap = average_precision(scores, labels)
    assert ap[0] == pytest.approx(1.0)
    assert math.isnan(ap[1]) and math.isnan(ap[2])
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)


def test_map_without_any_positive_is_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="fedmpt.metrics"):
        value = mean_average_precision(np.array([[0.3, 0.2]]), np.array([[0, -1]], dtype=np.int8))
    assert math.isnan(value)
    assert "undefined" in caplog.text


@settings(max_examples=150, deadline=None)
@given(scored_labels())
def test_ap_matches_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    scores, labels = data
    expected = sklearn_per_class_ap(scores, labels)
    got = average_precision(scores, labels)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], atol=1e-6, rtol=0)
    if (~np.isnan(expected)).any():
        assert mean_average_precision(scores, labels) == pytest.approx(np.nanmean(expected), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(scored_labels())
def test_ap_invariant_under_increasing_transform(data: tuple[np.ndarray, np.ndarray]) -> None:
    scores, labels = data
    logits = np.log(scores + 0.01) * 3.0 - 1.0  # strictly increasing in the scores
    np.testing.assert_allclose(
        average_precision(logits, labels), average_precision(scores, labels), atol=1e-12, equal_nan=True
    )


# ---------------------------------------------------------------------------------------------- P/R/F1


def test_threshold_and_top_k_metrics_hand_computed() -> None:
    scores = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1]])
    labels = np.array([[1, 0, 0], [1, 1, -1]], dtype=np.int8)
    result = multilabel_metrics(scores, labels, threshold=0.5, top_k=1)
    expected = {
        # At 0.5: class 0 tp=1 fn=1; class 1 tp=1; class 2 fp=1 (its UNKNOWN entry ignored).
        "CP": 2 / 3,
        "CR": 1 / 2,
        "CF1": 4 / 7,
        "OP": 2 / 3,
        "OR": 2 / 3,
        "OF1": 2 / 3,
        # Top-1: image 0 -> class 0, image 1 -> class 1; no false positive at all.
        "CP_top_k": 2 / 3,
        "CR_top_k": 1 / 2,
        "OP_top_k": 1.0,
        "OR_top_k": 2 / 3,
        "OF1_top_k": 0.8,
        # Class 0: both positives, AP 1; class 1: its positive ranked first, AP 1; class 2: no positive.
        "mAP": 1.0,
    }
    for name, value in expected.items():
        assert getattr(result, name) == pytest.approx(value, abs=1e-12), name


def test_zero_over_zero_is_zero() -> None:
    result = precision_recall_f1(np.zeros((2, 2), dtype=bool), np.array([[0, 0], [0, -1]], dtype=np.int8))
    assert (result.CP, result.CR, result.CF1, result.OP, result.OR, result.OF1) == (0, 0, 0, 0, 0, 0)


@settings(max_examples=100, deadline=None)
@given(scored_labels(), st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.integers(1, 6))
def test_multilabel_metrics_match_brute_force(
    data: tuple[np.ndarray, np.ndarray], threshold: float, top_k: int
) -> None:
    scores, labels = data
    top_k = min(top_k, scores.shape[1])
    result = multilabel_metrics(scores, labels, threshold=threshold, top_k=top_k)
    at_threshold = brute_force_prf(scores >= threshold, labels)
    at_top_k = brute_force_prf(brute_force_top_k(scores, top_k), labels)
    for name, value in at_threshold.items():
        assert getattr(result, name) == pytest.approx(value, abs=1e-12), name
    for name, value in at_top_k.items():
        assert getattr(result, f"{name}_top_k") == pytest.approx(value, abs=1e-12), name
    for value in result.to_dict().values():
        assert math.isnan(value) or 0.0 <= value <= max(1.0, top_k)


def test_top_k_predicts_exactly_k_per_image_with_low_index_tie_break() -> None:
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [0.0, 0.2, 0.9, 0.9]])
    expected = np.array([[True, True, False, False], [False, False, True, True]])
    np.testing.assert_array_equal(top_k_predictions(scores, 2), expected)


def test_threshold_predictions_inclusive() -> None:
    np.testing.assert_array_equal(
        threshold_predictions(np.array([[0.5, 0.49999, 0.7]]), 0.5), np.array([[True, False, True]])
    )


def test_to_dict_has_every_field() -> None:
    result = multilabel_metrics(np.array([[0.9, 0.1]]), np.array([[1, 0]], dtype=np.int8), top_k=1)
    as_dict = result.to_dict()
    assert set(as_dict) == set(MultiLabelMetrics.__dataclass_fields__)
    assert as_dict["top_k"] == 1.0 and as_dict["threshold"] == 0.5
    assert as_dict["mAP"] == 1.0 and as_dict["OF1"] == 1.0


def test_optimistic_best_threshold_selects_on_the_test_set() -> None:
    scores = np.array([[0.35, 0.05], [0.15, 0.25]])
    labels = np.array([[1, 0], [0, 1]], dtype=np.int8)
    best = optimistic_best_threshold_f1(scores, labels)
    # At 0.2 both positives are predicted and both negatives are not: perfect F1; 0.1 and 0.3 are worse.
    assert (best.CF1, best.CF1_threshold, best.OF1, best.OF1_threshold) == pytest.approx((1.0, 0.2, 1.0, 0.2))
    fixed = multilabel_metrics(scores, labels, top_k=1)
    assert (fixed.CF1, fixed.OF1) == (0.0, 0.0)  # nothing reaches 0.5


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("scores", "labels", "error", "message"),
    [
        (np.zeros(3), np.zeros(3, dtype=np.int8), ValueError, "2-D"),
        (np.zeros((2, 2)), np.zeros((2, 3), dtype=np.int8), DatasetError, "3 columns but there are 2"),
        (np.zeros((2, 2)), np.zeros((3, 2), dtype=np.int8), DatasetError, "shape"),
        (np.array([[np.nan, 0.1]]), np.zeros((1, 2), dtype=np.int8), ValueError, "finite"),
        (np.zeros((1, 2)), np.array([[2, 0]], dtype=np.int8), DatasetError, r"value .*2.* at row 0"),
        (np.zeros((1, 2)), np.array([[0.5, 0.0]]), DatasetError, "row 0, column 0"),
        (np.zeros((0, 2)), np.zeros((0, 2), dtype=np.int8), ValueError, "at least one image"),
    ],
)
def test_bad_input_names_the_defect(
    scores: np.ndarray, labels: np.ndarray, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        multilabel_metrics(scores, labels, top_k=1)


@pytest.mark.parametrize("top_k", [0, 3, True, 1.5])
def test_bad_top_k_is_config_error(top_k: object) -> None:
    with pytest.raises(ConfigError, match="top_k"):
        multilabel_metrics(np.zeros((1, 2)), np.zeros((1, 2), dtype=np.int8), top_k=top_k)  # type: ignore[arg-type]


def test_bad_threshold_is_config_error() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        multilabel_metrics(np.zeros((1, 2)), np.zeros((1, 2), dtype=np.int8), threshold=math.nan, top_k=1)


def test_sklearn_oracle_is_quiet_for_defined_classes() -> None:
    # Guards the oracle itself: sklearn must not warn on classes we compare (they all have a positive).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sklearn_per_class_ap(np.array([[0.2], [0.4]]), np.array([[1], [0]], dtype=np.int8))
