"""Tests of the per-condition low-rank adapters: shapes, identity at init, NumPy reference, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from torch.func import functional_call, grad, vmap

from fedmpt.errors import ConfigError
from fedmpt.model.adapters import ConditionAdapters


def _trained_adapters(
    dim: int, conditions: int, rank: int, seed: int, residual: bool = True
) -> ConditionAdapters:
    """Adapters with a random non-zero ``up`` (as after training), in float64."""
    gen = torch.Generator().manual_seed(seed)
    module = ConditionAdapters(dim, conditions, rank, residual=residual, generator=gen).double()
    with torch.no_grad():
        module.up.copy_(torch.randn(module.up.shape, generator=gen, dtype=torch.float64))
    return module


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    patches=st.integers(1, 5),
    dim=st.integers(2, 9),
    conditions=st.integers(1, 4),
    residual=st.booleans(),
    data=st.data(),
)
def test_output_matches_numpy_per_condition_maps(
    seed: int, batch: int, patches: int, dim: int, conditions: int, residual: bool, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(1, dim))
    module = _trained_adapters(dim, conditions, rank, seed, residual)
    x = np.random.default_rng(seed).normal(size=(batch, patches, dim))
    out = module(torch.tensor(x)).detach().numpy()
    assert out.shape == (batch, conditions, patches, dim)
    down = module.down.detach().numpy()
    up = module.up.detach().numpy()
    for n in range(conditions):
        expected = x @ down[n] @ up[n] + (x if residual else 0.0)
        np.testing.assert_allclose(out[:, n], expected, atol=1e-10)


def test_residual_adapters_start_as_the_identity() -> None:
    module = ConditionAdapters(16, 5, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 7, 16)
    out = module(x)
    for n in range(5):
        assert torch.equal(out[:, n], x)
    assert not torch.equal(module.down, torch.zeros_like(module.down))


def test_non_residual_adapters_start_as_orthogonal_projections() -> None:
    module = ConditionAdapters(12, 3, 4, residual=False, generator=torch.Generator().manual_seed(1)).double()
    eye = torch.eye(12, dtype=torch.float64)
    for n in range(3):
        # the map of condition n as a matrix: rows are images of the basis vectors
        matrix = module(eye.unsqueeze(0))[0, n]
        # idempotent and symmetric, to the float32 precision the parameters were initialised in
        torch.testing.assert_close(matrix @ matrix, matrix, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(matrix, matrix.T, atol=1e-6, rtol=1e-6)
        assert torch.linalg.matrix_rank(matrix) == 4


def test_generator_makes_initialisation_reproducible() -> None:
    first = ConditionAdapters(8, 2, 3, generator=torch.Generator().manual_seed(7))
    second = ConditionAdapters(8, 2, 3, generator=torch.Generator().manual_seed(7))
    other = ConditionAdapters(8, 2, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.down, second.down)
    assert not torch.equal(first.down, other.down)
    assert float(first.down.detach().abs().max()) <= 1.0 / np.sqrt(8)


def _sample_loss(module: ConditionAdapters, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum() + out.sin().sum()


def _one_at_a_time(
    module: ConditionAdapters, x: torch.Tensor, target: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    grads = []
    for i in range(x.shape[0]):
        module.zero_grad()
        _sample_loss(module, target[i], module(x[i : i + 1])[0]).backward()
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    return grads


def test_per_sample_gradients_under_vmap_match_one_at_a_time() -> None:
    module = _trained_adapters(6, 3, 2, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return _sample_loss(module, ti, functional_call(module, p, (xi.unsqueeze(0),))[0])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    expected = _one_at_a_time(module, x, target)
    for i in range(4):
        for name in ("down", "up"):
            torch.testing.assert_close(per_sample[name][i], expected[i][name])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_grad_samples_match_one_at_a_time() -> None:
    module = _trained_adapters(6, 3, 2, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    expected = _one_at_a_time(module, x, target)
    module.zero_grad()
    wrapped = GradSampleModule(module, loss_reduction="sum")
    out = wrapped(x)
    torch.stack([_sample_loss(module, target[i], out[i]) for i in range(4)]).sum().backward()
    for name, param in module.named_parameters():
        for i in range(4):
            torch.testing.assert_close(param.grad_sample[i], expected[i][name])  # type: ignore[attr-defined]
    wrapped._close()


def test_wrong_input_shape_is_rejected() -> None:
    module = ConditionAdapters(8, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, M, D=8\), got \(2, 5, 7\)"):
        module(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"got \(5, 8\)"):
        module(torch.randn(5, 8))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 2, 1), {}, "dim"),
        ((8, 0, 1), {}, "num_conditions"),
        ((8, 2, 0), {}, "rank"),
        ((8, 2, 9), {}, "rank must be <= dim=8"),
        ((8, 2, 2.0), {}, "rank"),
        ((8, 2, 2), {"residual": "yes"}, "residual"),
    ],
)
def test_bad_settings_are_rejected(args: tuple[object, ...], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConditionAdapters(*args, **kwargs)  # type: ignore[arg-type]
