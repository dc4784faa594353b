"""Tests of the log-domain Sinkhorn solver (POT as the oracle) and of the condition-guided transport scores.

Numerical expectations come from POT, NumPy or a separate autograd computation; the independence tests
compare a problem solved inside a batch with the same problem solved alone.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from fedmpt.errors import ConfigError
from fedmpt.model.sinkhorn import ConditionTransport, SinkhornConfig, sinkhorn_log

TIGHT = SinkhornConfig(max_iter=20_000, tol=1e-12, check_every=1)


def _random_problem(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    cost = rng.random((rows, cols)) * 2.0
    a = rng.random(rows) + 0.05
    b = rng.random(cols) + 0.05
    return cost, a / a.sum(), b / b.sum()


def _pot_plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    plan: np.ndarray = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14)
    return plan


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 9),
    cols=st.integers(1, 7),
    eps=st.floats(0.05, 1.0),
)
def test_plan_marginals_and_value_match_pot(seed: int, rows: int, cols: int, eps: float) -> None:
    cost, a, b = _random_problem(np.random.default_rng(seed), rows, cols)
    expected = _pot_plan(cost, a, b, eps)
    config = SinkhornConfig(epsilon=eps, max_iter=20_000, tol=1e-12, check_every=1)
    result = sinkhorn_log(torch.from_numpy(cost), torch.from_numpy(a), torch.from_numpy(b), config)
    plan = result.plan.numpy()
    np.testing.assert_allclose(plan, expected, atol=1e-10, rtol=1e-7)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-11)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-11)
    assert float(result.transport_cost) == pytest.approx(float((expected * cost).sum()), abs=1e-9)
    assert bool(result.converged)
    assert float(result.marginal_error) == pytest.approx(float(np.abs(plan.sum(1) - a).sum()), abs=1e-12)


def test_batched_problems_are_solved_independently() -> None:
    rng = np.random.default_rng(1)
    problems = [_random_problem(rng, 6, 4) for _ in range(6)]
    cost = torch.tensor(np.stack([p[0] for p in problems]).reshape(3, 2, 6, 4))
    a = torch.tensor(np.stack([p[1] for p in problems]).reshape(3, 2, 6))
    b = torch.tensor(np.stack([p[2] for p in problems]).reshape(3, 2, 4))
    config = SinkhornConfig(epsilon=0.1, max_iter=500, tol=1e-6, check_every=3)
    batched = sinkhorn_log(cost, a, b, config)
    for index in np.ndindex(3, 2):
        alone = sinkhorn_log(cost[index], a[index], b[index], config)
        # per-problem early stopping: same iteration count and same plan as when solved alone
        assert int(batched.iterations[index]) == int(alone.iterations)
        torch.testing.assert_close(batched.plan[index], alone.plan, atol=1e-14, rtol=1e-12)
        expected = _pot_plan(problems[index[0] * 2 + index[1]][0], a[index].numpy(), b[index].numpy(), 0.1)
        np.testing.assert_allclose(batched.plan[index].numpy(), expected, atol=1e-5)


def test_shared_column_marginal_broadcasts() -> None:
    rng = np.random.default_rng(2)
    cost = torch.tensor(rng.random((2, 3, 5, 4)))
    a = torch.softmax(torch.tensor(rng.normal(size=(2, 3, 5))), dim=-1)
    b = torch.full((4,), 0.25, dtype=torch.float64)
    shared = sinkhorn_log(cost, a, b, TIGHT)
    full = sinkhorn_log(cost, a, b.expand(2, 3, 4).clone(), TIGHT)
    torch.testing.assert_close(shared.plan, full.plan)
    np.testing.assert_allclose(shared.plan.sum(-2).numpy(), 0.25, atol=1e-12)


def test_zero_mass_row_gives_zero_row_and_reduced_solution() -> None:
    rng = np.random.default_rng(3)
    cost, a, b = _random_problem(rng, 6, 4)
    a[[0, 3]] = 0.0
    a /= a.sum()
    cost_t = torch.tensor(cost, requires_grad=True)
    result = sinkhorn_log(cost_t, torch.tensor(a), torch.tensor(b), TIGHT)
    plan = result.plan.detach().numpy()
    assert np.all(plan[[0, 3]] == 0.0)
    keep = a > 0
    expected = _pot_plan(cost[keep], a[keep], b, 0.1)
    np.testing.assert_allclose(plan[keep], expected, atol=1e-10)
    result.transport_cost.backward()
    assert cost_t.grad is not None and bool(torch.isfinite(cost_t.grad).all())


def test_zero_mass_marginal_gradient_is_finite() -> None:
    cost = torch.rand(5, 3, dtype=torch.float64)
    a = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25], dtype=torch.float64, requires_grad=True)
    b = torch.full((3,), 1.0 / 3.0, dtype=torch.float64)
    result = sinkhorn_log(cost, a, b, SinkhornConfig(max_iter=50, fixed_iterations=True))
    (result.plan * cost).sum().backward()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_cost_offset_does_not_change_the_plan(dtype: torch.dtype) -> None:
    # <P, K + s> = <P, K> + s for every feasible P, so a huge offset must leave the plan unchanged
    # (the reference removes the offset exactly in float64 from the cost as stored in `dtype`)
    rng = np.random.default_rng(4)
    cost, a, b = _random_problem(rng, 7, 5)
    huge = torch.tensor(cost + 1e7, dtype=dtype)
    base = sinkhorn_log(huge.double() - 1e7, torch.tensor(a), torch.tensor(b), TIGHT)
    config = TIGHT if dtype == torch.float64 else SinkhornConfig(max_iter=2000, tol=1e-6)
    shifted = sinkhorn_log(huge, torch.tensor(a, dtype=dtype), torch.tensor(b), config)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(shifted.plan.double(), base.plan, atol=tol, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("scale", "eps"), [(1e5, 0.1), (1.0, 1e-6), (1e4, 1e-5)])
def test_huge_costs_and_tiny_epsilon_stay_finite(dtype: torch.dtype, scale: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(4, 9, 6, generator=gen, dtype=dtype) * scale
    a = torch.softmax(torch.randn(4, 9, generator=gen, dtype=dtype), dim=-1)
    b = torch.full((6,), 1.0 / 6.0, dtype=dtype)
    result = sinkhorn_log(cost, a, b, SinkhornConfig(epsilon=eps, max_iter=100))
    assert bool(torch.isfinite(result.plan).all())
    assert bool(torch.isfinite(result.marginal_error).all())
    assert bool((result.plan >= 0).all())
    # the last update is the column update, so column sums hold even when rows have not converged, up to the
    # rounding of log P = u + v - K/eps, whose terms are as large as K/eps
    rounding = torch.finfo(dtype).eps * scale / eps
    torch.testing.assert_close(result.plan.sum(-2), b.expand(4, 6), atol=1e-6, rtol=1e-5 + rounding)
    independent_error = (result.plan.sum(-1) - a).abs().sum(-1)
    torch.testing.assert_close(result.marginal_error, independent_error, atol=1e-5 + rounding, rtol=1e-4)
    assert torch.equal(result.converged, result.marginal_error <= 1e-3)


def test_small_epsilon_approaches_exact_transport_cost() -> None:
    rng = np.random.default_rng(6)
    cost, a, b = _random_problem(rng, 5, 4)
    exact = float(ot.emd2(a, b, cost))
    config = SinkhornConfig(epsilon=1e-3, max_iter=20_000, tol=1e-9)
    result = sinkhorn_log(torch.tensor(cost), torch.tensor(a), torch.tensor(b), config)
    assert bool(result.converged)
    # entropic bias is at most eps * log(M C)
    assert exact - 1e-9 <= float(result.transport_cost) <= exact + 1e-3 * math.log(20) + 1e-9


def test_float32_agrees_with_float64() -> None:
    rng = np.random.default_rng(7)
    cost, a, b = _random_problem(rng, 8, 5)
    config = SinkhornConfig(max_iter=2000, tol=1e-6, check_every=1)
    single = sinkhorn_log(
        torch.tensor(cost, dtype=torch.float32),
        torch.tensor(a, dtype=torch.float32),
        torch.tensor(b, dtype=torch.float32),
        config,
    )
    assert single.plan.dtype == torch.float32
    np.testing.assert_allclose(single.plan.numpy(), _pot_plan(cost, a, b, 0.1), atol=1e-5)


def test_iteration_cap_reports_non_convergence() -> None:
    rng = np.random.default_rng(8)
    cost, a, b = _random_problem(rng, 6, 6)
    result = sinkhorn_log(
        torch.tensor(cost),
        torch.tensor(a),
        torch.tensor(b),
        SinkhornConfig(epsilon=0.01, max_iter=2, tol=1e-9),
    )
    assert int(result.iterations) == 2
    assert not bool(result.converged)
    independent = float(np.abs(result.plan.numpy().sum(1) - a).sum())
    assert independent > 1e-9
    assert float(result.marginal_error) == pytest.approx(independent, rel=1e-9)


def test_fixed_iterations_vmaps_like_the_batch() -> None:
    gen = torch.Generator().manual_seed(9)
    cost = torch.rand(5, 3, 7, 4, generator=gen, dtype=torch.float64)
    a = torch.softmax(torch.randn(5, 3, 7, generator=gen, dtype=torch.float64), dim=-1)
    b = torch.full((4,), 0.25, dtype=torch.float64)
    config = SinkhornConfig(max_iter=30, fixed_iterations=True)
    batched = sinkhorn_log(cost, a, b, config)
    mapped = vmap(lambda c, m: sinkhorn_log(c, m, b, config, validate=False))(cost, a)
    torch.testing.assert_close(mapped.plan, batched.plan)
    assert torch.equal(mapped.iterations, torch.full((5, 3), 30))
    assert torch.equal(mapped.converged, batched.converged)


def test_differentiable_plan_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(10)
    cost = torch.rand(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    b = torch.full((3,), 1.0 / 3.0, dtype=torch.float64)
    config = SinkhornConfig(epsilon=0.2, max_iter=40, fixed_iterations=True)
    assert torch.autograd.gradcheck(lambda c: sinkhorn_log(c, a, b, config, validate=False).plan, (cost,))


@pytest.mark.parametrize(
    ("cost", "a", "b", "message"),
    [
        (torch.rand(3, 2), torch.full((4,), 0.25), torch.full((2,), 0.5), "a must have shape"),
        (torch.rand(3, 2), torch.full((3,), 1 / 3), torch.full((3,), 1 / 3), "b must have shape"),
        (torch.rand(3), torch.full((3,), 1 / 3), torch.full((1,), 1.0), r"cost must have shape"),
        (torch.tensor([[1.0, math.nan]]), torch.ones(1), torch.full((2,), 0.5), "NaN or infinite"),
        (torch.rand(2, 2), torch.tensor([1.5, -0.5]), torch.full((2,), 0.5), "finite and >= 0"),
        (torch.rand(2, 2), torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.7]), "equal total mass"),
        (torch.rand(2, 2), torch.zeros(2), torch.zeros(2), "zero total mass"),
    ],
)
def test_invalid_problems_are_rejected(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        sinkhorn_log(cost, a, b)


def test_integer_cost_is_rejected() -> None:
    with pytest.raises(TypeError, match="int64"):
        sinkhorn_log(torch.ones(2, 2, dtype=torch.int64), torch.full((2,), 0.5), torch.full((2,), 0.5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": math.inf},
        {"max_iter": 0},
        {"max_iter": 2.5},
        {"tol": -1.0},
        {"check_every": True},
        {"fixed_iterations": 1},
    ],
)
def test_config_rejects_out_of_range_values(kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        SinkhornConfig(**kwargs)  # type: ignore[arg-type]


# --- ConditionTransport ---


def _reference_transport(patches: np.ndarray, classes: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """psi (B, N, C) computed with NumPy and POT, independently of the module."""
    batch, conditions, _, _ = patches.shape
    num_classes = classes.shape[1]
    out = np.zeros((batch, conditions, num_classes))
    for i in range(batch):
        for n in range(conditions):
            x = patches[i, n] / np.linalg.norm(patches[i, n], axis=-1, keepdims=True)
            t = classes[n] / np.linalg.norm(classes[n], axis=-1, keepdims=True)
            sim = x @ t.T
            logits = sim.max(axis=1) / tau
            a = np.exp(logits - logits.max())
            a /= a.sum()
            plan = _pot_plan(1.0 - sim, a, np.full(num_classes, 1.0 / num_classes), eps)
            out[i, n] = num_classes * (plan * sim).sum(axis=0)
    return out


def test_transport_scores_match_reference() -> None:
    rng = np.random.default_rng(11)
    patches = rng.normal(size=(2, 3, 10, 8))
    classes = rng.normal(size=(3, 5, 8))
    module = ConditionTransport(sinkhorn=TIGHT, row_temperature=0.2).double()
    out = module(torch.tensor(patches), torch.tensor(classes))
    expected = _reference_transport(patches, classes, tau=0.2, eps=0.1)
    np.testing.assert_allclose(out.scores.detach().numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(out.logits.detach().numpy(), 20.0 * expected - 5.0, atol=1e-8)
    assert out.plan.shape == (2, 3, 10, 5)
    assert bool(out.solver.converged.all())


def test_per_sample_class_features_match_shared_ones() -> None:
    gen = torch.Generator().manual_seed(12)
    patches = torch.randn(3, 2, 6, 4, generator=gen, dtype=torch.float64)
    classes = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    module = ConditionTransport().double()
    shared = module(patches, classes)
    expanded = module(patches, classes.expand(3, 2, 5, 4))
    torch.testing.assert_close(expanded.logits, shared.logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_solved_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(16)
    patches = torch.randn(2, 2, 6, 8, generator=gen)
    classes = torch.randn(2, 3, 8, generator=gen)
    module = ConditionTransport(sinkhorn=SinkhornConfig(tol=1e-6))
    half = module(patches.to(dtype), classes.to(dtype))
    # reference: the same half-precision inputs, upcast before the module
    full = module(patches.to(dtype).float(), classes.to(dtype).float())
    assert half.scores.dtype == torch.float32
    torch.testing.assert_close(half.scores, full.scores, atol=2e-2, rtol=0.0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), patches=st.integers(1, 12), classes=st.integers(1, 6))
def test_scores_are_bounded_cosines(seed: int, patches: int, classes: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    module = ConditionTransport(sinkhorn=SinkhornConfig(epsilon=0.05))
    out = module(
        torch.randn(2, 3, patches, 16, generator=gen) * 100, torch.randn(3, classes, 16, generator=gen)
    )
    assert out.scores.shape == (2, 3, classes)
    assert bool((out.scores.abs() <= 1.0 + 1e-5).all())


def test_detached_plan_gradient_flows_through_similarity_only() -> None:
    gen = torch.Generator().manual_seed(13)
    patches = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    classes = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
    module = ConditionTransport(sinkhorn=TIGHT).double()
    out = module(patches, classes)
    assert not out.plan.requires_grad
    (got,) = torch.autograd.grad((out.scores * weights).sum(), patches)
    # independent: psi = C * sum_m P_mc S_mc with P a constant
    plan = out.plan.detach()
    x = torch.nn.functional.normalize(patches, dim=-1)
    t = torch.nn.functional.normalize(classes, dim=-1)
    sim = torch.einsum("bnmd,ncd->bnmc", x, t)
    (expected,) = torch.autograd.grad((3 * (plan * sim).sum(-2) * weights).sum(), patches)
    torch.testing.assert_close(got, expected)

    differentiable = ConditionTransport(sinkhorn=TIGHT, differentiable_plan=True).double()
    out_diff = differentiable(patches, classes)
    torch.testing.assert_close(out_diff.scores, out.scores)
    (through_plan,) = torch.autograd.grad((out_diff.scores * weights).sum(), patches)
    assert not torch.allclose(through_plan, got, atol=1e-6)


def test_per_sample_gradients_under_vmap_match_one_at_a_time() -> None:
    gen = torch.Generator().manual_seed(14)
    module = ConditionTransport(sinkhorn=SinkhornConfig(max_iter=50, fixed_iterations=True)).double()
    with torch.no_grad():
        module.logit_bias.fill_(-1.5)
    params = {k: v.detach() for k, v in module.named_parameters()}
    patches = torch.randn(4, 2, 5, 6, generator=gen, dtype=torch.float64)
    classes = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    targets = torch.rand(4, 2, 3, generator=gen, dtype=torch.float64)

    def sample_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, p, (x.unsqueeze(0), classes))
        return torch.nn.functional.binary_cross_entropy_with_logits(out.logits[0], y, reduction="sum")

    per_sample = vmap(grad(sample_loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, patches, targets)
    for i in range(4):
        x = patches[i : i + 1].clone().requires_grad_(True)
        module.zero_grad()
        out = module(x, classes)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            out.logits[0], targets[i], reduction="sum"
        )
        loss.backward()
        assert module.logit_bias.grad is not None and x.grad is not None
        torch.testing.assert_close(per_sample[0]["logit_bias"][i], module.logit_bias.grad)
        torch.testing.assert_close(per_sample[1][i], x.grad[0])


def test_a_sample_does_not_depend_on_its_batch_neighbours() -> None:
    # early stopping is per problem, so changing sample 1 leaves sample 0's output untouched
    gen = torch.Generator().manual_seed(15)
    module = ConditionTransport(sinkhorn=SinkhornConfig(tol=1e-6, check_every=1, max_iter=500)).double()
    patches = torch.randn(2, 2, 7, 4, generator=gen, dtype=torch.float64)
    classes = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    first = module(patches, classes)
    changed = patches.clone()
    changed[1] = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64) * 10
    second = module(changed, classes)
    alone = module(patches[:1], classes)
    torch.testing.assert_close(second.logits[0], first.logits[0], atol=1e-13, rtol=0.0)
    torch.testing.assert_close(alone.logits[0], first.logits[0], atol=1e-13, rtol=0.0)
    assert torch.equal(second.solver.iterations[0], first.solver.iterations[0])


@pytest.mark.parametrize(
    ("patches", "classes", "message"),
    [
        ((2, 6, 4), (2, 3, 4), r"patch_features must have shape \(B, N, M, D\)"),
        ((2, 2, 6, 4), (3, 3, 4), "class_features must have shape"),
        ((2, 2, 6, 4), (2, 3, 5), "class_features must have shape"),
        ((2, 2, 6, 4), (3, 2, 3, 4), "class_features batch 3"),
    ],
)
def test_transport_rejects_bad_shapes(
    patches: tuple[int, ...], classes: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ConditionTransport()(torch.randn(patches), torch.randn(classes))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"row_temperature": 0.0},
        {"logit_scale": -1.0},
        {"logit_bias_init": math.nan},
        {"differentiable_plan": 1},
    ],
)
def test_transport_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ConditionTransport(**kwargs)  # type: ignore[arg-type]
