"""Canary audits: the real DP step stays below its claim; deliberately broken variants are caught."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmpt.backbone.loader import Backbone, load_backbone
from fedmpt.methods import build_method
from fedmpt.methods.base import Method
from fedmpt.training import ClientUpdate, FeatureData, State, TrainConfig
from privacy.accounting import DpSgdEvent, epsilon_pld
from privacy.canary import AuditVariant, StepAudit, audit_dp_step, canary_scores, gradient_canary, one_run_canary_audit
from privacy.dpsgd import DPConfig, DPMode, plan_release
from privacy.errors import PrivacyParameterError
from privacy.per_sample import per_sample_gradients, prepare_for_dp

CONDITIONS = ("spatial layout", "object pose", "background")
CLASSES = ("star", "tree", "house", "heart")
Z = 2.0  # claimed epsilon of one Gaussian step at z=2, delta=1e-5: ~1.99 (PLD)
TRIALS = 1000


@pytest.fixture(scope="module")
def setup() -> tuple[Method, FeatureData, FeatureData]:
    """FedMPT on a random tiny CLIP, 8 benign records with unknown labels (zero gradient) and one canary."""
    torch.manual_seed(0)
    backbone: Backbone = load_backbone(random_init=True)
    method = prepare_for_dp(build_method("fedmpt", backbone, CLASSES, CONDITIONS))
    g = torch.Generator().manual_seed(1)
    benign = FeatureData(
        torch.randn(8, 128, generator=g), torch.randn(8, 8, 128, generator=g), np.full((8, 4), -1, dtype=np.int8)
    )
    return method, benign, gradient_canary(benign, seed=5)


def _audit(
    setup: tuple[Method, FeatureData, FeatureData], mode: DPMode, variant: AuditVariant, clip: float
) -> StepAudit:
    method, benign, canary = setup
    return audit_dp_step(
        method, benign, canary, TrainConfig(), mode=mode, variant=variant, noise_multiplier=Z,
        max_grad_norm=clip, trials=TRIALS, seed=7,
    )  # fmt: skip


@pytest.mark.statistical
@pytest.mark.parametrize(("mode", "clip"), [(DPMode.EXACT, 1e-3), (DPMode.FEATURE, 1e-3), (DPMode.FEATURE, 1.0)])
def test_real_dp_step_stays_below_its_claim_with_mean_shift_at_most_one_over_z(
    setup: tuple[Method, FeatureData, FeatureData], mode: DPMode, clip: float
) -> None:
    """Mean-shift check: the estimate has standard error sqrt(2 / TRIALS); 5 SE above 1/z has rate < 3e-7."""
    result = _audit(setup, mode, AuditVariant.CORRECT, clip)
    assert result.claimed_epsilon == pytest.approx(epsilon_pld([DpSgdEvent(Z, 1.0, 1)], 1e-5))
    assert 1.9 < result.claimed_epsilon < 2.1
    assert not result.violation and result.epsilon_lower_bound < result.claimed_epsilon
    assert result.mean_shift <= 1 / Z + 5 * math.sqrt(2 / TRIALS)
    if clip == 1e-3:  # the canary clips to C exactly, so the shift is 1/z, not less
        assert result.mean_shift >= 1 / Z - 5 * math.sqrt(2 / TRIALS)


@pytest.mark.statistical
@pytest.mark.parametrize(
    ("mode", "variant"),
    [
        (DPMode.FEATURE, AuditVariant.NO_CLIPPING),
        (DPMode.EXACT, AuditVariant.NO_CLIPPING),
        (DPMode.EXACT, AuditVariant.PER_CLASS),
    ],
)
def test_broken_dp_steps_are_caught(
    setup: tuple[Method, FeatureData, FeatureData], mode: DPMode, variant: AuditVariant
) -> None:
    result = _audit(setup, mode, variant, 1e-3)
    assert result.violation and result.epsilon_lower_bound > result.claimed_epsilon
    assert result.mean_shift > 1 / Z + 5 * math.sqrt(2 / TRIALS)


def test_step_audit_refuses_bad_arguments(setup: tuple[Method, FeatureData, FeatureData]) -> None:
    method, benign, canary = setup
    with pytest.raises(PrivacyParameterError, match="exactly one canary"):
        audit_dp_step(method, benign, benign, TrainConfig())
    with pytest.raises(PrivacyParameterError, match="trials"):
        audit_dp_step(method, benign, canary, TrainConfig(), trials=5)


def test_one_run_audit_catches_an_unclipped_noiseless_step_but_not_dp_sgd(
    setup: tuple[Method, FeatureData, FeatureData],
) -> None:
    method, _, _ = setup
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(40, 4, generator=g) < 0.3).numpy().astype(np.int8)
    data = FeatureData(torch.randn(40, 128, generator=g), torch.randn(40, 8, 128, generator=g), labels)
    state = method.trainable_state()
    train = TrainConfig(batch_size=10, lr=0.01, momentum=0.0)
    dp = DPConfig(noise_multiplier=10.0, delta=1e-3)

    def leaky(m: Method, s: State, d: FeatureData, t: TrainConfig, c: DPConfig) -> tuple[ClientUpdate, DpSgdEvent]:
        """Broken: one full-batch gradient step with no clipping and no noise, yet claims the DP plan's event."""
        m.load_trainable_state(s)
        grads = per_sample_gradients(m, d.global_features, d.patch_features, d.labels, t)
        rows = {**grads.prompt_gradients(), **grads.other}
        moved = {n: s[n] - t.lr * rows[n].sum(0) for n in s}
        return ClientUpdate(moved, len(d)), plan_release(len(d), t, c).event

    broken = one_run_canary_audit(method, state, data, train, dp, canaries=60, guesses=20, seed=5, trainer=leaky)
    assert broken.audit.v >= 16  # of 20 guesses
    assert broken.violation and broken.audit.epsilon_lower_bound > broken.claimed_epsilon > 0
    real = one_run_canary_audit(method, state, data, train, dp, canaries=60, guesses=20, seed=5)
    assert not real.violation
    assert real.audit.m == 60 and real.audit.r == 20 and real.event.noise_multiplier == 10.0


def test_least_squares_scores_recover_a_linear_leak_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    gradients = torch.randn(6, 50, generator=g) + 3.0  # strongly correlated rows (a shared component)
    weights = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    moved = -(weights.float() @ gradients)
    torch.testing.assert_close(canary_scores(gradients, moved), weights, rtol=1e-5, atol=1e-6)
