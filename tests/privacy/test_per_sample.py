"""Per-sample gradients of every trainable parameter vs independent torch.func / autograd ground truth.

Tolerance: the implementation runs the text encoder's attention with the math kernel and the ground truth with the
fused one, and sums per-sample terms in another order, so the two differ by float32 rounding that grows with the
size of the values compared (seen: 1.8e-6 and 2.6e-6 at gradient magnitudes ~1 on some CPUs). ``_assert_fp32_close``
therefore compares within 1e-4 of the largest magnitude of the expected tensor (about 800 float32 ulps of it) plus
1e-4 relative per element: a tolerance that scales with the values, never a fixed absolute one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.methods import METHODS, build_method
from fedmpt.methods.base import Method
from fedmpt.model.asymmetric_loss import asymmetric_loss
from fedmpt.model.sinkhorn import ConditionTransport
from fedmpt.training import TrainConfig
from privacy.per_sample import (
    DPIncompatibleError,
    check_dp_compatible,
    per_class_prompt_gradients,
    per_sample_gradients,
    prepare_for_dp,
    split_parameters,
)

FP32_TOLERANCE = 1e-4


def _assert_fp32_close(actual: Tensor, expected: Tensor, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to float32 reduction-order rounding, scaled by ``expected``'s magnitude."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    atol = FP32_TOLERANCE * max(scale, 1e-6)  # the floor only matters for an all-zero expected tensor
    torch.testing.assert_close(actual, expected, rtol=FP32_TOLERANCE, atol=atol, msg=msg)


CONDITIONS = ("spatial layout", "object pose", "background")
CLASSES = ("star", "tree", "house", "heart")
TRAIN = TrainConfig()


def _batch(b: int = 4, m: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(b, len(CLASSES), generator=g) * 3).floor() - 1  # {-1, 0, 1}
    return torch.randn(b, 128, generator=g), torch.randn(b, m, 128, generator=g), labels.numpy().astype(np.int8)


def _perturbed(backbone: Backbone, name: str, **overrides: object) -> Method:
    """A DP-ready method whose zero-initialised parameters are moved so that every gradient is non-trivial."""
    method = prepare_for_dp(build_method(name, backbone, CLASSES, CONDITIONS, init_seed=3, **overrides))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return method


def _ground_truth(method: Method, gf: Tensor, pf: Tensor, labels: np.ndarray) -> dict[str, Tensor]:
    """vmap(grad) of the whole per-sample loss, text encoder included, w.r.t. every trainable parameter.

    Inside ``vmap`` the transport solves Sinkhorn itself, with fixed iterations (``vmap`` cannot stop early).
    """
    transports = [m for m in method.modules() if isinstance(m, ConditionTransport)]
    saved = [m.sinkhorn for m in transports]
    for m in transports:
        m.sinkhorn = replace(m.sinkhorn, fixed_iterations=True)
    try:
        return _vmap_grad(method, gf, pf, labels)
    finally:
        for m, config in zip(transports, saved, strict=True):
            m.sinkhorn = config


def _vmap_grad(method: Method, gf: Tensor, pf: Tensor, labels: np.ndarray) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in method.trainable_parameters().items()}
    targets = torch.as_tensor(labels, dtype=torch.float32)

    def loss(values: dict[str, Tensor], g: Tensor, p: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(method, values, (g[None], p[None]))
        return asymmetric_loss(logits, y[None], TRAIN.gamma_pos, TRAIN.gamma_neg, TRAIN.clip, check_targets=False)[0]

    out: dict[str, Tensor] = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, gf, pf, targets)
    return out


@pytest.mark.parametrize(
    ("name", "differentiable_plan"),
    [(n, False) for n in sorted(METHODS) if n != "zeroshot"] + [("fedmpt", True)],
)
def test_exact_per_sample_gradients_of_every_parameter_match_vmap_grad(
    backbone: Backbone, name: str, differentiable_plan: bool
) -> None:
    # tol 0: the batch's plans, solved outside vmap with early stopping, run the same max_iter iterations
    # as the fixed-iteration solve inside the ground truth's vmap, so both differentiate at the same plan.
    method = _perturbed(backbone, name, sinkhorn_tol=0.0, differentiable_plan=differentiable_plan)
    gf, pf, labels = _batch()
    truth = _ground_truth(method, gf, pf, labels)
    grads = per_sample_gradients(method, gf, pf, labels, TRAIN)
    ours = {**grads.prompt_gradients(chunk_size=3), **grads.other}
    assert set(ours) == set(method.trainable_parameters()) == set(truth)
    for n, value in ours.items():
        assert value.shape == (4, *method.trainable_parameters()[n].shape), n
        assert float(truth[n].abs().max()) > 0, f"{n}: ground truth is zero, the test would be vacuous"
        _assert_fp32_close(value, truth[n], msg=n)


@pytest.mark.parametrize("name", ["fedmpt", "dualcoop"])
def test_text_cotangents_match_one_sample_autograd_and_the_vjp_gives_the_batch_gradient(
    backbone: Backbone, name: str
) -> None:
    method = _perturbed(backbone, name)
    gf, pf, labels = _batch(b=3, seed=1)
    grads = per_sample_gradients(method, gf, pf, labels, TRAIN)
    targets = torch.as_tensor(labels, dtype=torch.float32)
    text = method.text_features().detach()
    for i in range(3):  # plain autograd on a batch of one, no torch.func
        leaf = text.clone().requires_grad_(True)
        logits = method.logits(gf[i : i + 1], pf[i : i + 1], leaf)
        loss = asymmetric_loss(logits, targets[i : i + 1], TRAIN.gamma_pos, TRAIN.gamma_neg, TRAIN.clip)[0]
        (expected,) = torch.autograd.grad(loss, leaf)
        _assert_fp32_close(grads.text_cotangents[i], expected)
        torch.testing.assert_close(grads.losses[i], loss.detach())
    method.zero_grad()
    asymmetric_loss(method(gf, pf), targets, TRAIN.gamma_pos, TRAIN.gamma_neg, TRAIN.clip).sum().backward()
    pushed = grads.text_vjp(grads.text_cotangents.sum(0))
    for n in split_parameters(method).text:
        _assert_fp32_close(pushed[n], method.get_parameter(n).grad, msg=n)


def test_per_class_gradients_are_indexed_by_prompt_and_sum_to_the_batch_gradient(backbone: Backbone) -> None:
    method = _perturbed(backbone, "promptfl")
    gf, pf, labels = _batch(b=5, seed=2)
    grads = per_sample_gradients(method, gf, pf, labels, TRAIN)
    wrong = per_class_prompt_gradients(grads)
    exact = grads.prompt_gradients()
    (name,) = split_parameters(method).text
    assert wrong[name].shape[0] == len(CLASSES) != exact[name].shape[0] == 5
    _assert_fp32_close(wrong[name].sum(0), exact[name].sum(0))


def test_empty_batch_gives_zero_row_gradients(backbone: Backbone) -> None:
    method = _perturbed(backbone, "fedmpt")
    gf, pf, labels = _batch(b=0)
    grads = per_sample_gradients(method, gf, pf, labels, TRAIN)
    shapes = {n: p.shape for n, p in method.trainable_parameters().items()}
    for n, value in {**grads.prompt_gradients(), **grads.other}.items():
        assert value.shape == (0, *shapes[n])


def test_bad_labels_are_refused_with_the_values(backbone: Backbone) -> None:
    method = _perturbed(backbone, "promptfl")
    gf, pf, labels = _batch(b=2)
    labels[0, 0] = 7
    with pytest.raises(ValueError, match="7"):
        per_sample_gradients(method, gf, pf, labels, TRAIN)


# --- the startup check -----------------------------------------------------------------------------------


def test_prepare_fixes_iterations_only_for_a_differentiable_plan(backbone: Backbone) -> None:
    method = build_method("fedmpt", backbone, CLASSES, CONDITIONS, differentiable_plan=True)
    with pytest.raises(DPIncompatibleError, match="fixed_iterations"):
        check_dp_compatible(method)
    prepare_for_dp(method)
    transport = method.get_submodule("transport")
    assert isinstance(transport, ConditionTransport) and transport.sinkhorn.fixed_iterations
    detached = build_method("fedmpt", backbone, CLASSES, CONDITIONS)
    check_dp_compatible(detached)  # its plans are solved outside vmap: early stopping stays
    transport = prepare_for_dp(detached).get_submodule("transport")
    assert isinstance(transport, ConditionTransport) and not transport.sinkhorn.fixed_iterations


def test_batch_plans_stop_early_per_problem_and_do_not_depend_on_the_rest_of_the_batch(backbone: Backbone) -> None:
    method = _perturbed(backbone, "fedmpt")
    gf, pf, _ = _batch(b=6, seed=4)
    text = method.text_features().detach()
    plans = method.transport_plans(gf, pf, text)
    assert plans is not None and plans.shape == (6, len(CONDITIONS), 8, len(CLASSES))
    for i in range(6):
        alone = method.transport_plans(gf[i : i + 1], pf[i : i + 1], text)
        assert alone is not None
        torch.testing.assert_close(plans[i : i + 1], alone, rtol=1e-5, atol=1e-7)
    transport = method.get_submodule("transport")
    assert isinstance(transport, ConditionTransport)
    solved = transport(method.adapters(pf), text).solver
    assert solved is not None and int(solved.iterations.max()) < transport.sinkhorn.max_iter  # it stopped early


def test_check_refuses_batch_norm_dropout_unknown_owners_and_trainable_backbone(backbone: Backbone) -> None:
    method = prepare_for_dp(build_method("promptfl", backbone, CLASSES, CONDITIONS))
    method.add_module("norm", nn.BatchNorm1d(4))
    with pytest.raises(DPIncompatibleError, match="norm.*couples"):
        check_dp_compatible(method)

    method = prepare_for_dp(build_method("promptfl", backbone, CLASSES, CONDITIONS))
    method.add_module("drop", nn.Dropout(0.1))
    method.train()
    with pytest.raises(DPIncompatibleError, match="drop.*dropout"):
        check_dp_compatible(method)
    method.eval()
    check_dp_compatible(method)  # dropout in eval mode is the identity

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3))

    method = prepare_for_dp(build_method("promptfl", backbone, CLASSES, CONDITIONS))
    method.add_module("custom", Custom())
    with pytest.raises(DPIncompatibleError, match="custom.weight.*Custom"):
        check_dp_compatible(method)

    other = load_backbone(random_init=True)
    method = build_method("promptfl", other, CLASSES, CONDITIONS)
    other.model.ln_final.weight.requires_grad_(True)
    with pytest.raises(DPIncompatibleError, match="ln_final"):
        check_dp_compatible(method)


def test_check_catches_a_batch_coupled_forward(backbone: Backbone) -> None:
    method = prepare_for_dp(build_method("promptfl", backbone, CLASSES, CONDITIONS))
    original = method.logits

    def coupled(g: Tensor, p: Tensor, t: Tensor) -> Tensor:
        out: Tensor = original(g - g.mean(0, keepdim=True), p, t)  # batch statistics leak across samples
        return out

    method.logits = coupled  # type: ignore[method-assign,assignment]
    with pytest.raises(DPIncompatibleError, match="depend on the other samples"):
        check_dp_compatible(method)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 5),
    patches=st.integers(1, 6),
    name=st.sampled_from(["fedmpt", "fedmpt-adapters", "promptfl"]),
    seed=st.integers(0, 1000),
)
def test_per_sample_gradient_shapes_and_values_for_fuzzed_batches(
    backbone: Backbone, batch: int, patches: int, name: str, seed: int
) -> None:
    method = _perturbed(backbone, name)
    gf, pf, labels = _batch(b=batch, m=patches, seed=seed)
    truth = _ground_truth(method, gf, pf, labels)
    grads = per_sample_gradients(method, gf, pf, labels, TRAIN)
    for n, value in {**grads.prompt_gradients(chunk_size=2), **grads.other}.items():
        assert value.shape == (batch, *method.trainable_parameters()[n].shape)
        _assert_fp32_close(value, truth[n], msg=n)
