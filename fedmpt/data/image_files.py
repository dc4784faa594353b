"""Reading image files into RGB PIL images, with errors that name the file.

Every loader reads images through a *reader*: a picklable callable ``Path -> PIL.Image.Image`` (RGB). The
default, :func:`open_rgb`, decodes the whole file (``Image.load``) so that a truncated JPEG fails here, with
the file's name, rather than later inside a transform. PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never touched: a truncated file is an error, not a silently grey-padded image.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from fedmpt.errors import DatasetError

logger = logging.getLogger(__name__)

ImageReader = Callable[[Path], Image.Image]

__all__ = ["ImageReader", "find_unreadable", "open_rgb"]


def open_rgb(path: Path) -> Image.Image:
    """Decode the image file at ``path`` completely and return it as an RGB image.

    Raises:
        DatasetError: the file is missing, is not an image PIL can identify, or is truncated/corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL signals unidentified, truncated and corrupt files with OSError subclasses (and, for some
        # plugins, ValueError/SyntaxError).
        raise DatasetError(f"cannot read image file {path}: {exc}") from exc


def find_unreadable(paths: Sequence[Path], reader: ImageReader) -> list[int]:
    """Return the indices of ``paths`` that ``reader`` cannot read (missing, unidentifiable, truncated).

    Cost: one full decode per image, which for a large dataset is of the order of a pass of the data loader;
    it is paid only when a loader is called with ``skip_unreadable=True``.
    """
    bad: list[int] = []
    for index, path in enumerate(paths):
        try:
            reader(path)
        except DatasetError as exc:
            logger.debug("unreadable: %s", exc)
            bad.append(index)
    return bad
