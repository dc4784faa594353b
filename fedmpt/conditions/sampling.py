"""Seeded sampling of class combinations (pairs, triples) for stage 1, under a budget on LLM requests.

The paper asks the LLM to describe scenes for *every* combination of classes; with K classes that is
``C(K,2) + C(K,3)`` requests (85,320 triples alone for COCO's 80 classes), which does not scale. We send one
request per sampled combination and sample at most ``budget`` combinations without replacement:

- the budget is split evenly over the combination sizes (default pairs and triples); a size with fewer
  eligible combinations than its share passes the rest on to the other sizes;
- **without co-occurrence counts every combination of a size has the same weight (uniform sampling)**;
- with an aggregate co-occurrence matrix ``C`` (``C[i, j]`` = number of training images labelled with both i
  and j; only this K x K table of counts is used, never images or per-client statistics), a combination S has
  weight ``w(S) = min_{i<j in S} C[i, j] + smoothing``. For a pair this is its count; for a triple it is the
  tightest upper bound on the triple's count that pairwise counts give. Combinations of weight 0 (never seen
  together, no smoothing) are not sampled.

Weighted sampling without replacement is successive sampling (each draw proportional to weight among the
combinations not yet drawn), done exactly with the Gumbel-top-k trick: keys ``log w(S) + G_S``, ``G_S ~
Gumbel(0, 1)`` i.i.d., take the ``n`` largest (Vieira 2014; Kool et al., ICML 2019).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedmpt.errors import ConditionsError, ConfigError

__all__ = [
    "MAX_ENUMERATED_COMBINATIONS",
    "SamplingConfig",
    "combination_weights",
    "cooccurrence_counts",
    "load_cooccurrence",
    "sample_class_combinations",
]

#: Above this many combinations of one size, weighted sampling refuses (it enumerates them all) and uniform
#: sampling switches to rejection sampling of random subsets.
MAX_ENUMERATED_COMBINATIONS = 2_000_000


@dataclass(frozen=True)
class SamplingConfig:
    """How many stage-1 requests to make and over which combination sizes.

    ``budget``: total number of combinations (= stage-1 requests, before format retries); ``sizes``:
    combination sizes, each >= 2; ``smoothing``: pseudo-count added to every combination's weight when counts
    are given.
    """

    budget: int = 200
    sizes: tuple[int, ...] = (2, 3)
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ConfigError(f"sampling budget must be an int >= 1, got {self.budget!r}")
        if not self.sizes or any(not isinstance(k, int) or k < 2 for k in self.sizes):
            raise ConfigError(f"combination sizes must be ints >= 2, got {self.sizes!r}")
        if len(set(self.sizes)) != len(self.sizes):
            raise ConfigError(f"combination sizes must be distinct, got {self.sizes!r}")
        if not (math.isfinite(self.smoothing) and self.smoothing >= 0):
            raise ConfigError(f"smoothing must be a finite number >= 0, got {self.smoothing!r}")


def cooccurrence_counts(labels: NDArray[np.generic]) -> NDArray[np.int64]:
    """Aggregate co-occurrence counts ``C = Y^T Y`` of a binary label matrix ``Y`` (n_images, K).

    ``C[i, j]`` is the number of images labelled with both i and j; the diagonal holds class frequencies.
    This is the only statistic of the training labels the pipeline can use; sharing it is the user's choice.
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ConfigError(f"labels must be a 2-D (n_images, n_classes) matrix, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ConfigError("labels must be binary (0/1) for co-occurrence counts")
    y64 = y.astype(np.int64)
    return y64.T @ y64  # (K, K)


def _check_counts(counts: NDArray[np.generic], n_classes: int, where: str) -> NDArray[np.float64]:
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (n_classes, n_classes):
        raise ConditionsError(f"{where}: co-occurrence matrix has shape {c.shape}, expected ({n_classes}, {n_classes})")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ConditionsError(f"{where}: co-occurrence counts must be finite and >= 0")
    if not np.allclose(c, c.T):
        raise ConditionsError(f"{where}: co-occurrence matrix is not symmetric")
    return c


def load_cooccurrence(path: str | Path, classnames: Sequence[str]) -> NDArray[np.float64]:
    """Read ``{"classnames": [...], "counts": [[...], ...]}``, checking it is for ``classnames`` in order."""
    source = Path(path)
    where = f"co-occurrence file {str(source)!r}"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConditionsError(f"{where}: cannot read ({err})") from err
    except json.JSONDecodeError as err:
        raise ConditionsError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != {"classnames", "counts"}:
        raise ConditionsError(f"{where}: expected a JSON object with exactly the keys 'classnames' and 'counts'")
    if data["classnames"] != list(classnames):
        raise ConditionsError(f"{where}: its class list differs from the one conditions are derived for")
    try:
        counts = np.asarray(data["counts"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConditionsError(f"{where}: counts is not a numeric matrix ({err})") from err
    return _check_counts(counts, len(classnames), where)


def combination_weights(
    combos: NDArray[np.int64], counts: NDArray[np.floating], smoothing: float = 0.0
) -> NDArray[np.float64]:
    """Weight of each combination (a row of class indices): the min of its pairwise counts, plus smoothing."""
    k = combos.shape[1]
    weights = np.full(combos.shape[0], np.inf)
    for a, b in itertools.combinations(range(k), 2):
        weights = np.minimum(weights, counts[combos[:, a], combos[:, b]])
    return np.asarray(weights + smoothing, dtype=np.float64)


def _allocate(budget: int, capacities: Sequence[int]) -> list[int]:
    """Split ``budget`` evenly over groups, each capped at its capacity, passing leftovers to the others.

    Water-filling: visit groups by increasing capacity; each takes ``min(capacity, remaining //
    groups_left)``, so groups that are not capped end up within one of each other and the total is
    ``min(budget, sum(caps))``.
    """
    alloc = [0] * len(capacities)
    remaining = budget
    order = sorted(range(len(capacities)), key=lambda i: capacities[i])
    for rank, i in enumerate(order):
        give = min(capacities[i], remaining // (len(order) - rank))
        alloc[i] = give
        remaining -= give
    return alloc


def _sample_uniform(n_classes: int, k: int, take: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    total = math.comb(n_classes, k)
    if total <= MAX_ENUMERATED_COMBINATIONS:
        combos = list(itertools.combinations(range(n_classes), k))
        picks = rng.choice(total, size=take, replace=False)
        return [combos[int(i)] for i in picks]
    # Rejection sampling: a uniform random k-subset, redrawn if already taken; take << total here.
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < take:
        subset = tuple(sorted(int(i) for i in rng.choice(n_classes, size=k, replace=False)))
        chosen.setdefault(subset, None)
    return list(chosen)


def sample_class_combinations(
    classnames: Sequence[str],
    config: SamplingConfig,
    rng: np.random.Generator,
    cooccurrence: NDArray[np.generic] | None = None,
) -> list[tuple[str, ...]]:
    """Sample distinct class combinations for stage 1 (see the module docstring for the distribution).

    Returns at most ``config.budget`` combinations (fewer when fewer are eligible), grouped by size in the
    order of ``config.sizes``; within a combination, classes keep the order of ``classnames``. Deterministic
    given the state of ``rng``.
    """
    n_classes = len(classnames)
    sizes = [k for k in config.sizes if k <= n_classes]
    if not sizes:
        raise ConfigError(f"no combination size in {config.sizes} fits {n_classes} classes")
    counts = None if cooccurrence is None else _check_counts(cooccurrence, n_classes, "co-occurrence counts")
    pools: list[tuple[NDArray[np.int64], NDArray[np.float64]] | None] = []
    capacities: list[int] = []
    for k in sizes:
        total = math.comb(n_classes, k)
        if counts is None:
            pools.append(None)
            capacities.append(total)
            continue
        if total > MAX_ENUMERATED_COMBINATIONS:
            raise ConfigError(
                f"weighted sampling of {k}-combinations of {n_classes} classes needs {total} weights, "
                f"more than {MAX_ENUMERATED_COMBINATIONS}; drop size {k} or sample uniformly"
            )
        combos = np.array(list(itertools.combinations(range(n_classes), k)), dtype=np.int64).reshape(-1, k)
        weights = combination_weights(combos, counts, config.smoothing)
        keep = weights > 0
        pools.append((combos[keep], weights[keep]))
        capacities.append(int(keep.sum()))
    result: list[tuple[str, ...]] = []
    for k, pool, take in zip(sizes, pools, _allocate(config.budget, capacities), strict=True):
        if take == 0:
            continue
        if pool is None:
            picked = _sample_uniform(n_classes, k, take, rng)
        else:
            combos, weights = pool
            keys = np.log(weights) + rng.gumbel(size=weights.shape[0])
            order = np.argsort(-keys, kind="stable")[:take]
            picked = [tuple(int(i) for i in combos[j]) for j in order]
        result.extend(tuple(classnames[i] for i in combo) for combo in picked)
    return result
