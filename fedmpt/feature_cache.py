"""A disk cache of frozen image-encoder outputs, so that they are computed once instead of every round.

The image encoder of CLIP is frozen in FedMPT (reference section 1.1), so a dataset's global features
``(N, D)`` and patch features ``(N, M, D)`` depend only on the backbone, the images and the transform. The
cache stores them under ``sha256(key)`` where the key names those three things; the caller supplies the
fingerprints (:class:`FeatureKey`).

Storage: one ``<digest>.safetensors`` file (no pickle: loading cannot execute code) plus a ``<digest>.json``
sidecar holding the key parts, tensor shapes and dtypes, the file's sha256 and the creation time. Both are
written to a temporary file in the cache directory and moved into place with ``os.replace`` (atomic on POSIX),
the sidecar last, so an interrupted write leaves either the previous entry or an entry that fails
verification. On load the sidecar is checked against the key and the tensor file's sha256 is recomputed; any
mismatch (truncation, bit rot, a stale sidecar) is logged as a warning and the features are recomputed.

Threat model: protection against accidents (crashes, partial writes, disk corruption, a wrong key), not
against an attacker who can write to the cache directory and forge a matching sidecar. Concurrent writers of
the same key do not corrupt an entry (each writes its own temporary file) but may compute it twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from fedmpt.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "fedmpt-feature-cache"
CACHE_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20

FeaturePair = tuple[torch.Tensor, torch.Tensor]


class TensorName(StrEnum):
    """Names of the two tensors of a cache entry."""

    GLOBAL = "global"  # (N, D): the image embedding of each image
    PATCHES = "patches"  # (N, M, D): the projected patch tokens of each image


class SidecarField(StrEnum):
    """Keys of the JSON sidecar."""

    FORMAT = "format"
    VERSION = "version"
    KEY = "key"
    TENSORS = "tensors"
    SHA256 = "sha256"
    SIZE_BYTES = "size_bytes"
    CREATED_UTC = "created_utc"


@dataclass(frozen=True)
class FeatureKey:
    """What a cached feature set depends on; every part is a non-empty string chosen by the caller.

    ``model_id`` fingerprints the frozen backbone (architecture and weights hash), ``data_id`` the images
    (dataset, split, file list hash) and ``transform_id`` the preprocessing (resolution, normalisation). Two
    keys that differ in any part never share an entry.
    """

    model_id: str
    data_id: str
    transform_id: str

    def __post_init__(self) -> None:
        for name in ("model_id", "data_id", "transform_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"FeatureKey.{name} must be a non-empty string, got {value!r}")

    def parts(self) -> dict[str, str]:
        """The key as ``{"model_id": ..., "data_id": ..., "transform_id": ...}``."""
        return {"model_id": self.model_id, "data_id": self.data_id, "transform_id": self.transform_id}

    def digest(self) -> str:
        """sha256 (hex) of an unambiguous JSON encoding of the format version and the three parts.

        A JSON list (not string concatenation) keeps ("ab", "c") and ("a", "bc") apart.
        """
        encoded = json.dumps(
            [CACHE_FORMAT, CACHE_VERSION, self.model_id, self.data_id, self.transform_id], ensure_ascii=False
        )
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (best effort: not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _check_pair(value: object, source: str) -> FeaturePair:
    """Check that ``value`` is a (global, patches) pair of tensors; ``TypeError`` names what is wrong."""
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise TypeError(f"{source} must return a (global_features, patch_features) pair, got {type(value).__name__}")
    global_features, patch_features = value
    for name, tensor in ((TensorName.GLOBAL, global_features), (TensorName.PATCHES, patch_features)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{source}: {name} features must be a torch.Tensor, got {type(tensor).__name__}")
    return global_features, patch_features


class FeatureCache:
    """Cache of (global, patch) feature tensors in ``directory``, keyed by :class:`FeatureKey`.

    Counters ``hits``, ``misses`` and ``invalid`` (entries found but rejected by verification) let callers
    and tests see what happened.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"feature cache directory {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        self.directory = path
        self.hits = 0
        self.misses = 0
        self.invalid = 0

    def __repr__(self) -> str:
        return f"FeatureCache(directory={str(self.directory)!r})"

    def paths(self, key: FeatureKey) -> tuple[Path, Path]:
        """The tensor file and the JSON sidecar of ``key``."""
        digest = key.digest()
        return self.directory / f"{digest}.safetensors", self.directory / f"{digest}.json"

    def load(self, key: FeatureKey) -> FeaturePair | None:
        """The verified (global, patches) tensors of ``key`` on the CPU, or None on a miss.

        An entry that exists but fails verification is logged as a warning, counted in ``invalid`` and
        treated as a miss.
        """
        tensor_path, sidecar_path = self.paths(key)
        if not sidecar_path.exists():
            if tensor_path.exists():
                self._reject(key, tensor_path, "tensor file without sidecar (interrupted write)")
            return None
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            self._reject(key, sidecar_path, f"unreadable sidecar ({err})")
            return None
        problem = self._sidecar_problem(sidecar, key)
        if problem is not None:
            self._reject(key, sidecar_path, problem)
            return None
        if not tensor_path.exists():
            self._reject(key, tensor_path, "sidecar without tensor file")
            return None
        actual_sha = _file_sha256(tensor_path)
        if actual_sha != sidecar[SidecarField.SHA256]:
            self._reject(
                key,
                tensor_path,
                f"sha256 {actual_sha} differs from the recorded {sidecar[SidecarField.SHA256]}",
            )
            return None
        try:
            tensors = load_file(tensor_path)
        except (SafetensorError, OSError, RuntimeError) as err:
            self._reject(key, tensor_path, f"unreadable safetensors file ({err})")
            return None
        expected = sidecar[SidecarField.TENSORS]
        if set(tensors) != set(TensorName) or any(
            _describe(tensors[name]) != expected.get(name) for name in TensorName
        ):
            self._reject(key, tensor_path, "tensor names, shapes or dtypes differ from the sidecar")
            return None
        return tensors[TensorName.GLOBAL], tensors[TensorName.PATCHES]

    def store(self, key: FeatureKey, global_features: torch.Tensor, patch_features: torch.Tensor) -> FeaturePair:
        """Write the entry of ``key`` atomically; returns the tensors as stored (detached, CPU, contiguous).

        Order: remove any old sidecar, write the tensors to a temporary file, fsync, ``os.replace`` it into
        place, then the same for the new sidecar. A failure at any step deletes the temporary files and leaves
        no entry that passes verification.
        """
        global_features, patch_features = _check_pair((global_features, patch_features), "store")
        stored_global = global_features.detach().to("cpu").contiguous()
        stored_patches = patch_features.detach().to("cpu").contiguous()
        if stored_global.untyped_storage().data_ptr() == stored_patches.untyped_storage().data_ptr():
            stored_patches = stored_patches.clone()  # safetensors refuses tensors that share memory
        tensors = {TensorName.GLOBAL.value: stored_global, TensorName.PATCHES.value: stored_patches}
        tensor_path, sidecar_path = self.paths(key)
        sidecar_path.unlink(missing_ok=True)
        temporary: list[Path] = []
        try:
            tensor_tmp = self._temporary_path(tensor_path, temporary)
            save_file(tensors, tensor_tmp, metadata={"format": CACHE_FORMAT, **key.parts()})
            with tensor_tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
            sidecar = {
                SidecarField.FORMAT.value: CACHE_FORMAT,
                SidecarField.VERSION.value: CACHE_VERSION,
                SidecarField.KEY.value: key.parts(),
                SidecarField.TENSORS.value: {name: _describe(tensor) for name, tensor in tensors.items()},
                SidecarField.SHA256.value: _file_sha256(tensor_tmp),
                SidecarField.SIZE_BYTES.value: tensor_tmp.stat().st_size,
                SidecarField.CREATED_UTC.value: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            os.replace(tensor_tmp, tensor_path)
            sidecar_tmp = self._temporary_path(sidecar_path, temporary)
            with sidecar_tmp.open("w", encoding="utf-8") as handle:
                json.dump(sidecar, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(sidecar_tmp, sidecar_path)
        finally:
            for path in temporary:
                path.unlink(missing_ok=True)
        _fsync_directory(self.directory)
        logger.info(
            "feature cache: stored %s (global %s, patches %s)",
            tensor_path.name,
            tuple(stored_global.shape),
            tuple(stored_patches.shape),
        )
        return stored_global, stored_patches

    def get_or_compute(self, key: FeatureKey, compute: Callable[[], FeaturePair]) -> FeaturePair:
        """The cached features of ``key``, or ``compute()``'s result after storing it (both on the CPU).

        If ``compute`` raises, nothing is written and the exception propagates.
        """
        loaded = self.load(key)
        if loaded is not None:
            self.hits += 1
            logger.debug("feature cache hit: %s", key)
            return loaded
        self.misses += 1
        logger.info("feature cache miss: computing features for %s", key)
        global_features, patch_features = _check_pair(compute(), "compute")
        return self.store(key, global_features, patch_features)

    def _temporary_path(self, final: Path, registry: list[Path]) -> Path:
        fd, name = tempfile.mkstemp(dir=self.directory, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        path = Path(name)
        registry.append(path)
        return path

    def _sidecar_problem(self, sidecar: object, key: FeatureKey) -> str | None:
        if not isinstance(sidecar, dict):
            return "sidecar is not a JSON object"
        if sidecar.get(SidecarField.FORMAT) != CACHE_FORMAT or sidecar.get(SidecarField.VERSION) != CACHE_VERSION:
            return (
                f"sidecar format {sidecar.get(SidecarField.FORMAT)!r} version "
                f"{sidecar.get(SidecarField.VERSION)!r}, expected {CACHE_FORMAT!r} version {CACHE_VERSION}"
            )
        if sidecar.get(SidecarField.KEY) != key.parts():
            return f"sidecar key {sidecar.get(SidecarField.KEY)!r} differs from the requested key"
        if not isinstance(sidecar.get(SidecarField.SHA256), str) or not isinstance(
            sidecar.get(SidecarField.TENSORS), dict
        ):
            return "sidecar lacks the sha256 or tensors field"
        return None

    def _reject(self, key: FeatureKey, path: Path, reason: str) -> None:
        self.invalid += 1
        logger.warning("feature cache: discarding entry %s for %s: %s; recomputing", path.name, key, reason)


class _ImageDataset(Protocol):
    """A map-style dataset whose items are ``(image_tensor, label)`` pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def _stack_images(items: Sequence[Any]) -> torch.Tensor:
    """Collate only the images of ``(image, label)`` items into a ``(B, ...)`` batch."""
    images = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) >= 1 and isinstance(item[0], torch.Tensor)):
            raise DatasetError(f"dataset items must be (image_tensor, label) pairs, got {type(item).__name__}")
        images.append(item[0])
    try:
        return torch.stack(images)
    except RuntimeError as err:
        shapes = sorted({tuple(image.shape) for image in images})
        raise DatasetError(f"dataset images in one batch have different shapes {shapes}") from err


def encode_dataset(
    encode_batch: Callable[[torch.Tensor], FeaturePair],
    dataset: _ImageDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
) -> FeaturePair:
    """Run a frozen encoder over every image of ``dataset`` in order; returns CPU tensors (N, D), (N, M, D).

    ``encode_batch(images)`` receives a CPU batch ``(B, C, H, W)`` (it moves it to its device itself) and
    returns ``(global (B, D), patches (B, M, D))``. Runs under ``torch.inference_mode()``; the outputs are
    copied into buffers allocated outside it, so they are ordinary tensors that later trainable code may use
    in autograd. Images are loaded by a ``DataLoader`` without shuffling (``num_workers`` processes).

    Raises:
        ConfigError: ``batch_size`` < 1 or ``num_workers`` < 0.
        DatasetError: an empty dataset or an item that is not an ``(image_tensor, label)`` pair.
        ValueError: ``encode_batch`` returns tensors whose shapes do not match the batch or each other.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    n_images = len(dataset)
    if n_images == 0:
        raise DatasetError("encode_dataset: the dataset is empty")
    loader: DataLoader[Any] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_stack_images,
    )
    global_out: torch.Tensor | None = None
    patches_out: torch.Tensor | None = None
    start = 0
    with torch.inference_mode():
        for images in loader:
            batch = images.shape[0]
            global_features, patch_features = _check_pair(encode_batch(images), "encode_batch")
            if global_features.ndim != 2 or global_features.shape[0] != batch:
                raise ValueError(
                    f"encode_batch global features must be (B={batch}, D), got {tuple(global_features.shape)}"
                )
            if patch_features.ndim != 3 or patch_features.shape[0] != batch:
                raise ValueError(
                    f"encode_batch patch features must be (B={batch}, M, D), got {tuple(patch_features.shape)}"
                )
            if global_out is None or patches_out is None:
                with torch.inference_mode(False):
                    global_out = torch.empty((n_images, *global_features.shape[1:]), dtype=global_features.dtype)
                    patches_out = torch.empty((n_images, *patch_features.shape[1:]), dtype=patch_features.dtype)
            if global_features.shape[1:] != global_out.shape[1:] or patch_features.shape[1:] != patches_out.shape[1:]:
                raise ValueError(
                    f"encode_batch output shapes changed at image {start}: "
                    f"global {tuple(global_features.shape)}, patches {tuple(patch_features.shape)} "
                    f"after {tuple(global_out.shape[1:])}, {tuple(patches_out.shape[1:])}"
                )
            global_out[start : start + batch].copy_(global_features)
            patches_out[start : start + batch].copy_(patch_features)
            start += batch
    if global_out is None or patches_out is None or start != n_images:
        raise DatasetError(f"encode_dataset: the loader yielded {start} images but len(dataset) is {n_images}")
    return global_out, patches_out
