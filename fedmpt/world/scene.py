"""Scene distributions of the synthetic world: the oracle causal structure and per-client spurious pairs.

A scene is a set of distinct object classes (1-4), one colour per object, and one value for each of the five
condition factors. Scene distributions differ only in how classes are drawn given the conditions:

* **oracle** (the world's true mechanism): the background is drawn from ``background_probs``; each object is,
  with probability ``context_strength``, drawn from the background's class group, otherwise uniformly. The
  background is the mediator that makes classes co-occur.
* **client k**: the oracle with a client-specific background mix (label skew) plus spurious pairs: whenever
  class A is present, class B is added with probability ``spurious_strength`` (and vice versa), far more often
  than the oracle puts them together.
* **decorrelated**: the oracle with every listed pair broken: A and B never co-occur.
* **pretraining**: all classes of the broader world, drawn independently and uniformly, all conditions uniform;
  it never contains a client's spurious pairing beyond chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmpt.errors import ConfigError
from fedmpt.world.factors import (
    ALL_CLASSES,
    BACKGROUND,
    BACKGROUND_GROUPS,
    CLASS_COLOURS,
    COLOURS,
    CONDITION_FACTORS,
    TASK_CLASSES,
)


@dataclass(frozen=True)
class Scene:
    """One sampled scene: class names present, their colours, and the value index of each condition factor."""

    classes: tuple[str, ...]
    colours: tuple[str, ...]
    conditions: tuple[int, ...]  # index into CONDITION_FACTORS[i].values

    def condition_value(self, factor_index: int) -> str:
        """The value name of condition factor ``factor_index`` in this scene."""
        return CONDITION_FACTORS[factor_index].values[self.conditions[factor_index]]


@dataclass(frozen=True)
class SceneDistribution:
    """A distribution over scenes (see the module docstring for the families).

    Args:
        classes: the class vocabulary objects are drawn from.
        background_probs: probabilities of the background values, or None for uniform.
        context_strength: probability that an object comes from its background's class group.
        spurious_pairs: (A, B) pairs added together with probability ``spurious_strength``.
        spurious_strength: probability of adding B when A is present (and A when B is).
        broken_pairs: pairs that never co-occur (the decorrelated split).
        min_objects, max_objects: number of objects per scene, drawn uniformly.
        colour_binding: probability that an object wears its class's canonical colour (else a random one).
    """

    classes: tuple[str, ...] = TASK_CLASSES
    background_probs: tuple[float, ...] | None = None
    context_strength: float = 0.75
    spurious_pairs: tuple[tuple[str, str], ...] = ()
    spurious_strength: float = 0.0
    broken_pairs: tuple[tuple[str, str], ...] = ()
    min_objects: int = 1
    max_objects: int = 4
    colour_binding: float = 0.9
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in ALL_CLASSES]
        if unknown:
            raise ConfigError(f"unknown world classes {unknown}; known: {list(ALL_CLASSES)}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be distinct, got {self.classes}")
        if not 0.0 <= self.context_strength <= 1.0:
            raise ConfigError(f"context_strength must be in [0, 1], got {self.context_strength}")
        if not 0.0 <= self.colour_binding <= 1.0:
            raise ConfigError(f"colour_binding must be in [0, 1], got {self.colour_binding}")
        if not 0.0 <= self.spurious_strength <= 1.0:
            raise ConfigError(f"spurious_strength must be in [0, 1], got {self.spurious_strength}")
        if not 1 <= self.min_objects <= self.max_objects <= min(4, len(self.classes)):
            raise ConfigError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}..{self.max_objects}")
        if self.background_probs is not None:
            probs = np.asarray(self.background_probs, dtype=float)
            if probs.shape != (len(BACKGROUND.values),) or (probs < 0).any() or abs(probs.sum() - 1) > 1e-6:
                raise ConfigError(
                    f"background_probs must be {len(BACKGROUND.values)} non-negative numbers summing to 1, "
                    f"got {self.background_probs}"
                )
        for a, b in self.spurious_pairs + self.broken_pairs:
            if a not in self.classes or b not in self.classes or a == b:
                raise ConfigError(f"pair ({a!r}, {b!r}) must name two different classes of {self.classes}")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.classes)})

    def sample(self, rng: np.random.Generator) -> Scene:
        """Draw one scene."""
        conditions = [int(rng.integers(len(f.values))) for f in CONDITION_FACTORS]
        bg_index = CONDITION_FACTORS.index(BACKGROUND)
        if self.background_probs is not None:
            conditions[bg_index] = int(rng.choice(len(BACKGROUND.values), p=self.background_probs))
        group = [c for c in BACKGROUND_GROUPS[BACKGROUND.values[conditions[bg_index]]] if c in self._index]
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        chosen: list[str] = []
        while len(chosen) < n:
            pool = group if group and rng.random() < self.context_strength else self.classes
            candidate = pool[int(rng.integers(len(pool)))]
            if candidate not in chosen:
                chosen.append(candidate)
        chosen = self._apply_spurious(chosen, rng)
        chosen = self._break_pairs(chosen, rng)
        names = list(COLOURS)
        colours = tuple(
            CLASS_COLOURS[c] if rng.random() < self.colour_binding else names[int(rng.integers(len(names)))]
            for c in chosen
        )
        return Scene(tuple(chosen), colours, tuple(conditions))

    def _apply_spurious(self, chosen: list[str], rng: np.random.Generator) -> list[str]:
        for a, b in self.spurious_pairs:
            for present, partner in ((a, b), (b, a)):
                if present in chosen and partner not in chosen and rng.random() < self.spurious_strength:
                    if len(chosen) < self.max_objects:
                        chosen.append(partner)
                    else:  # replace an object that is not part of this pair
                        others = [i for i, c in enumerate(chosen) if c not in (a, b)]
                        chosen[others[int(rng.integers(len(others)))]] = partner
        return chosen

    def _break_pairs(self, chosen: list[str], rng: np.random.Generator) -> list[str]:
        for a, b in self.broken_pairs:
            if a in chosen and b in chosen:
                victim = (a, b)[int(rng.integers(2))]
                forbidden = set(chosen)
                for x, y in self.broken_pairs:  # the replacement must not complete another broken pair
                    if x in chosen:
                        forbidden.add(y)
                    if y in chosen:
                        forbidden.add(x)
                options = [c for c in self.classes if c not in forbidden]
                if options:
                    chosen[chosen.index(victim)] = options[int(rng.integers(len(options)))]
                else:
                    chosen.remove(victim)
        return chosen

    def labels(self, scene: Scene) -> np.ndarray:
        """Multi-hot int8 label vector of ``scene`` over ``self.classes``."""
        y = np.zeros(len(self.classes), dtype=np.int8)
        for c in scene.classes:
            y[self._index[c]] = 1
        return y


def cross_group_pairs(classes: tuple[str, ...] = TASK_CLASSES) -> list[tuple[str, str]]:
    """All class pairs whose members belong to different background groups (the oracle rarely joins them)."""
    group_of = {c: g for g, members in BACKGROUND_GROUPS.items() for c in members}
    return [
        (a, b)
        for i, a in enumerate(classes)
        for b in classes[i + 1 :]
        if group_of.get(a) is not None and group_of.get(a) != group_of.get(b)
    ]


def oracle_distribution(context_strength: float = 0.75) -> SceneDistribution:
    """The world's true mechanism over the task classes, uniform backgrounds."""
    return SceneDistribution(context_strength=context_strength)


def pretraining_distribution() -> SceneDistribution:
    """The broader pretraining world: all classes independent and uniform, all conditions uniform."""
    return SceneDistribution(classes=ALL_CLASSES, context_strength=0.0)
