"""DP-SGD: config validation, release planning, Opacus clipping and noise, Poisson sampling, the client update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy import stats
from torch import Tensor

from fedmpt.backbone.loader import Backbone
from fedmpt.methods import build_method
from fedmpt.methods.base import Method
from fedmpt.model.asymmetric_loss import asymmetric_loss
from fedmpt.training import FeatureData, TrainConfig
from privacy.accounting import DpSgdEvent, PrivacyAccountant, epsilon_pld
from privacy.dpsgd import (
    DPConfig,
    DPMode,
    GaussianRelease,
    dp_client_update,
    make_generator,
    plan_release,
    poisson_batches,
    privatized_gradients,
    release_shapes,
)
from privacy.errors import PrivacyParameterError
from privacy.per_sample import DPIncompatibleError, per_sample_gradients, prepare_for_dp, split_parameters

CONDITIONS = ("spatial layout", "object pose", "background")
CLASSES = ("star", "tree", "house", "heart")
TRAIN = TrainConfig()


def _data(n: int, seed: int = 0, m: int = 8) -> FeatureData:
    g = torch.Generator().manual_seed(seed)
    labels = ((torch.rand(n, len(CLASSES), generator=g) * 3).floor() - 1).numpy().astype(np.int8)
    return FeatureData(torch.randn(n, 128, generator=g), torch.randn(n, m, 128, generator=g), labels)


def _method(backbone: Backbone, name: str = "fedmpt") -> Method:
    method = prepare_for_dp(build_method(name, backbone, CLASSES, CONDITIONS, init_seed=3))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in method.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return method


# --- configuration and planning ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "not both"),
        ({"target_epsilon": 3.0}, "rounds"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"noise_multiplier": 1.0, "mode": "fast"}, "mode"),
        ({"noise_multiplier": 1.0, "accountant": "pld"}, "accountant"),
        ({"noise_multiplier": 1.0, "expected_batch_size": 0}, "expected_batch_size"),
        ({"noise_multiplier": 1.0, "seed": -3}, "seed"),
        ({"target_epsilon": 0.0, "rounds": 3}, "target_epsilon"),
    ],
)
def test_dp_config_refuses_bad_settings_naming_them(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(PrivacyParameterError, match=names):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_dp_config_defaults_are_feature_mode_and_rdp() -> None:
    config = DPConfig(noise_multiplier=1.0)
    assert config.mode is DPMode.FEATURE and config.accountant == "rdp" and config.seed is None


def test_plan_uses_q_b_over_n_and_opacus_poisson_epochs() -> None:
    plan = plan_release(400, TrainConfig(batch_size=32, local_epochs=2), DPConfig(noise_multiplier=1.3))
    assert plan.event == DpSgdEvent(1.3, 32 / 400, 2 * 12)  # floor(400/32) = 12 batches per Poisson epoch
    capped = plan_release(400, TrainConfig(batch_size=32, max_steps=5), DPConfig(noise_multiplier=1.3))
    assert capped.event.steps == 5
    explicit = plan_release(400, TRAIN, DPConfig(noise_multiplier=1.3, expected_batch_size=50))
    assert explicit.event.sample_rate == 50 / 400 and explicit.expected_batch_size == 50


def test_plan_refuses_delta_at_least_one_over_n_and_batches_larger_than_the_data() -> None:
    with pytest.raises(PrivacyParameterError, match="1/n_records"):
        plan_release(100, TRAIN, DPConfig(noise_multiplier=1.0, delta=0.01))
    with pytest.raises(PrivacyParameterError, match="expected_batch_size=32"):
        plan_release(20, TRAIN, DPConfig(noise_multiplier=1.0))


def test_calibrated_sigma_covers_every_step_of_every_round_like_opacus() -> None:
    config = DPConfig(target_epsilon=3.0, delta=1e-5, rounds=20)
    plan = plan_release(400, TRAIN, config)
    total = 20 * plan.event.steps
    oracle = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=32 / 400, steps=total, accountant="rdp"
    )
    assert plan.event.noise_multiplier == pytest.approx(oracle, rel=0.02)
    accountant = RDPAccountant()
    accountant.history = [(plan.event.noise_multiplier, 32 / 400, total)]
    assert 2.98 <= accountant.get_epsilon(1e-5) <= 3.0  # never overshoots the whole-run target


# --- Opacus clipping and noise ------------------------------------------------------------------------------


def _manual_clip_sum(rows: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Independent NumPy flat clipping: factor min(1, C / (||row|| + 1e-6)) over all tensors jointly."""
    b = next(iter(rows.values())).shape[0]
    if b == 0:
        return {n: np.zeros(v.shape[1:]) for n, v in rows.items()}
    norms = np.sqrt(sum((v.reshape(b, -1).astype(np.float64) ** 2).sum(1) for v in rows.values()))
    factor = np.minimum(1.0, clip / (norms + 1e-6))
    return {n: np.tensordot(factor, v.astype(np.float64), axes=(0, 0)) for n, v in rows.items()}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 6),
    log_scale=st.floats(-3.0, 3.0),
    clip=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_noiseless_release_is_the_flat_clipped_mean_and_clipped_rows_never_exceed_c(
    batch: int, log_scale: float, clip: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 4), "b": (5,), "c": ()}
    rows = {n: torch.randn((batch, *s), generator=g) * 10**log_scale for n, s in shapes.items()}
    release = GaussianRelease(
        shapes, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4, generator=make_generator(0)
    )
    out = release.release(rows)
    expected = _manual_clip_sum({n: v.numpy() for n, v in rows.items()}, clip)
    for n in shapes:
        np.testing.assert_allclose(out[n].numpy() * 4, expected[n], rtol=1e-4, atol=1e-6)
    single = GaussianRelease(
        shapes, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1, generator=make_generator(0)
    )
    for i in range(batch):
        clipped = single.release({n: v[i : i + 1] for n, v in rows.items()})
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in clipped.values()))
        assert norm <= clip * (1 + 1e-6)


@pytest.mark.statistical
def test_noise_standard_deviation_is_z_times_c() -> None:
    """Chi-square test of the noise variance; two-sided, false-positive rate 1e-6 (and 1e-6 for the mean)."""
    z, clip, expected = 1.7, 0.3, 8
    shapes = {"a": (100, 50), "b": (10000,)}
    release = GaussianRelease(
        shapes, noise_multiplier=z, max_grad_norm=clip, expected_batch_size=expected, generator=make_generator(None)
    )
    out = release.release({n: torch.zeros((0, *s)) for n, s in shapes.items()})  # an empty Poisson batch
    noise = torch.cat([v.reshape(-1) for v in out.values()]).double().numpy() * expected
    k, sigma = noise.size, z * clip
    statistic = float((noise**2).sum() / sigma**2)  # ~ chi2(k) when the std is z*C
    assert stats.chi2.ppf(0.5e-6, k) < statistic < stats.chi2.ppf(1 - 0.5e-6, k)
    assert abs(noise.mean()) < stats.norm.ppf(1 - 0.5e-6) * sigma / math.sqrt(k)
    assert release.noise_std == pytest.approx(sigma)


def test_release_refuses_mismatched_tensors() -> None:
    release = GaussianRelease({"a": (2,)}, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1,
                              generator=make_generator(0))  # fmt: skip
    with pytest.raises(PrivacyParameterError, match="do not match"):
        release.release({"b": torch.zeros(1, 2)})
    with pytest.raises(PrivacyParameterError, match=r"expected \(B, \*\(2,\)\)"):
        release.release({"a": torch.zeros(1, 3)})


# --- Poisson sampling ---------------------------------------------------------------------------------------


@pytest.mark.statistical
def test_poisson_sampling_includes_each_record_with_probability_q() -> None:
    """Binomial tests (two-sided, false-positive rate 1e-6 each) of all inclusions and of one record's."""
    n, q, steps = 200, 0.1, 500
    counts = np.zeros(n, dtype=np.int64)
    sizes = []
    for batch in poisson_batches(n, q, steps, make_generator(None)):
        counts[batch.numpy()] += 1
        sizes.append(len(batch))
        assert len(set(batch.tolist())) == len(batch)  # no record twice in a batch
    assert len(sizes) == steps
    assert stats.binomtest(int(counts.sum()), n * steps, q).pvalue > 1e-6
    assert stats.binomtest(int(counts[0]), steps, q).pvalue > 1e-6
    empties = sum(1 for b in poisson_batches(10, 0.05, 400, make_generator(None)) if len(b) == 0)
    assert stats.binomtest(empties, 400, 0.95**10).pvalue > 1e-6  # empty batches happen and are yielded


def test_secret_seeded_generators_differ() -> None:
    a, b = make_generator(None), make_generator(None)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


# --- the privatized gradient of a method --------------------------------------------------------------------


def _weighted_loss_gradient(method: Method, data: FeatureData, weights: Tensor) -> dict[str, Tensor]:
    """Autograd of sum_i w_i L_i over the whole method (text encoder included): the clipped-sum oracle."""
    method.zero_grad()
    targets = torch.as_tensor(data.labels, dtype=torch.float32)
    logits = method(data.global_features, data.patch_features)
    losses = asymmetric_loss(logits, targets, TRAIN.gamma_pos, TRAIN.gamma_neg, TRAIN.clip)
    (losses * weights).sum().backward()
    return {n: p.grad.detach().clone() for n, p in method.trainable_parameters().items() if p.grad is not None}


def _loop_per_sample(method: Method, data: FeatureData) -> list[dict[str, Tensor]]:
    """Per-sample gradients one record at a time with plain autograd (independent of torch.func)."""
    return [_weighted_loss_gradient(method, data.subset([i]), torch.ones(1)) for i in range(len(data))]


@pytest.mark.parametrize("mode", list(DPMode))
def test_noiseless_privatized_gradient_is_the_clipped_per_sample_sum(backbone: Backbone, mode: DPMode) -> None:
    method = _method(backbone)
    data = _data(5, seed=4)
    clip, expected = 0.5, 4
    grads = per_sample_gradients(method, data.global_features, data.patch_features, data.labels, TRAIN)
    if mode is DPMode.EXACT:  # norms over all parameters, from the one-record autograd loop
        loop = _loop_per_sample(method, data)
        norms = torch.tensor([math.sqrt(sum(float((g**2).sum()) for g in row.values())) for row in loop])
    else:  # norms over (dL_i/dT, other parameters), T-gradients from one-record autograd
        text = method.text_features().detach()
        targets = torch.as_tensor(data.labels, dtype=torch.float32)
        norms_list = []
        other = split_parameters(method).other
        for i in range(5):
            leaf = text.clone().requires_grad_(True)
            logits = method.logits(data.global_features[i : i + 1], data.patch_features[i : i + 1], leaf)
            loss = asymmetric_loss(logits, targets[i : i + 1], TRAIN.gamma_pos, TRAIN.gamma_neg, TRAIN.clip)[0]
            values = torch.autograd.grad(loss, [leaf, *(method.get_parameter(n) for n in other)])
            norms_list.append(math.sqrt(sum(float((v**2).sum()) for v in values)))
        norms = torch.tensor(norms_list)
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    assert float(factors.min()) < 1.0 < float(norms.max()) / clip  # some rows are really clipped
    oracle = _weighted_loss_gradient(method, data, factors)
    release = GaussianRelease(
        release_shapes(method, mode), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=expected,
        generator=make_generator(0),
    )  # fmt: skip
    noisy = privatized_gradients(grads, release, mode, chunk_size=2)
    assert set(noisy) == set(method.trainable_parameters())
    for n, value in noisy.items():
        torch.testing.assert_close(value * expected, oracle[n], rtol=2e-3, atol=1e-6, msg=n)


def test_empty_batch_release_is_noise_of_every_parameter_shape(backbone: Backbone) -> None:
    method = _method(backbone)
    empty = _data(0)
    grads = per_sample_gradients(method, empty.global_features, empty.patch_features, empty.labels, TRAIN)
    for mode in DPMode:
        release = GaussianRelease(
            release_shapes(method, mode), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
            generator=make_generator(1),
        )  # fmt: skip
        noisy = privatized_gradients(grads, release, mode)
        for n, p in method.trainable_parameters().items():
            assert noisy[n].shape == p.shape and bool(torch.isfinite(noisy[n]).all())
        assert all(float(noisy[n].abs().sum()) > 0 for n in split_parameters(method).other)


# --- the client update --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(DPMode))
def test_dp_client_update_trains_every_parameter_and_returns_the_planned_event(
    backbone: Backbone, mode: DPMode
) -> None:
    method = _method(backbone)
    state = method.trainable_state()
    data = _data(40, seed=5)
    train = TrainConfig(batch_size=8, max_steps=2, lr=0.05)
    config = DPConfig(noise_multiplier=1.1, mode=mode, seed=123)
    history = PrivacyAccountant([DpSgdEvent(1.1, 0.2, 7)])
    update, event = dp_client_update(method, state, data, train, config, history)
    assert event == plan_release(40, train, config).event == DpSgdEvent(1.1, 8 / 40, 2)
    assert update.num_examples == 40
    for n, value in update.state.items():
        assert not torch.equal(value, state[n]), f"{n} did not move"
    oracle = RDPAccountant()
    oracle.history = [(1.1, 0.2, 9)]
    assert update.metrics["epsilon"] == pytest.approx(oracle.get_epsilon(1e-5), rel=1e-6)
    assert update.metrics["epsilon_pld"] <= update.metrics["epsilon"]
    assert update.metrics["secure_mode"] == 0.0 and update.metrics["steps"] == 2.0
    assert len(history) == 1  # the caller's history is not modified
    again, _ = dp_client_update(method, state, data, train, config)
    for n in state:
        torch.testing.assert_close(again.state[n], update.state[n])  # same seed, same update


def test_dp_client_update_without_seed_draws_fresh_noise_and_refuses_empty_data(backbone: Backbone) -> None:
    method = _method(backbone, "promptfl")
    state = method.trainable_state()
    data = _data(20, seed=6)
    train = TrainConfig(batch_size=5, max_steps=1)
    first, _ = dp_client_update(method, state, data, train, DPConfig(noise_multiplier=1.0, delta=1e-3))
    second, _ = dp_client_update(method, state, data, train, DPConfig(noise_multiplier=1.0, delta=1e-3))
    assert any(not torch.equal(first.state[n], second.state[n]) for n in state)
    with pytest.raises(PrivacyParameterError, match="empty"):
        dp_client_update(method, state, _data(0), train, DPConfig(noise_multiplier=1.0))


def test_zero_shot_has_nothing_to_train_and_spends_nothing(backbone: Backbone) -> None:
    method = build_method("zeroshot", backbone, CLASSES, CONDITIONS)
    update, event = dp_client_update(method, {}, _data(10), TrainConfig(batch_size=2), DPConfig(noise_multiplier=1.0))
    assert event.steps == 0 and update.state == {}


def test_dp_client_update_checks_the_method_in_training_mode(backbone: Backbone) -> None:
    method = build_method("promptfl", backbone, CLASSES, CONDITIONS)
    method.add_module("drop", torch.nn.Dropout(0.5))
    method.eval()  # harmless now, but training switches it on: the check must see the training mode
    with pytest.raises(DPIncompatibleError, match="dropout"):
        dp_client_update(
            method, method.trainable_state(), _data(10), TrainConfig(batch_size=2), DPConfig(noise_multiplier=1.0)
        )


def test_prv_reporting_calibrates_against_pld() -> None:
    config = DPConfig(target_epsilon=2.0, delta=1e-5, rounds=5, accountant="prv")
    event = plan_release(400, TRAIN, config).event
    whole_run = DpSgdEvent(event.noise_multiplier, event.sample_rate, 5 * event.steps)
    assert 1.98 <= epsilon_pld([whole_run], 1e-5) <= 2.0
