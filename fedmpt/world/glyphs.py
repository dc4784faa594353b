"""Glyphs of the synthetic world: analytic 2-D shapes rendered to anti-aliased alpha masks.

Each glyph is an implicit function ``inside(x, y) -> bool`` on the square ``[-1, 1]^2``. Rotating a glyph
rotates the coordinate grid before the function is evaluated, so every pose is exact rather than resampled.
Masks are rendered at ``SUPERSAMPLE`` times the target size and area-averaged down, which anti-aliases the
edges. Rendering happens once per (glyph, pose, size) and is cached; scene generation only composites.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]

SUPERSAMPLE = 4


def _polygon(vertices: list[tuple[float, float]]) -> Inside:
    """Inside test of a convex or simple polygon by the even-odd rule."""
    vx = np.array([v[0] for v in vertices])
    vy = np.array([v[1] for v in vertices])

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.zeros(x.shape, dtype=bool)
        j = len(vx) - 1
        for i in range(len(vx)):
            crosses = (vy[i] > y) != (vy[j] > y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i]) + vx[i]
            result ^= crosses & (x < x_at)
            j = i
        return result

    return inside


def _star(points: int, outer: float, inner: float) -> Inside:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return _polygon([(r * np.cos(a), r * np.sin(a)) for r, a in zip(radii, angles, strict=True)])


def _regular(sides: int, radius: float, phase: float = 0.0) -> Inside:
    angles = phase + np.arange(sides) * 2 * np.pi / sides
    return _polygon([(radius * np.cos(a), radius * np.sin(a)) for a in angles])


def _union(*parts: Inside) -> Inside:
    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.zeros(x.shape, dtype=bool)
        for part in parts:
            result |= part(x, y)
        return result

    return inside


def _box(x0: float, y0: float, x1: float, y1: float) -> Inside:
    return lambda x, y: (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _disk(cx: float, cy: float, r: float) -> Inside:
    return lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The classic implicit heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled into the unit square.
    xs, ys = x * 1.25, (y + 0.1) * 1.25
    return (xs**2 + ys**2 - 1) ** 3 - xs**2 * ys**3 <= 0


def _crescent(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x**2 + y**2) <= 0.85**2) & (((x - 0.38) ** 2 + (y - 0.12) ** 2) > 0.7**2)


def _ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = x**2 + y**2
    return (r2 <= 0.85**2) & (r2 >= 0.5**2)


# y grows upwards in glyph coordinates (the renderer flips rows), so "up" in a description is +y.
GLYPHS: dict[str, Inside] = {
    "triangle": _polygon([(-0.85, -0.7), (0.85, -0.7), (0.0, 0.85)]),
    "square": _box(-0.7, -0.7, 0.7, 0.7),
    "cross": _union(_box(-0.85, -0.25, 0.85, 0.25), _box(-0.25, -0.85, 0.25, 0.85)),
    "star": _star(5, 0.95, 0.4),
    "heart": _heart,
    "arrow": _union(_box(-0.2, -0.9, 0.2, 0.15), _polygon([(-0.7, 0.1), (0.7, 0.1), (0.0, 0.9)])),
    "crescent": _crescent,
    "hexagon": _regular(6, 0.85),
    "hourglass": _union(
        _polygon([(-0.7, 0.85), (0.7, 0.85), (0.0, 0.0)]), _polygon([(-0.7, -0.85), (0.7, -0.85), (0.0, 0.0)])
    ),
    "house": _union(_box(-0.6, -0.85, 0.6, 0.15), _polygon([(-0.85, 0.1), (0.85, 0.1), (0.0, 0.9)])),
    "tree": _union(_box(-0.15, -0.9, 0.15, -0.3), _polygon([(-0.75, -0.35), (0.75, -0.35), (0.0, 0.9)])),
    "mushroom": _union(
        _box(-0.2, -0.9, 0.2, 0.0),
        lambda x, y: ((x**2 + y**2) <= 0.85**2) & (y >= 0.0),
    ),
    # Glyphs below exist only in the broader pretraining world, never in a client's task.
    "circle": _disk(0.0, 0.0, 0.8),
    "ring": _ring,
    "diamond": _polygon([(0.0, 0.95), (0.5, 0.0), (0.0, -0.95), (-0.5, 0.0)]),
    "flag": _union(_box(-0.75, -0.9, -0.55, 0.9), _polygon([(-0.55, 0.9), (0.8, 0.5), (-0.55, 0.1)])),
}


@lru_cache(maxsize=4096)
def glyph_mask(name: str, rotation_deg: float, size: int) -> np.ndarray:
    """Alpha mask (size, size) float32 in [0, 1] of glyph ``name`` rotated counter-clockwise by ``rotation_deg``.

    The mask is cached; callers must not modify it in place.
    """
    if name not in GLYPHS:
        raise KeyError(f"unknown glyph {name!r}; known: {sorted(GLYPHS)}")
    if size < 2:
        raise ValueError(f"glyph size must be at least 2 pixels, got {size}")
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    gx, gy = np.meshgrid(coords, -coords)  # row 0 is the top, where y = +1
    theta = np.deg2rad(rotation_deg)
    # Evaluate the glyph at the inverse-rotated coordinates: rotating the shape by +theta.
    rx = np.cos(theta) * gx + np.sin(theta) * gy
    ry = -np.sin(theta) * gx + np.cos(theta) * gy
    fine = GLYPHS[name](rx, ry).astype(np.float32)
    mask = fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    mask.setflags(write=False)
    return mask
