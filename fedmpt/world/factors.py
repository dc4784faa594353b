"""The vocabulary of the synthetic world: object classes, condition factors and their wordings.

The five condition factors are the paper's five abstract conditions (spatial layout, object pose, background,
lighting, object scale). Every factor value has several phrasings so that captions vary in wording.
"""

from __future__ import annotations

from dataclasses import dataclass

# Classes of the federated task, in canonical order. Background groups below give them an oracle
# co-occurrence structure ("indoor" makes cat and chair co-occur; here "striped" makes triangle and cross co-occur).
TASK_CLASSES: tuple[str, ...] = (
    "triangle",
    "square",
    "cross",
    "star",
    "heart",
    "arrow",
    "crescent",
    "hexagon",
    "hourglass",
    "house",
    "tree",
    "mushroom",
)
# Classes that exist only in the broader pretraining world (never in a client's task).
PRETRAIN_ONLY_CLASSES: tuple[str, ...] = ("circle", "ring", "diamond", "flag")
ALL_CLASSES: tuple[str, ...] = TASK_CLASSES + PRETRAIN_ONLY_CLASSES

# Object colours: an attribute of the world that captions mention. Every class has a canonical colour (its
# index in this table), which its objects wear with probability ``colour_binding`` (as real objects have typical
# colours); the task's labels are the classes, never the colours.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.12, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.15, 0.75),
    "orange": (0.98, 0.55, 0.05),
    "magenta": (0.92, 0.1, 0.6),
    "violet": (0.5, 0.3, 1.0),
    "pink": (0.98, 0.55, 0.75),
    "brown": (0.5, 0.3, 0.1),
    "cyan": (0.1, 0.85, 0.9),
    "olive": (0.45, 0.5, 0.05),
    "lime": (0.65, 0.95, 0.2),
    "navy": (0.05, 0.08, 0.45),
    "teal": (0.0, 0.5, 0.5),
    "maroon": (0.5, 0.0, 0.15),
}


@dataclass(frozen=True)
class ConditionFactor:
    """One condition factor: its name (as the paper's abstract condition), its values and their phrasings."""

    name: str
    values: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]  # phrases[i] are wordings of values[i]

    def __post_init__(self) -> None:
        if len(self.values) != len(self.phrases):
            raise ValueError(f"factor {self.name!r}: {len(self.values)} values but {len(self.phrases)} phrase lists")


LAYOUT = ConditionFactor(
    "spatial layout",
    ("row", "column", "diagonal", "grid"),
    (
        ("arranged in a row", "lined up horizontally", "side by side in a row"),
        ("arranged in a column", "stacked vertically", "one above the other in a column"),
        ("arranged along a diagonal", "placed diagonally", "in a diagonal line"),
        ("arranged in a grid", "placed in the corners of a grid", "spread over a grid"),
    ),
)
POSE = ConditionFactor(
    "object pose",
    ("upright", "tilted", "sideways", "upside down"),
    (
        ("upright", "standing upright"),
        ("tilted", "slightly tilted"),
        ("sideways", "lying sideways"),
        ("upside down", "flipped upside down"),
    ),
)
BACKGROUND = ConditionFactor(
    "background",
    ("plain", "striped", "checkered", "dotted", "noisy"),
    (
        ("a plain background", "a blank background"),
        ("a striped background", "a background with stripes"),
        ("a checkered background", "a checkerboard background"),
        ("a dotted background", "a background with dots"),
        ("a noisy background", "a grainy background"),
    ),
)
LIGHTING = ConditionFactor(
    "lighting",
    ("bright", "dim", "warm", "cool"),
    (
        ("in bright light", "brightly lit"),
        ("in dim light", "in the dark"),
        ("in warm light", "under warm orange light"),
        ("in cool light", "under cold blue light"),
    ),
)
SCALE = ConditionFactor(
    "object scale",
    ("small", "medium", "large"),
    (
        ("small", "tiny"),
        ("medium sized", "mid sized"),
        ("large", "big"),
    ),
)

CONDITION_FACTORS: tuple[ConditionFactor, ...] = (LAYOUT, POSE, BACKGROUND, LIGHTING, SCALE)

# Rotation angles (degrees, counter-clockwise) of each pose; "tilted" and "sideways" pick a sign at random.
POSE_ROTATIONS: dict[str, tuple[float, ...]] = {
    "upright": (0.0,),
    "tilted": (30.0, -30.0),
    "sideways": (90.0, -90.0),
    "upside down": (180.0,),
}
# Glyph side length in pixels on a 64-pixel canvas; scaled with the canvas size.
SCALE_FRACTIONS: dict[str, float] = {"small": 13 / 64, "medium": 17 / 64, "large": 22 / 64}

# Oracle causal structure: every background except "plain" is the context of a group of task classes.
BACKGROUND_GROUPS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "striped": ("triangle", "square", "cross"),
    "checkered": ("star", "heart", "arrow"),
    "dotted": ("crescent", "hexagon", "hourglass"),
    "noisy": ("house", "tree", "mushroom"),
}

# The canonical colour of every class (same order as ALL_CLASSES).
CLASS_COLOURS: dict[str, str] = dict(zip(ALL_CLASSES, COLOURS, strict=True))
