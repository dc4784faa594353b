"""Tests of the conditional gate (simplex, uniform init, NumPy reference) and of the chained kernels."""

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
from fedmpt.model.asymmetric_loss import asymmetric_loss
from fedmpt.model.gate import ConditionGate, combine_conditions
from fedmpt.model.sinkhorn import ConditionTransport, SinkhornConfig


def _trained_gate(dim: int, conditions: int, rank: int, seed: int, normalize: bool = True) -> ConditionGate:
    """A gate with random non-zero ``up`` weights (as after training), in float64."""
    gen = torch.Generator().manual_seed(seed)
    gate = ConditionGate(dim, conditions, rank, normalize_input=normalize, generator=gen).double()
    with torch.no_grad():
        gate.up.weight.copy_(torch.randn(gate.up.weight.shape, generator=gen, dtype=torch.float64) * 3)
        gate.up.bias.copy_(torch.randn(gate.up.bias.shape, generator=gen, dtype=torch.float64))
    return gate


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    dim=st.integers(1, 10),
    conditions=st.integers(1, 6),
    rank=st.integers(1, 5),
    scale=st.floats(1e-3, 1e3),
    normalize=st.booleans(),
)
def test_weights_lie_on_the_simplex_and_match_numpy(
    seed: int, batch: int, dim: int, conditions: int, rank: int, scale: float, normalize: bool
) -> None:
    gate = _trained_gate(dim, conditions, rank, seed, normalize)
    z = np.random.default_rng(seed).normal(size=(batch, dim)) * scale
    weights = gate(torch.tensor(z)).detach().numpy()
    assert weights.shape == (batch, conditions)
    assert np.all(weights >= 0.0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    inputs = z / np.linalg.norm(z, axis=1, keepdims=True) if normalize else z
    omega = inputs @ gate.down.weight.detach().numpy().T @ gate.up.weight.detach().numpy().T
    omega = omega + gate.up.bias.detach().numpy()
    expected = np.exp(omega - omega.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-9, atol=1e-300)


def test_initial_gate_is_uniform() -> None:
    gate = ConditionGate(32, 5, 8, generator=torch.Generator().manual_seed(0))
    weights = gate(torch.randn(7, 32) * 10)
    assert torch.equal(weights, torch.full((7, 5), 0.2))
    assert float(gate.down.weight.detach().abs().max()) > 0.0


def test_combine_conditions_is_the_weighted_sum() -> None:
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(4), size=3)
    scores = rng.normal(size=(3, 4, 6))
    expected = np.stack([sum(weights[b, n] * scores[b, n] for n in range(4)) for b in range(3)])
    got = combine_conditions(torch.tensor(weights), torch.tensor(scores))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_gating_commutes_with_a_shared_affine_map() -> None:
    rng = np.random.default_rng(2)
    weights = torch.tensor(rng.dirichlet(np.ones(3), size=2))
    scores = torch.tensor(rng.uniform(-1, 1, size=(2, 3, 5)))
    torch.testing.assert_close(
        combine_conditions(weights, 20.0 * scores - 5.0), 20.0 * combine_conditions(weights, scores) - 5.0
    )


def _sample_loss(weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return (combine_conditions(weights, scores) ** 2).sum()


def _one_at_a_time(
    gate: ConditionGate, z: torch.Tensor, scores: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    grads = []
    for i in range(z.shape[0]):
        gate.zero_grad()
        _sample_loss(gate(z[i : i + 1]), scores[i : i + 1]).backward()
        grads.append({name: p.grad.clone() for name, p in gate.named_parameters() if p.grad is not None})
    return grads


def test_per_sample_gradients_under_vmap_match_one_at_a_time() -> None:
    gate = _trained_gate(8, 4, 3, seed=3)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    scores = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    params = {name: p.detach() for name, p in gate.named_parameters()}

    def loss(p: dict[str, torch.Tensor], zi: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
        return _sample_loss(functional_call(gate, p, (zi.unsqueeze(0),)), si.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, z, scores)
    expected = _one_at_a_time(gate, z, scores)
    assert set(per_sample) == {"down.weight", "up.weight", "up.bias"}
    for i in range(5):
        for name, value in per_sample.items():
            torch.testing.assert_close(value[i], expected[i][name])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_hook_grad_samples_match_one_at_a_time() -> None:
    gate = _trained_gate(8, 4, 3, seed=5)
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    scores = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    expected = _one_at_a_time(gate, z, scores)
    gate.zero_grad()
    wrapped = GradSampleModule(gate, loss_reduction="sum")
    weights = wrapped(z)
    torch.stack([_sample_loss(weights[i : i + 1], scores[i : i + 1]) for i in range(5)]).sum().backward()
    for name, param in gate.named_parameters():
        for i in range(5):
            torch.testing.assert_close(param.grad_sample[i], expected[i][name])  # type: ignore[attr-defined]
    wrapped._close()


def test_bad_shapes_are_rejected() -> None:
    gate = ConditionGate(8, 3, 2)
    with pytest.raises(ValueError, match=r"\(B, D=8\), got \(2, 7\)"):
        gate(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"got \(2, 3\) and \(2, 4, 5\)"):
        combine_conditions(torch.rand(2, 3), torch.rand(2, 4, 5))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 2, 1), {}, "dim"),
        ((8, 0, 1), {}, "num_conditions"),
        ((8, 2, -1), {}, "rank"),
        ((8, 2, 2), {"normalize_input": 1}, "normalize_input"),
    ],
)
def test_bad_settings_are_rejected(args: tuple[object, ...], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConditionGate(*args, **kwargs)  # type: ignore[arg-type]


def test_chained_kernels_give_exact_per_sample_gradients() -> None:
    # adapters -> transport -> gate -> asymmetric loss, as the client trains them, under vmap(grad)
    gen = torch.Generator().manual_seed(7)
    dim, conditions, classes, patches = 6, 3, 4, 5
    adapters = ConditionAdapters(dim, conditions, 2, generator=gen).double()
    gate = _trained_gate(dim, conditions, 2, seed=8)
    transport = ConditionTransport(sinkhorn=SinkhornConfig(max_iter=30, fixed_iterations=True)).double()
    with torch.no_grad():
        adapters.up.copy_(torch.randn(adapters.up.shape, generator=gen, dtype=torch.float64) * 0.3)
    modules = torch.nn.ModuleDict({"adapters": adapters, "gate": gate, "transport": transport})
    text = torch.randn(conditions, classes, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(4, patches, dim, generator=gen, dtype=torch.float64)
    z = torch.randn(4, dim, generator=gen, dtype=torch.float64)
    y = torch.tensor([[1, 0, -1, 0], [0, 0, 1, 1], [-1, -1, 1, 0], [0, 1, 0, 0]])

    def part(p: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix + "."): v for k, v in p.items() if k.startswith(prefix + ".")}

    def loss(
        p: dict[str, torch.Tensor], xi: torch.Tensor, zi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        features = functional_call(adapters, part(p, "adapters"), (xi[None],))
        logits = functional_call(transport, part(p, "transport"), (features, text)).logits
        weights = functional_call(gate, part(p, "gate"), (zi[None],))
        final = combine_conditions(weights, logits)
        return asymmetric_loss(final, yi[None], gamma_pos=1.0, gamma_neg=2.0, check_targets=False)[0]

    params = {name: p.detach() for name, p in modules.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, z, y)
    for i in range(4):
        modules.zero_grad()
        logits = transport(adapters(x[i : i + 1]), text).logits
        final = combine_conditions(gate(z[i : i + 1]), logits)
        asymmetric_loss(final, y[i : i + 1], gamma_pos=1.0, gamma_neg=2.0).sum().backward()
        for name, param in modules.named_parameters():
            assert param.grad is not None
            torch.testing.assert_close(per_sample[name][i], param.grad)
