"""Checks of a dataset's on-disk layout shared by the loaders: files, folders, split names, list files.

Every failure is a :class:`~fedmpt.errors.DatasetError` (missing or malformed file, naming the path) or a
:class:`~fedmpt.errors.ConfigError` (bad argument, naming the accepted values).
"""

from collections.abc import Collection
from pathlib import Path

from fedmpt.errors import ConfigError, DatasetError

__all__ = ["read_lines", "require_dir", "require_file", "require_split"]


def require_split(dataset: str, split: str, allowed: Collection[str]) -> None:
    """Raise :class:`ConfigError` unless ``split`` is one of ``allowed``."""
    if split not in allowed:
        raise ConfigError(f"dataset {dataset!r} has no split {split!r}; choose one of {sorted(allowed)}")


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing file, else raise :class:`DatasetError` naming ``what``."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is an existing folder, else raise :class:`DatasetError` naming ``what``."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def read_lines(path: Path, what: str) -> list[str]:
    """Return the non-blank lines of the UTF-8 text file ``path``, stripped (a BOM is dropped).

    Raises:
        DatasetError: the file is missing or is not UTF-8 text.
    """
    require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]
