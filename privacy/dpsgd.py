"""DP-SGD for every trainable parameter of every method: Poisson sampling, joint clipping to C, noise z*C.

Guarantee: record-level (example-level) (epsilon, delta)-DP of one client's local data under add/remove-one,
for its trainable state after local training, accounted with :mod:`privacy.accounting` over every step of every
round the client trains in. With a declared ``dataset_size`` N (the federated default) the sample rate, the
number of steps, sigma and the divisor are functions of public configuration, so they reveal nothing about the
site's record count ``n``; the Flower client (:mod:`fedmpt.apps.privacy_hooks`) sends nothing else computed from
the data (:data:`PUBLIC_METRICS`).

One DP-SGD step on a client holding ``n`` records, with sample rate ``q = expected_batch_size / N``:

1. Poisson sampling: each record joins the batch independently with probability ``q`` (random bits from the
   operating system's CSPRNG, :mod:`privacy.noise`; a seeded ``torch.Generator`` when ``DPConfig.seed`` is set);
   empty batches are real steps (noise only) and are counted.
2. Per-sample gradients ``g_i`` of *all* trainable parameters jointly (prompt vectors, adapters, gate,
   biases), exact, by :mod:`privacy.per_sample` (``torch.func``), never by Opacus hooks (which get prompts
   pushed through a frozen text encoder wrong, silently).
3. Clipping by Opacus's ``DPOptimizer`` (flat clipping): ``g_i <- g_i min(1, C / ||g_i||)`` over the
   concatenation of all released tensors, then ``sum_i g_i + N(0, (z C)^2 I)`` (noise from
   :mod:`privacy.noise`), divided by the expected batch size ``B`` (public: not the realised batch size).
4. The optimizer step (SGD with the momentum and weight decay of :class:`~fedmpt.training.TrainConfig`):
   post-processing of the noisy gradient.

Two modes, identical accounting (``z``, ``q``, steps):

* ``exact``: the released vector is ``(dL_i/dtheta_prompt, dL_i/dtheta_other)``. Costs ``B`` vector-Jacobian
  products through the frozen text encoder per step (chunked ``vmap``).
* ``feature`` (default): the released vector is ``(G_i, dL_i/dtheta_other)`` with ``G_i = dL_i/dT`` the
  gradient with respect to the text features ``T = f(theta_prompt)``. After clipping and noise, the noisy
  ``T``-gradient ``G~`` is mapped to the prompts by one vjp, ``J_f(theta_prompt)^T G~``. Privacy: the step
  releases the Gaussian mechanism ``sum_i clip_C(G_i, g_other,i) + N(0, (zC)^2)`` (sensitivity ``C`` under
  add/remove-one, whatever the geometry) followed by a map that depends only on that output and on the
  current parameters, which are themselves outputs of earlier DP steps: post-processing, so the same
  ``(z, q, steps)`` accounting holds. What changes is utility: the clip bounds the gradient in ``T``-space,
  not in prompt space, so the effective per-sample weighting and the noise's shape in prompt space
  (``J_f^T`` applied to isotropic noise) differ from the exact mode.

Noise: ``noise_multiplier`` directly, or calibrated once for the whole run from ``target_epsilon``, ``delta``
and ``rounds`` assuming (worst case) that the client trains in every round: total steps = ``rounds x
steps_per_round``. ``delta < 1/N`` is enforced. Opacus's ``secure_mode`` needs ``torchcsprng``, which has no
distribution for Python 3.11; :mod:`privacy.noise` provides the CSPRNG and the two-sample Gaussian instead, and
every ledger entry records the noise source.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn

from fedmpt.methods.base import Method
from fedmpt.training import ClientUpdate, FeatureData, State, TrainConfig
from privacy.accounting import (
    AccountantKind,
    DpSgdEvent,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    check_delta,
    compute_epsilon,
    epsilon_pld,
    parse_accountant,
    validate_delta,
    validate_epsilon,
    validate_noise_multiplier,
)
from privacy.errors import AccountingError, PrivacyParameterError
from privacy.ledger import SamplingBasis
from privacy.noise import NoiseSource, gaussian, poisson_mask
from privacy.per_sample import PerSampleGradients, per_sample_gradients, prepare_for_dp, split_parameters

__all__ = [
    "PUBLIC_METRICS",
    "DPConfig",
    "DPMode",
    "SamplingBasis",
    "GaussianRelease",
    "PlannedRelease",
    "dp_client_update",
    "make_generator",
    "plan_release",
    "poisson_batches",
    "privatized_gradients",
]

logger = logging.getLogger(__name__)

#: Key of the text-feature gradient in the released vector of the feature-space mode.
TEXT_FEATURES = "<text_features>"

#: Opacus's secure_mode needs torchcsprng, which has no Python 3.11 distribution.
SECURE_MODE_AVAILABLE = False


class DPMode(StrEnum):
    """Where per-sample gradients are clipped: prompt-parameter space (exact) or text-feature space."""

    EXACT = "exact"
    FEATURE = "feature"


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of a client (validated on construction).

    Attributes:
        max_grad_norm: clip norm ``C > 0`` of the joint per-sample gradient.
        delta: target ``delta`` in (0, 1); must also be ``< 1/n`` for the client's ``n`` records (checked when
            training).
        noise_multiplier: ``z > 0``; give either it or ``target_epsilon`` + ``rounds``.
        target_epsilon: whole-run epsilon at ``delta``; ``z`` is calibrated for ``rounds x steps_per_round``.
        rounds: number of federated rounds the calibration assumes the client trains in (worst case: all).
        expected_batch_size: expected Poisson batch size ``B`` on a site of ``dataset_size`` records (``q = B /
            dataset_size``); ``None`` uses ``TrainConfig.batch_size``. It is also the divisor of the noisy sum.
        dataset_size: the declared, public per-site dataset-size bound ``N``. Set (the federated default),
            ``q = B / N``, the steps per round, sigma and ``delta < 1/N`` are functions of public configuration
            only, so nothing the site releases depends on its record count ``n`` (add/remove-one DP holds for
            any ``n``; a site with ``n < N`` simply draws smaller batches). ``None``: ``q = B / n`` with the
            site's own ``n``, which then leaks through ``q``, the steps and a calibrated sigma: the guarantee
            holds only if ``n`` is public, and the ledger records ``sampling_basis = "local-count"``.
        mode: ``"feature"`` (default, see the module docstring) or ``"exact"``.
        accountant: ``"rdp"`` (default) or ``"prv"`` for the reported epsilon; ``pld`` (dp-accounting) is
            always computed as a cross-check. Calibration uses RDP, or PLD when ``accountant="prv"`` (PRV is
            not reliable enough to calibrate against).
        chunk_size: per-sample vjps run at once in the exact mode (memory ~ chunk_size x one text backward).
        seed: ``None`` (default): Poisson sampling and Gaussian noise from the operating system's CSPRNG
            (:mod:`privacy.noise`, ``os-urandom``). An integer seeds torch's generators instead (``torch-seeded``):
            runs become reproducible and the noise predictable to anyone who knows the seed: tests and
            experiments only (a warning is logged).
    """

    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None
    expected_batch_size: int | None = None
    dataset_size: int | None = None
    mode: DPMode | str = DPMode.FEATURE
    accountant: AccountantKind | str = AccountantKind.RDP
    chunk_size: int | None = 8
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_epsilon(self.max_grad_norm, name="max_grad_norm")
        validate_delta(self.delta)
        try:
            object.__setattr__(self, "mode", DPMode(self.mode))
        except ValueError:
            raise PrivacyParameterError(f"DPConfig.mode must be 'exact' or 'feature', got {self.mode!r}") from None
        kind = parse_accountant(self.accountant)
        if kind not in (AccountantKind.RDP, AccountantKind.PRV):
            raise PrivacyParameterError(f"DPConfig.accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        object.__setattr__(self, "accountant", kind)
        if self.noise_multiplier is not None:
            validate_noise_multiplier(self.noise_multiplier)
            if self.target_epsilon is not None:
                raise PrivacyParameterError(
                    f"give noise_multiplier or target_epsilon, not both (got {self.noise_multiplier!r} and "
                    f"{self.target_epsilon!r})"
                )
        else:
            if self.target_epsilon is None or self.rounds is None:
                raise PrivacyParameterError(
                    "DPConfig needs noise_multiplier, or target_epsilon together with rounds "
                    f"(got target_epsilon={self.target_epsilon!r}, rounds={self.rounds!r})"
                )
            validate_epsilon(self.target_epsilon, name="target_epsilon")
        for name in ("rounds", "expected_batch_size", "dataset_size", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PrivacyParameterError(f"DPConfig.{name} must be an integer >= 1 or None, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise PrivacyParameterError(f"DPConfig.seed must be a non-negative integer or None, got {self.seed!r}")
        if self.dataset_size is not None:
            check_delta(self.delta, self.dataset_size)
            if self.expected_batch_size is not None and self.expected_batch_size > self.dataset_size:
                raise PrivacyParameterError(
                    f"DPConfig.expected_batch_size={self.expected_batch_size} exceeds dataset_size="
                    f"{self.dataset_size} (sample rate would be > 1)"
                )

    @property
    def noise_source(self) -> NoiseSource:
        """Where the sampling and noise randomness comes from: the CSPRNG unless a seed is set."""
        return NoiseSource.OS_URANDOM if self.seed is None else NoiseSource.TORCH_SEEDED


@dataclass(frozen=True)
class PlannedRelease:
    """What one round of DP-SGD on a client will release, known before training (for budget checks).

    ``event`` is the accounting event (``z``, ``q``, steps); ``expected_batch_size`` the divisor of the noisy
    sum; ``basis`` what ``q`` was computed from (only ``declared-size`` makes every field independent of ``n``).
    """

    event: DpSgdEvent
    expected_batch_size: int
    basis: SamplingBasis


def plan_release(num_records: int, train_config: TrainConfig, dp_config: DPConfig) -> PlannedRelease:
    """The ``(z, q, steps)`` of one round, before any data is touched.

    ``q = B / N`` with ``B`` the expected batch size and ``N`` the declared ``dataset_size`` (public: the plan
    is the same for every ``num_records``), or ``N = num_records`` when no size is declared. Steps per round =
    ``local_epochs x floor(1/q)`` (Opacus's Poisson "epoch"), capped by ``max_steps``. ``z`` is given, or
    calibrated so that ``rounds x steps`` steps spend at most ``target_epsilon`` (never overshoots; see
    :func:`privacy.accounting.calibrate_noise_multiplier`). Raises :class:`PrivacyParameterError` when
    ``delta >= 1/N`` or ``B > N``.
    """
    if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 0:
        raise PrivacyParameterError(f"num_records must be an integer >= 0, got {num_records!r}")
    declared = dp_config.dataset_size is not None
    size = dp_config.dataset_size if dp_config.dataset_size is not None else num_records
    if size < 1:
        raise PrivacyParameterError("a site with no records and no declared DPConfig.dataset_size cannot train")
    check_delta(dp_config.delta, size)
    batch = dp_config.expected_batch_size or train_config.batch_size
    if batch > size:
        where = f"the declared dataset_size={size}" if declared else f"the client's {size} records"
        raise PrivacyParameterError(
            f"expected_batch_size={batch} exceeds {where} (sample rate would be > 1); lower the expected batch size"
        )
    q = batch / size
    steps = train_config.local_epochs * max(1, int(1.0 / q))
    if train_config.max_steps is not None:
        steps = min(steps, train_config.max_steps)
    if dp_config.noise_multiplier is not None:
        sigma = float(dp_config.noise_multiplier)
    else:
        assert dp_config.target_epsilon is not None and dp_config.rounds is not None  # by DPConfig validation
        calibrator = AccountantKind.PLD if dp_config.accountant is AccountantKind.PRV else AccountantKind.RDP
        sigma = calibrate_noise_multiplier(
            dp_config.target_epsilon, dp_config.delta, q, dp_config.rounds * steps, accountant=calibrator
        )
    basis = SamplingBasis.DECLARED_SIZE if declared else SamplingBasis.LOCAL_COUNT
    return PlannedRelease(DpSgdEvent(sigma, q, steps), batch, basis)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``seed``, or from 63 bits of :func:`secrets.randbits` when None."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def poisson_batches(
    num_records: int, sample_rate: float, steps: int, generator: torch.Generator | None
) -> Iterator[Tensor]:
    """``steps`` Poisson batches of row indices (each row in each batch independently with prob. ``q``).

    From the CSPRNG when ``generator`` is None (:func:`privacy.noise.poisson_mask`), else Opacus's
    ``UniformWithReplacementSampler`` on ``generator``; batches may be empty.
    """
    if generator is None:
        for _ in range(steps):
            yield poisson_mask(num_records, sample_rate, None)
        return
    sampler = UniformWithReplacementSampler(
        num_samples=num_records, sample_rate=sample_rate, generator=generator, steps=steps
    )
    for indices in sampler:
        yield torch.as_tensor(indices, dtype=torch.long)


class GaussianRelease:
    """Opacus's ``DPOptimizer`` applied to named per-sample tensors: joint clip to ``C``, sum, noise, mean.

    ``release(per_sample)`` takes ``{name: (B, *shape)}`` and returns ``{name: shape}`` equal to

        (sum_i g_i min(1, C / (||g_i|| + 1e-6)) + N(0, (z C)^2 I)) / expected_batch_size

    where ``||g_i||`` is the norm of row ``i`` over *all* named tensors together (flat clipping). Clipping,
    summing and scaling are Opacus's (``clip_and_accumulate``, ``scale_grad``) on private leaf tensors that
    only carry the per-sample gradients (``grad_sample``), so the computation of the per-sample gradients stays
    ours. The noise is :func:`privacy.noise.gaussian`: from the CSPRNG when ``generator`` is None, else from
    ``generator`` (reproducible; tests). ``noise_multiplier = 0`` is allowed here for tests (no privacy).
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size | tuple[int, ...]],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None,
    ) -> None:
        if not shapes:
            raise PrivacyParameterError("GaussianRelease needs at least one tensor to release")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise PrivacyParameterError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        validate_epsilon(max_grad_norm, name="max_grad_norm")
        self.names = tuple(shapes)
        self._slots = [nn.Parameter(torch.zeros(tuple(shapes[n]))) for n in self.names]
        self._noise_std = float(noise_multiplier) * float(max_grad_norm)
        self._batch = int(expected_batch_size)
        self._generator = generator
        self._optimizer = DPOptimizer(
            torch.optim.SGD(self._slots, lr=0.0),  # never stepped: only pre_step's clip/sum/scale is used
            noise_multiplier=0.0,  # the noise is added by release(), from privacy.noise
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            secure_mode=False,
        )

    @property
    def noise_std(self) -> float:
        """Standard deviation ``z C`` of the noise added to the clipped sum."""
        return self._noise_std

    def release(self, per_sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Clip, sum, noise and average ``per_sample`` (see the class docstring)."""
        if set(per_sample) != set(self.names):
            raise PrivacyParameterError(
                f"per-sample tensors {sorted(per_sample)} do not match the released tensors {sorted(self.names)}"
            )
        self._optimizer.zero_grad(set_to_none=True)
        rows = {int(per_sample[n].shape[0]) for n in self.names}
        if len(rows) != 1:
            raise PrivacyParameterError(f"per-sample tensors disagree on the batch size: {sorted(rows)}")
        for name, slot in zip(self.names, self._slots, strict=True):
            value = per_sample[name].detach().to(slot.dtype)
            if tuple(value.shape[1:]) != tuple(slot.shape):
                raise PrivacyParameterError(
                    f"per-sample {name!r} has shape {tuple(value.shape)}, expected (B, *{tuple(slot.shape)})"
                )
            slot.grad_sample = value  # type: ignore[attr-defined]  # Opacus's per-sample gradient slot
        self._optimizer.pre_step()
        out: dict[str, Tensor] = {}
        for name, slot in zip(self.names, self._slots, strict=True):
            assert slot.grad is not None  # the clipped sum / B, set by DPOptimizer.pre_step
            noise = gaussian(slot.shape, self._noise_std, self._generator) if self._noise_std else 0.0
            out[name] = slot.grad.detach() + noise / self._batch
        return out


def per_sample_norms(per_sample: Mapping[str, Tensor]) -> Tensor:
    """Joint L2 norm of each row over all tensors, ``(B,)``."""
    values = list(per_sample.values())
    if not values or values[0].shape[0] == 0:
        return torch.zeros(0)
    return torch.stack([v.reshape(v.shape[0], -1).norm(dim=1) for v in values], dim=1).norm(dim=1)


def released_per_sample(grads: PerSampleGradients, mode: DPMode, chunk_size: int | None) -> dict[str, Tensor]:
    """The per-sample vector a mode clips: prompt gradients (exact) or text cotangents (feature), plus others."""
    if mode is DPMode.EXACT:
        return {**grads.prompt_gradients(chunk_size), **grads.other}
    if grads.text_names:
        return {TEXT_FEATURES: grads.text_cotangents, **grads.other}
    return dict(grads.other)


def release_shapes(method: Method, mode: DPMode) -> dict[str, torch.Size]:
    """Shapes of the released tensors of ``method`` in ``mode`` (one text-feature pass in the feature mode)."""
    split = split_parameters(method)
    params = method.trainable_parameters()
    shapes = {n: params[n].shape for n in split.other}
    if mode is DPMode.EXACT:
        return {**{n: params[n].shape for n in split.text}, **shapes}
    if split.text:
        with torch.no_grad():
            text_shape = method.text_features().shape
        return {TEXT_FEATURES: text_shape, **shapes}
    return shapes


def privatized_gradients(
    grads: PerSampleGradients, release: GaussianRelease, mode: DPMode, chunk_size: int | None = 8
) -> dict[str, Tensor]:
    """One DP release: noisy mean gradient of every trainable parameter, by name (mode-specific vector, then
    the feature mode's single vjp from the noisy text gradient to the prompts)."""
    return to_parameter_space(release.release(released_per_sample(grads, mode, chunk_size)), grads)


def to_parameter_space(noisy: dict[str, Tensor], grads: PerSampleGradients) -> dict[str, Tensor]:
    """Map a released vector to parameter gradients: the noisy text gradient (feature mode) goes through one vjp."""
    out = dict(noisy)
    if TEXT_FEATURES in out:
        out.update(grads.text_vjp(out.pop(TEXT_FEATURES)))
    return out


def dp_client_update(
    method: Method,
    state: State,
    data: FeatureData,
    train_config: TrainConfig,
    dp_config: DPConfig,
    accountant: PrivacyAccountant | None = None,
) -> tuple[ClientUpdate, DpSgdEvent]:
    """DP-SGD counterpart of :func:`fedmpt.training.client_update`: train ``method`` from ``state`` on ``data``.

    Runs the planned number of Poisson-sampled steps (:func:`plan_release`), each privatized by
    :func:`privatized_gradients`, then SGD with ``train_config``'s lr, momentum and weight decay (fresh
    optimizer state every round, as in the non-DP loop). Returns the update and the DP-SGD event to account.
    ``accountant`` (the client's history so far, not modified) is only used to report the cumulative epsilon
    after this round in the metrics; the caller must compose the returned event into its persistent history
    and ledger (see :mod:`privacy.budget` for the order of operations).

    Metrics: ``loss`` (mean per-sample loss of the sampled records), ``steps``, ``noise_multiplier``,
    ``sample_rate``, ``mean_batch_size``, ``empty_batches``, ``clipped_fraction``, ``epsilon`` (the configured
    accountant), ``epsilon_pld`` (cross-check), ``secure_mode`` (always 0.0: unavailable on Python 3.11) and
    ``seconds``. Only the :data:`PUBLIC_METRICS` are functions of public configuration and the ledger; the
    others (loss, batch sizes, clipped fraction, time) are computed from the data without noise and must not
    leave the site (the Flower client sends only :data:`PUBLIC_METRICS`).
    """
    if len(data) == 0:
        raise PrivacyParameterError("dp_client_update got an empty dataset")
    plan = plan_release(len(data), train_config, dp_config)
    event = plan.event
    mode = DPMode(dp_config.mode)
    method.load_trainable_state(state)
    method.train()  # before the check: it must see the modes training runs in (e.g. dropout)
    prepare_for_dp(method)
    params = method.trainable_parameters()
    if not params:
        empty = DpSgdEvent(event.noise_multiplier, event.sample_rate, 0)
        return ClientUpdate(method.trainable_state(), len(data), {"loss": math.nan, "steps": 0.0}), empty
    if dp_config.seed is not None:
        logger.warning("DP-SGD with a fixed seed (%d): the noise is reproducible; use for tests only", dp_config.seed)
        seeds = np.random.SeedSequence(dp_config.seed).generate_state(2)
        sampling_gen, noise_gen = make_generator(int(seeds[0])), make_generator(int(seeds[1]))
    else:
        sampling_gen, noise_gen = None, None  # the CSPRNG (privacy.noise)
    release = GaussianRelease(
        release_shapes(method, mode),
        noise_multiplier=event.noise_multiplier,
        max_grad_norm=dp_config.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        generator=noise_gen,
    )
    optimizer = torch.optim.SGD(
        list(params.values()),
        lr=train_config.lr,
        momentum=train_config.momentum,
        weight_decay=train_config.weight_decay,
    )
    start = time.perf_counter()
    total_loss, sampled, empty_batches, clipped = 0.0, 0, 0, 0
    for index in poisson_batches(len(data), event.sample_rate, event.steps, sampling_gen):
        grads = per_sample_gradients(
            method,
            data.global_features[index],
            data.patch_features[index],
            data.labels[index.numpy()],
            train_config,
        )
        per_sample = released_per_sample(grads, mode, dp_config.chunk_size)
        clipped += int((per_sample_norms(per_sample) > dp_config.max_grad_norm).sum())
        noisy = to_parameter_space(release.release(per_sample), grads)
        optimizer.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.grad = noisy[name].to(p.dtype).view_as(p)
        optimizer.step()
        total_loss += float(grads.losses.sum())
        sampled += len(index)
        empty_batches += int(len(index) == 0)
    method.eval()
    history = list(accountant.history) if accountant is not None else []
    history.append(event)
    epsilon = _epsilon_or_nan(history, dp_config.delta, dp_config.accountant)
    epsilon_cross = epsilon_pld(history, dp_config.delta)
    if math.isfinite(epsilon) and epsilon_cross > epsilon * 1.01 + 1e-3:
        logger.warning("PLD epsilon %.4g exceeds the %s epsilon %.4g", epsilon_cross, dp_config.accountant, epsilon)
    metrics = {
        "loss": total_loss / max(sampled, 1),
        "steps": float(event.steps),
        "noise_multiplier": event.noise_multiplier,
        "sample_rate": event.sample_rate,
        "max_grad_norm": float(dp_config.max_grad_norm),
        "mean_batch_size": sampled / event.steps,
        "empty_batches": float(empty_batches),
        "clipped_fraction": clipped / max(sampled, 1),
        "epsilon": epsilon,
        "epsilon_pld": epsilon_cross,
        "delta": dp_config.delta,
        "secure_mode": float(SECURE_MODE_AVAILABLE),
        "seconds": time.perf_counter() - start,
    }
    return ClientUpdate(method.trainable_state(), len(data), metrics), event


#: Metrics of :func:`dp_client_update` that depend only on public configuration and the node's ledger (with a
#: declared ``dataset_size``): the only ones a site may release.
PUBLIC_METRICS = ("steps", "noise_multiplier", "sample_rate", "max_grad_norm", "epsilon", "epsilon_pld", "delta")


def _epsilon_or_nan(history: list[DpSgdEvent], delta: float, accountant: AccountantKind | str) -> float:
    try:
        return compute_epsilon(history, delta, accountant)
    except AccountingError as err:
        warnings.warn(f"{accountant} accountant failed ({err}); epsilon reported as NaN", RuntimeWarning, stacklevel=3)
        return math.nan
