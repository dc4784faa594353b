"""Tests of the per-sample asymmetric loss: hand values, a NumPy reference, unknown labels, independence."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jacrev, vmap

from fedmpt.errors import ConfigError
from fedmpt.model.asymmetric_loss import UNKNOWN_LABEL, asymmetric_loss


def _numpy_asl(
    logits: np.ndarray, targets: np.ndarray, gamma_pos: float, gamma_neg: float, clip: float, eps: float
) -> np.ndarray:
    """Element-by-element reference written from the ASL paper's equations with plain Python floats."""
    out = np.zeros(logits.shape[0])
    for i, j in np.ndindex(*logits.shape):
        p = 1.0 / (1.0 + math.exp(-logits[i, j]))
        if targets[i, j] == 1:
            out[i] -= (1.0 - p) ** gamma_pos * math.log(max(p, eps))
        elif targets[i, j] == 0:
            p_shift = max(p - clip, 0.0)
            out[i] -= p_shift**gamma_neg * math.log(max(1.0 - p_shift, eps))
    return out


def test_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.5], [-3.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 0, -1, 0], [0, 1, -1, -1]])
    loss = asymmetric_loss(logits, targets, gamma_pos=1.0, gamma_neg=2.0, clip=0.05)
    # row 0: 0.5 ln 2 (positive at p=1/2) + two shifted negatives; the unknown label adds nothing.
    # row 1: sigmoid(-3) = 0.047 < clip, so that negative is discarded; the positive at logit 1 remains.
    torch.testing.assert_close(
        loss, torch.tensor([1.8513210485738874, 0.0842490435019141], dtype=torch.float64)
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    classes=st.integers(1, 7),
    gamma_pos=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    gamma_neg=st.sampled_from([0.0, 1.0, 2.0, 4.0, 2.5]),
    clip=st.sampled_from([0.0, 0.05, 0.2]),
    scale=st.floats(0.1, 30.0),
)
def test_matches_numpy_reference(
    seed: int, batch: int, classes: int, gamma_pos: float, gamma_neg: float, clip: float, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, classes)) * scale
    targets = rng.integers(-1, 2, size=(batch, classes))
    got = asymmetric_loss(torch.tensor(logits), torch.tensor(targets), gamma_pos, gamma_neg, clip, 1e-8)
    expected = _numpy_asl(logits, targets, gamma_pos, gamma_neg, clip, 1e-8)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_unknown_labels_give_zero_loss_and_zero_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 5).requires_grad_(True)
    targets = torch.randint(0, 2, (4, 6), generator=gen)
    targets[:, [1, 4]] = UNKNOWN_LABEL
    targets[2] = UNKNOWN_LABEL
    loss = asymmetric_loss(logits, targets)
    known = [0, 2, 3, 5]
    dropped = asymmetric_loss(logits[:, known], targets[:, known])
    torch.testing.assert_close(loss, dropped)
    assert float(loss[2].detach()) == 0.0
    loss.sum().backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad[:, [1, 4]], torch.zeros(4, 2, dtype=torch.float64))
    assert torch.equal(logits.grad[2], torch.zeros(6, dtype=torch.float64))
    assert bool((logits.grad[[0, 1, 3]][:, known] != 0).any())


def test_one_sample_loss_depends_only_on_that_sample() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(-1, 2, (5, 4), generator=gen)
    jacobian = jacrev(lambda x: asymmetric_loss(x, targets, gamma_pos=1.0, gamma_neg=2.0))(
        logits
    )  # (5, 5, 4)
    for i in range(5):
        for j in range(5):
            if i != j:
                assert torch.equal(jacobian[i, j], torch.zeros(4, dtype=torch.float64))
        alone = asymmetric_loss(logits[i : i + 1], targets[i : i + 1], gamma_pos=1.0, gamma_neg=2.0)
        torch.testing.assert_close(
            asymmetric_loss(logits, targets, gamma_pos=1.0, gamma_neg=2.0)[i], alone[0]
        )


def test_per_sample_gradients_under_vmap_match_one_at_a_time() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(-1, 2, (6, 5), generator=gen)

    def sample_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return asymmetric_loss(x.unsqueeze(0), y.unsqueeze(0), gamma_pos=1.0, check_targets=False)[0]

    per_sample = vmap(grad(sample_loss))(logits, targets)
    for i in range(6):
        x = logits[i : i + 1].clone().requires_grad_(True)
        asymmetric_loss(x, targets[i : i + 1], gamma_pos=1.0).sum().backward()
        assert x.grad is not None
        torch.testing.assert_close(per_sample[i], x.grad[0])


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_gradient_of_positive_term_with_and_without_focal_gradient(gamma: float) -> None:
    x = torch.tensor([[-1.3, 0.4, 2.2]], dtype=torch.float64, requires_grad=True)
    targets = torch.ones(1, 3, dtype=torch.int64)
    p = torch.sigmoid(x.detach())
    (full,) = torch.autograd.grad(asymmetric_loss(x, targets, gamma_pos=gamma).sum(), x)
    (frozen,) = torch.autograd.grad(
        asymmetric_loss(x, targets, gamma_pos=gamma, detach_focal_weights=True).sum(), x
    )
    # d/dx [-(1-p)^g log p] = (1-p)^g [g p log p - (1-p)]; with the weight held constant only -(1-p)^g (1-p)
    torch.testing.assert_close(full, (1 - p) ** gamma * (gamma * p * torch.log(p) - (1 - p)))
    torch.testing.assert_close(frozen, -((1 - p) ** gamma) * (1 - p))


def test_gradient_of_negative_term_matches_closed_form() -> None:
    gamma, clip = 2.0, 0.05
    x = torch.tensor([[-4.0, 0.3, 1.7]], dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(asymmetric_loss(x, torch.zeros(1, 3), gamma_neg=gamma, clip=clip).sum(), x)
    p = torch.sigmoid(x.detach())
    q = (p - clip).clamp(min=0)
    # d/dx [-q^g log(1-q)] = p(1-p) [-g q^(g-1) log(1-q) + q^g / (1-q)] where q > 0, else 0
    expected = torch.where(
        q > 0, p * (1 - p) * (-gamma * q ** (gamma - 1) * torch.log(1 - q) + q**gamma / (1 - q)), 0
    )
    assert float(expected[0, 0]) == 0.0
    torch.testing.assert_close(got, expected)


def test_saturated_logits_and_fractional_gammas_stay_finite() -> None:
    x = torch.tensor([[-200.0, 200.0, -200.0, 200.0, -8.0]], requires_grad=True)
    targets = torch.tensor([[1, 1, 0, 0, 0]])
    loss = asymmetric_loss(x, targets, gamma_pos=0.5, gamma_neg=0.5, clip=0.05, eps=1e-8)
    loss.sum().backward()
    assert bool(torch.isfinite(loss).all())
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    # positive at -200: p = 0 is floored at eps; negative at +200: p_m = 0.95; the others vanish
    expected = -math.log(1e-8) - math.sqrt(0.95) * math.log(0.05)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_default_hyper_parameters_are_the_asl_paper_ones() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5)) * 4
    targets = rng.integers(-1, 2, size=(3, 5))
    got = asymmetric_loss(torch.tensor(logits), torch.tensor(targets))
    np.testing.assert_allclose(got.numpy(), _numpy_asl(logits, targets, 0.0, 4.0, 0.05, 1e-8), rtol=1e-10)


def test_bad_targets_and_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"found \[2\]"):
        asymmetric_loss(torch.zeros(2, 3), torch.tensor([[0, 1, 2], [1, 0, -1]]))
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        asymmetric_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="int64"):
        asymmetric_loss(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma_pos": -1.0},
        {"gamma_neg": math.nan},
        {"clip": 1.0},
        {"clip": -0.1},
        {"eps": 0.0},
        {"gamma_pos": True},
    ],
)
def test_bad_hyper_parameters_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        asymmetric_loss(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)
