"""Rendering of synthetic-world scenes to RGB images, with per-patch object coverage for dense supervision.

Rendering is deterministic given the scene and a ``numpy.random.Generator`` (which draws positions jitter,
background colours and texture phase). Glyph masks are cached, so a scene costs a handful of small numpy
operations: thousands of 64x64 images per second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmpt.world.factors import (
    BACKGROUND,
    COLOURS,
    CONDITION_FACTORS,
    LAYOUT,
    LIGHTING,
    POSE,
    POSE_ROTATIONS,
    SCALE,
    SCALE_FRACTIONS,
)
from fedmpt.world.glyphs import glyph_mask
from fedmpt.world.scene import Scene

_LIGHT_GAIN: dict[str, tuple[np.ndarray, float]] = {
    "bright": (np.array([1.0, 1.0, 1.0], dtype=np.float32), 0.12),
    "dim": (np.array([0.65, 0.65, 0.65], dtype=np.float32), 0.0),
    "warm": (np.array([1.08, 0.95, 0.8], dtype=np.float32), 0.02),
    "cool": (np.array([0.8, 0.95, 1.08], dtype=np.float32), 0.02),
}


@dataclass(frozen=True)
class RenderedScene:
    """A rendered image (H, W, 3) uint8 and the fraction of each patch covered by each object class."""

    image: np.ndarray
    patch_coverage: dict[str, np.ndarray]  # class name -> (H/patch, W/patch) float32 coverage in [0, 1]


def _texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background pattern in [0, 1], shape (size, size)."""
    period = max(4, size // 8)
    yy, xx = np.mgrid[0:size, 0:size]
    phase = int(rng.integers(period))
    if name == "plain":
        return np.zeros((size, size), dtype=np.float32)
    if name == "striped":
        coord = yy if rng.random() < 0.5 else xx
        return (((coord + phase) // (period // 2)) % 2).astype(np.float32)
    if name == "checkered":
        return ((((yy + phase) // period) + ((xx + phase) // period)) % 2).astype(np.float32)
    if name == "dotted":
        cy = (yy + phase) % period - period / 2 + 0.5
        cx = (xx + phase) % period - period / 2 + 0.5
        return ((cy**2 + cx**2) <= (period / 4) ** 2).astype(np.float32)
    if name == "noisy":
        block = 2
        coarse = rng.random((size // block + 1, size // block + 1)).astype(np.float32)
        return np.kron(coarse, np.ones((block, block), dtype=np.float32))[:size, :size]
    raise ValueError(f"unknown background {name!r}")


def _centres(layout: str, n: int, size: int, half: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Object centres (row, col) for ``n`` objects under ``layout``, kept inside the canvas."""
    slots = (np.arange(n) + 0.5) * size / n
    jitter = max(1, size // 32)
    pts: list[tuple[float, float]]
    if layout == "row":
        row = size / 2 + rng.integers(-size // 8, size // 8 + 1)
        pts = [(row, s) for s in slots]
    elif layout == "column":
        col = size / 2 + rng.integers(-size // 8, size // 8 + 1)
        pts = [(s, col) for s in slots]
    elif layout == "diagonal":
        pts = [(s, s) for s in slots] if rng.random() < 0.5 else [(s, size - s) for s in slots]
    elif layout == "grid":
        cells = rng.permutation(4)[:n]
        pts = [(size / 4 + (c // 2) * size / 2, size / 4 + (c % 2) * size / 2) for c in cells]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    out: list[tuple[int, int]] = []
    for r, c in pts:
        y = int(round(float(r) + int(rng.integers(-jitter, jitter + 1))))
        x = int(round(float(c) + int(rng.integers(-jitter, jitter + 1))))
        out.append((min(max(y, half), size - half), min(max(x, half), size - half)))
    return out


def render_scene(
    scene: Scene,
    rng: np.random.Generator,
    size: int = 64,
    patch_size: int = 8,
    *,
    with_coverage: bool = True,
) -> RenderedScene:
    """Render ``scene`` to a (size, size, 3) uint8 image; also return per-patch class coverage (if asked)."""
    values = {f.name: scene.condition_value(i) for i, f in enumerate(CONDITION_FACTORS)}
    # Muted background colours keep the saturated object colours visible.
    # Muted, nearly grey backgrounds with a low-contrast texture keep the saturated objects salient.
    c1 = (rng.uniform(0.35, 0.6) + rng.uniform(-0.04, 0.04, size=3)).astype(np.float32)
    c2 = np.clip(c1 + rng.choice([-1, 1]) * rng.uniform(0.1, 0.16), 0, 1).astype(np.float32)
    pattern = _texture(values[BACKGROUND.name], size, rng)[..., None]
    canvas = c1 + pattern * (c2 - c1)  # (size, size, 3)

    glyph = max(4, int(round(SCALE_FRACTIONS[values[SCALE.name]] * size)))
    half = glyph // 2 + 1
    centres = _centres(values[LAYOUT.name], len(scene.classes), size, half, rng)
    rotations = POSE_ROTATIONS[values[POSE.name]]
    grid = size // patch_size
    coverage: dict[str, np.ndarray] = {}
    for cls, colour, (row, col) in zip(scene.classes, scene.colours, centres, strict=True):
        rotation = rotations[int(rng.integers(len(rotations)))]
        alpha = glyph_mask(cls, rotation, glyph)
        top, left = row - glyph // 2, col - glyph // 2
        window = canvas[top : top + glyph, left : left + glyph]
        a = alpha[..., None]
        window[...] = window * (1 - a) + np.asarray(COLOURS[colour], dtype=np.float32) * a
        if with_coverage:
            full = np.zeros((size, size), dtype=np.float32)
            full[top : top + glyph, left : left + glyph] = alpha
            coverage[cls] = full.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))

    gain, offset = _LIGHT_GAIN[values[LIGHTING.name]]
    canvas = canvas * gain + offset
    canvas += rng.normal(0.0, 0.02, size=canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return RenderedScene(image=image, patch_coverage=coverage)
