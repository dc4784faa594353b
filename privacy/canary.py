"""Canary audits of the DP-SGD implementation: a white-box audit of one step and a one-run audit of a training.

Both give an *empirical lower bound* ``epsilon_lb`` on the privacy loss. A correct implementation keeps it
below the claimed epsilon; a bound above the claim proves a bug (clipping, noise, per-sample gradients,
sampling or accounting). A bound below the claim proves nothing beyond "no bug this attack can see".

White-box audit of one step (Nasr et al., USENIX Security 2023; Jagielski et al., NeurIPS 2020), for the
add/remove-one neighbours ``D`` (benign records) and ``D' = D + canary``:

* the canary is a record whose gradient is large, so it clips to norm ``C`` (labels all positive on features
  scaled far out of distribution);
* each trial runs one DP release (Opacus clipping and noise, :class:`privacy.dpsgd.GaussianRelease`) on the
  per-sample gradients of ``D`` or ``D'``; the per-sample gradients are deterministic for fixed parameters and
  rows, so they are computed once per arm by the real implementation and only the randomised part repeats;
* the statistic is the projection of the released vector onto the direction ``u`` in which the two arms'
  noiseless releases differ (for the correct implementation, the canary's clipped gradient);
* the first half of the trials picks the threshold and rule, the second half gives Clopper-Pearson bounds and
  ``epsilon_lb = log((TPR_lo - delta) / FPR_hi)`` (:func:`privacy.audit.epsilon_lower_bound` at that fixed
  threshold, so the ``1 - alpha`` statement holds up to the choice among its four rules).

The claim for one step that always contains the canary is the Gaussian mechanism without subsampling:
``epsilon(z, q=1, 1 step)`` (PLD). The mean shift in noise units, ``mu = (E[s|D'] - E[s|D]) / (z C)``, is the
Gaussian-DP parameter and must not exceed ``1/z`` (up to sampling error).

Deliberately broken variants, which the audit must catch: ``no-clipping`` (noise calibrated to ``C`` but no
clipping) and ``per-class`` (the Opacus silent failure on prompt tuning: "per-sample" prompt gradients
indexed by prompt/class, :func:`privacy.per_sample.per_class_prompt_gradients`).

One-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023): ``m`` canary records, each inserted with
probability 1/2 (coins from :mod:`secrets`), one DP training, white-box scores (least-squares coefficients of
the parameter change on the canaries' gradients, :func:`canary_scores`), guesses on the highest and lowest
scores, ``epsilon_lb`` from :func:`privacy.audit.one_run_audit`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import torch
from torch import Tensor

from fedmpt.methods.base import Method
from fedmpt.training import ClientUpdate, FeatureData, State, TrainConfig
from privacy.accounting import DpSgdEvent, compute_epsilon, epsilon_pld, validate_delta, validate_noise_multiplier
from privacy.audit import EpsilonLowerBound, OneRunAudit, epsilon_lower_bound, one_run_audit
from privacy.dpsgd import (
    DPConfig,
    DPMode,
    GaussianRelease,
    dp_client_update,
    make_generator,
    released_per_sample,
)
from privacy.errors import PrivacyParameterError
from privacy.per_sample import per_class_prompt_gradients, per_sample_gradients, prepare_for_dp

__all__ = [
    "AuditVariant",
    "OneRunCanaryAudit",
    "StepAudit",
    "audit_dp_step",
    "canary_scores",
    "concat",
    "gradient_canary",
    "one_run_canary_audit",
]

logger = logging.getLogger(__name__)

#: A DP client update: ``(method, state, data, train_config, dp_config) -> (update, event)``.
Trainer = Callable[[Method, State, FeatureData, TrainConfig, DPConfig], tuple[ClientUpdate, DpSgdEvent]]

#: Clip norm the broken ``no-clipping`` variant clips at (i.e. effectively never).
_NO_CLIP = 1e9


class AuditVariant(StrEnum):
    """The implementation under audit: the real one, or a deliberately broken one."""

    CORRECT = "correct"
    NO_CLIPPING = "no-clipping"
    PER_CLASS = "per-class"


@dataclass(frozen=True)
class StepAudit:
    """Result of :func:`audit_dp_step`.

    Attributes:
        variant, mode: what was audited.
        claimed_epsilon: epsilon of one un-subsampled Gaussian step at ``z`` and ``delta`` (PLD).
        bound: the empirical lower bound (``bound.epsilon``) with its threshold and rates.
        mean_shift: ``(mean score with canary - mean without) / (z C)``; at most ``1/z`` when correct.
        noise_multiplier, max_grad_norm, trials: the settings (trials per arm).
    """

    variant: AuditVariant
    mode: DPMode
    claimed_epsilon: float
    bound: EpsilonLowerBound
    mean_shift: float
    noise_multiplier: float
    max_grad_norm: float
    trials: int

    @property
    def epsilon_lower_bound(self) -> float:
        return self.bound.epsilon

    @property
    def violation(self) -> bool:
        """True when the empirical lower bound exceeds the claim (a bug)."""
        return self.bound.epsilon > self.claimed_epsilon


def concat(a: FeatureData, b: FeatureData) -> FeatureData:
    """Rows of ``a`` followed by the rows of ``b``."""
    return FeatureData(
        torch.cat([a.global_features, b.global_features]),
        torch.cat([a.patch_features, b.patch_features]),
        np.concatenate([a.labels, b.labels]),
    )


def gradient_canary(
    reference: FeatureData, count: int = 1, scale: float = 10.0, seed: int | None = None
) -> FeatureData:
    """``count`` canary records shaped like ``reference``: random directions at ``scale`` x the mean norm, all labels 1.

    Far from the data and positive on every class, their per-sample loss gradients are large (they clip to
    ``C``) and point in directions the benign records do not.
    """
    if len(reference) == 0:
        raise PrivacyParameterError("gradient_canary needs a non-empty reference dataset")
    generator = make_generator(seed)
    g_norm = float(reference.global_features.norm(dim=-1).mean())
    p_norm = float(reference.patch_features.norm(dim=-1).mean())
    g = torch.randn((count, *reference.global_features.shape[1:]), generator=generator)
    p = torch.randn((count, *reference.patch_features.shape[1:]), generator=generator)
    g = g / g.norm(dim=-1, keepdim=True) * g_norm * scale
    p = p / p.norm(dim=-1, keepdim=True) * p_norm * scale
    labels = np.ones((count, reference.labels.shape[1]), dtype=reference.labels.dtype)
    return FeatureData(g, p, labels)


def _flat(values: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
    return torch.cat([values[n].reshape(-1) for n in names])


def audit_dp_step(
    method: Method,
    benign: FeatureData,
    canary: FeatureData,
    train_config: TrainConfig,
    *,
    mode: DPMode | str = DPMode.FEATURE,
    variant: AuditVariant | str = AuditVariant.CORRECT,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    trials: int = 2000,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int | None = None,
) -> StepAudit:
    """White-box canary audit of one DP-SGD step of ``method`` at its current parameters (module docstring).

    ``canary`` must hold exactly one record. ``trials`` releases per arm (half to pick the threshold, half to
    bound). The noise generator is seeded from :mod:`secrets` unless ``seed`` is given.
    """
    mode, variant = DPMode(mode), AuditVariant(variant)
    validate_noise_multiplier(noise_multiplier)
    delta = validate_delta(delta)
    if len(canary) != 1:
        raise PrivacyParameterError(f"audit_dp_step needs exactly one canary record, got {len(canary)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 20:
        raise PrivacyParameterError(f"trials must be an integer >= 20, got {trials!r}")
    prepare_for_dp(method)
    arms = {}
    for arm, data in (("without", benign), ("with", concat(benign, canary))):
        grads = per_sample_gradients(method, data.global_features, data.patch_features, data.labels, train_config)
        if variant is AuditVariant.PER_CLASS:
            if not grads.text_names:
                raise PrivacyParameterError(f"the per-class variant needs prompt parameters; {method.name} has none")
            arms[arm] = per_class_prompt_gradients(grads)  # prompt-only release, rows = prompts
        else:
            arms[arm] = released_per_sample(grads, mode, chunk_size=8)
    names = tuple(arms["with"])
    shapes = {n: arms["with"][n].shape[1:] for n in names}
    clip = _NO_CLIP if variant is AuditVariant.NO_CLIPPING else max_grad_norm
    sigma = noise_multiplier * max_grad_norm / clip  # the noise std stays z * C in every variant
    expected = len(benign) + 1

    def release(z: float, generator: torch.Generator) -> GaussianRelease:
        return GaussianRelease(
            shapes, noise_multiplier=z, max_grad_norm=clip, expected_batch_size=expected, generator=generator
        )

    noiseless = release(0.0, make_generator(0))
    difference = _flat(noiseless.release(arms["with"]), names) - _flat(noiseless.release(arms["without"]), names)
    direction = difference / difference.norm() if float(difference.norm()) > 0 else torch.ones_like(difference)
    direction = direction / direction.norm()
    noisy = release(sigma, make_generator(seed))
    scores = {
        arm: np.array([float(_flat(noisy.release(arms[arm]), names) @ direction) for _ in range(trials)])
        for arm in ("with", "without")
    }
    std = noise_multiplier * max_grad_norm / expected
    mean_shift = float(scores["with"].mean() - scores["without"].mean()) / std
    half = trials // 2
    pick = epsilon_lower_bound(scores["with"][:half], scores["without"][:half], delta, alpha)
    if pick.rule is None:
        bound = pick
    else:
        bound = epsilon_lower_bound(
            scores["with"][half:], scores["without"][half:], delta, alpha, thresholds=[pick.threshold]
        )
    claimed = epsilon_pld([DpSgdEvent(noise_multiplier, 1.0, 1)], delta)
    result = StepAudit(variant, mode, claimed, bound, mean_shift, noise_multiplier, max_grad_norm, trials)
    logger.info(
        "canary step audit %s/%s: epsilon_lb=%.3f claimed=%.3f mu=%.3f",
        variant,
        mode,
        bound.epsilon,
        claimed,
        mean_shift,
    )
    return result


@dataclass(frozen=True)
class OneRunCanaryAudit:
    """Result of :func:`one_run_canary_audit`: the audit (m, r, v, epsilon_lb) and the claim it is compared with."""

    audit: OneRunAudit
    claimed_epsilon: float
    event: DpSgdEvent

    @property
    def violation(self) -> bool:
        return self.audit.epsilon_lower_bound > self.claimed_epsilon


def one_run_canary_audit(
    method: Method,
    state: State,
    data: FeatureData,
    train_config: TrainConfig,
    dp_config: DPConfig,
    *,
    canaries: int = 100,
    guesses: int | None = None,
    canary_scale: float = 3.0,
    seed: int | None = None,
    confidence: float = 0.95,
    trainer: Trainer = dp_client_update,
) -> OneRunCanaryAudit:
    """One-run audit (Steinke et al. 2023) of one DP client update of ``method`` from ``state`` on ``data``.

    ``canaries`` records (:func:`gradient_canary` at ``canary_scale``, each with a random half of the labels
    positive) are each added with probability 1/2; one :func:`privacy.dpsgd.dp_client_update` runs on the
    data plus the included canaries; each canary's score is the projection of the parameter change onto its
    descent directions at the start, fitted jointly (:func:`canary_scores`, white-box); the
    ``guesses`` (default ``canaries // 5``) highest/lowest scores (half each) are guessed in/out. The claim is
    the configured accountant's epsilon of the training's event at ``dp_config.delta``. ``trainer`` is the
    implementation under audit (a test passes a deliberately broken one).
    """
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise PrivacyParameterError(f"canaries must be an integer >= 2, got {canaries!r}")
    r = canaries // 5 if guesses is None else guesses
    if isinstance(r, bool) or not isinstance(r, int) or not 2 <= r <= canaries:
        raise PrivacyParameterError(f"guesses must be an integer in [2, {canaries}], got {guesses!r}")
    generator = make_generator(seed)
    pool = gradient_canary(data, canaries, canary_scale, seed=None if seed is None else seed + 1)
    positive = torch.rand(pool.labels.shape, generator=generator) < 0.5
    pool = FeatureData(pool.global_features, pool.patch_features, positive.numpy().astype(pool.labels.dtype))
    if seed is None:
        coins = np.array([secrets.randbits(1) for _ in range(canaries)], dtype=bool)
    else:
        coins = torch.rand(canaries, generator=generator).numpy() < 0.5
    method.load_trainable_state(state)
    prepare_for_dp(method)
    gradients = _canary_gradients(method, pool, train_config)  # (m, P) at the starting point
    training = concat(data, pool.subset(np.flatnonzero(coins))) if coins.any() else data
    dp = replace(dp_config, seed=None if seed is None else seed + 2)
    update, event = trainer(method, state, training, train_config, dp)
    names = tuple(sorted(state))
    moved = torch.cat([(update.state[n] - state[n]).reshape(-1) for n in names])  # (P,)
    scores = canary_scores(gradients, moved).numpy()  # higher = more descended on = included
    audit = one_run_audit(coins, scores, r // 2, r - r // 2, dp_config.delta, confidence)
    claimed = compute_epsilon([event], dp_config.delta, dp_config.accountant)
    return OneRunCanaryAudit(audit, claimed, event)


def _canary_gradients(method: Method, pool: FeatureData, train_config: TrainConfig) -> Tensor:
    """Exact per-sample gradients (m, P) of the canaries, all parameters flattened in sorted-name order."""
    grads = per_sample_gradients(method, pool.global_features, pool.patch_features, pool.labels, train_config)
    rows = {**grads.prompt_gradients(), **grads.other}
    return torch.cat([rows[n].reshape(len(pool), -1) for n in sorted(rows)], dim=1)


def canary_scores(gradients: Tensor, moved: Tensor) -> Tensor:
    """White-box one-run scores: least-squares coefficients ``c`` of the parameter change on the descent directions.

    ``moved ~ -sum_i c_i g_i``: SGD moves the parameters by ``-lr/B`` times each included record's gradient, so
    ``c_i`` estimates how much canary ``i`` was descended on. Canary gradients share large common parts (biases,
    the shared class context, the low-dimensional span of the text features), so the plain projection
    ``<moved, -g_i>`` is dominated by the other canaries; the joint least-squares fit removes that cross-talk
    (exactly, for a linear leak). ``gradients`` (m, P), ``moved`` (P,) -> (m,).
    """
    solution = torch.linalg.lstsq(-gradients.double().T, moved.double().unsqueeze(1)).solution  # (m, 1)
    return solution.squeeze(1)
