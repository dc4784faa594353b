"""Captions of synthetic-world scenes: objects and conditions named in varied wording.

A caption always names every object (so that it identifies its image among a batch), and each condition
factor with probability ``condition_rate``, in one of several sentence shapes. Some captions are the short
zero-shot forms ("a photo of a star.", "a photo with a striped background.") so that the text tower knows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmpt.world.factors import BACKGROUND, CONDITION_FACTORS, LAYOUT, LIGHTING, POSE, SCALE, ConditionFactor
from fedmpt.world.scene import Scene

Claim = tuple[str, ...]


@dataclass(frozen=True)
class Caption:
    """A caption and the facts it claims: ("class", c), ("colour", colour, c), ("condition", factor, value)."""

    text: str
    claims: frozenset[Claim]


def scene_facts(scene: Scene) -> frozenset[Claim]:
    """Every fact a caption of ``scene`` could truthfully claim."""
    facts: set[Claim] = {("class", c) for c in scene.classes}
    facts |= {("colour", colour, c) for c, colour in zip(scene.classes, scene.colours, strict=True)}
    facts |= {("condition", f.name, scene.condition_value(i)) for i, f in enumerate(CONDITION_FACTORS)}
    return frozenset(facts)


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(scene: Scene, factor_index: int, rng: np.random.Generator) -> str:
    factor = CONDITION_FACTORS[factor_index]
    return _pick(factor.phrases[scene.conditions[factor_index]], rng)


def caption(
    scene: Scene,
    rng: np.random.Generator,
    condition_rate: float = 0.5,
    colour_rate: float = 0.5,
    short_rate: float = 0.1,
) -> Caption:
    """A caption of ``scene``: usually naming all objects and some conditions, sometimes a short zero-shot form.

    With probability ``short_rate`` the caption is a short form about one condition ("a photo with a striped
    background.") and with the same probability about one object ("a photo of a star."); otherwise it names
    every object and each condition with probability ``condition_rate``.
    """
    form = rng.random()
    names = list(scene.classes)
    colours = list(scene.colours)
    facts = {f.name: scene.condition_value(i) for i, f in enumerate(CONDITION_FACTORS)}
    if form < short_rate:
        factor_index = int(rng.integers(len(CONDITION_FACTORS)))
        name = CONDITION_FACTORS[factor_index].name
        return Caption(
            f"a photo with {_condition_clause(scene, factor_index, rng)}.",
            frozenset({("condition", name, facts[name])}),
        )
    if form < 2 * short_rate:
        i = int(rng.integers(len(names)))
        return Caption(class_prompt(names[i]), frozenset({("class", names[i])}))
    order = rng.permutation(len(names))
    use_colour = rng.random() < colour_rate
    words = [f"{colours[i]} {names[i]}" if use_colour else names[i] for i in order]
    claims: set[Claim] = {("class", c) for c in names}
    if use_colour:
        claims |= {("colour", colour, c) for c, colour in zip(names, colours, strict=True)}
    factors = {f.name: rng.random() < condition_rate for f in CONDITION_FACTORS}
    if len(words) == 1:
        factors[LAYOUT.name] = False  # a single object shows no layout
    claims |= {("condition", name, facts[name]) for name, used in factors.items() if used}
    idx = {f.name: i for i, f in enumerate(CONDITION_FACTORS)}
    adjectives = []
    if factors[SCALE.name]:
        adjectives.append(_phrase(scene, idx[SCALE.name], rng))
    if factors[POSE.name]:
        adjectives.append(_phrase(scene, idx[POSE.name], rng))
    objects = _join([f"{_article(w)} {w}" for w in words])
    if adjectives and len(words) == 1:
        w = " ".join(adjectives + [words[0]])
        objects = f"{_article(w)} {w}"
    elif adjectives:
        objects = f"{objects}, all {' and '.join(adjectives)}"
    parts = [f"a photo of {objects}" if rng.random() < 0.6 else objects]
    if factors[LAYOUT.name]:
        parts.append(_phrase(scene, idx[LAYOUT.name], rng))
    if factors[BACKGROUND.name]:
        parts.append(f"on {_phrase(scene, idx[BACKGROUND.name], rng)}")
    if factors[LIGHTING.name]:
        parts.append(_phrase(scene, idx[LIGHTING.name], rng))
    head, tail = parts[0], parts[1:]
    tail = [tail[i] for i in rng.permutation(len(tail))]
    return Caption(" ".join([head, *tail]) + ".", frozenset(claims))


def _condition_clause(scene: Scene, factor_index: int, rng: np.random.Generator) -> str:
    return _clause(CONDITION_FACTORS[factor_index], _phrase(scene, factor_index, rng))


def _clause(factor: ConditionFactor, phrase: str) -> str:
    if factor is BACKGROUND:
        return phrase
    if factor in (LIGHTING, LAYOUT):
        return f"objects {phrase}"
    return f"{phrase} objects"


def condition_sentence(factor: ConditionFactor, phrase: str) -> str:
    """The short caption of one condition value: ``"a photo with {clause}."`` (e.g. "a photo with a striped
    background.", "a photo with tilted objects.")."""
    return f"a photo with {_clause(factor, phrase)}."


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def class_prompt(classname: str) -> str:
    """The zero-shot prompt of a class: ``"a photo of a {class}."``."""
    return f"a photo of {_article(classname)} {classname}."


def condition_prompts(factor_index: int) -> list[str]:
    """Zero-shot prompts, one per value of condition factor ``factor_index`` (first phrasing of each)."""
    factor = CONDITION_FACTORS[factor_index]
    return [condition_sentence(factor, phrases[0]) for phrases in factor.phrases]
