"""Fixtures for the dataset-loader tests: tiny real image files and the shared coco_tiny sample."""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[3]


def _shared_dir() -> Path:
    override = os.environ.get("FEDMPT_SHARED_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared"


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """Write a small RGB image whose pixels are all ``color``; the format follows the suffix (JPEG/PNG)."""

    def write(
        path: Path, color: tuple[int, int, int] = (200, 30, 60), size: tuple[int, int] = (12, 8)
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.empty((size[1], size[0], 3), dtype=np.uint8)
        array[...] = color
        Image.fromarray(array).save(path)
        return path

    return write


@pytest.fixture
def truncate() -> Callable[[Path], Path]:
    """Cut an image file to half its length, as an interrupted download would."""

    def cut(path: Path) -> Path:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return cut


@pytest.fixture
def coco_tiny() -> Path:
    """The genuine COCO sample in ``<repo>/../shared/data/coco_tiny`` (``$FEDMPT_SHARED_DIR`` overrides)."""
    path = _shared_dir() / "data" / "coco_tiny"
    if not path.is_dir():
        pytest.skip(f"{path} not found (set FEDMPT_SHARED_DIR to the folder holding data/coco_tiny)")
    return path
