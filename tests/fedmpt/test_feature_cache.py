"""Tests of fedmpt.feature_cache: hits, misses, key separation, corruption recovery, atomicity, encoding."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fedmpt.feature_cache as feature_cache
from fedmpt.errors import ConfigError, DatasetError
from fedmpt.feature_cache import FeatureCache, FeatureKey, encode_dataset

KEY = FeatureKey(model_id="vit-b16:abc123", data_id="coco2014/train:f00d", transform_id="224/clip-norm")


class CountingCompute:
    """A compute callable that returns fixed random features and counts its calls."""

    def __init__(self, seed: int = 0, n: int = 5, m: int = 4, d: int = 3, dtype: torch.dtype = torch.float32):
        generator = torch.Generator().manual_seed(seed)
        self.global_features = torch.randn(n, d, generator=generator).to(dtype)
        self.patch_features = torch.randn(n, m, d, generator=generator).to(dtype)
        self.calls = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.global_features, self.patch_features


def leftover_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------------------------------- hit / miss


def test_miss_then_hit(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    compute = CountingCompute()
    first = cache.get_or_compute(KEY, compute)
    second = cache.get_or_compute(KEY, compute)
    assert compute.calls == 1
    assert (cache.hits, cache.misses, cache.invalid) == (1, 1, 0)
    for got in (first, second):
        torch.testing.assert_close(got[0], compute.global_features, rtol=0, atol=0)
        torch.testing.assert_close(got[1], compute.patch_features, rtol=0, atol=0)
    # A fresh cache object on the same directory (a new process) hits too.
    again = FeatureCache(tmp_path / "cache")
    again.get_or_compute(KEY, compute)
    assert compute.calls == 1 and again.hits == 1


def test_sidecar_records_key_shapes_dtypes_hash_and_time(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(KEY, CountingCompute(n=6, m=7, d=2, dtype=torch.float16))
    tensor_path, sidecar_path = cache.paths(KEY)
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["key"] == {
        "model_id": KEY.model_id,
        "data_id": KEY.data_id,
        "transform_id": KEY.transform_id,
    }
    assert sidecar["tensors"] == {
        "global": {"shape": [6, 2], "dtype": "float16"},
        "patches": {"shape": [6, 7, 2], "dtype": "float16"},
    }
    assert sidecar["sha256"] == hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    assert sidecar["size_bytes"] == tensor_path.stat().st_size
    created = dt.datetime.fromisoformat(sidecar["created_utc"])
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 300
    assert leftover_files(tmp_path) == sorted([tensor_path.name, sidecar_path.name])


def test_dtypes_survive_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        key = FeatureKey("m", "d", str(dtype))
        compute = CountingCompute(dtype=dtype)
        cache.get_or_compute(key, compute)
        loaded = cache.load(key)
        assert loaded is not None
        assert loaded[0].dtype == dtype and loaded[1].dtype == dtype
        torch.testing.assert_close(loaded[1], compute.patch_features, rtol=0, atol=0)


def test_views_of_one_tensor_are_stored(tmp_path: Path) -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (N, 1 + M, D)
    cache = FeatureCache(tmp_path)
    stored = cache.get_or_compute(KEY, lambda: (tokens[:, 0], tokens[:, 1:]))
    loaded = cache.load(KEY)
    assert loaded is not None
    torch.testing.assert_close(loaded[0], tokens[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(loaded[1], tokens[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(stored[1], tokens[:, 1:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- keys


def test_keys_differing_in_any_part_are_separate(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    keys = [
        KEY,
        FeatureKey("vit-b16:other", KEY.data_id, KEY.transform_id),
        FeatureKey(KEY.model_id, "coco2014/val:f00d", KEY.transform_id),
        FeatureKey(KEY.model_id, KEY.data_id, "336/clip-norm"),
    ]
    computes = [CountingCompute(seed=i) for i in range(len(keys))]
    for key, compute in zip(keys, computes, strict=True):
        cache.get_or_compute(key, compute)
    assert len({cache.paths(key)[0] for key in keys}) == len(keys)
    for key, compute in zip(keys, computes, strict=True):
        loaded = cache.get_or_compute(key, compute)
        torch.testing.assert_close(loaded[0], compute.global_features, rtol=0, atol=0)
        assert compute.calls == 1


def test_digest_is_unambiguous_and_pinned() -> None:
    assert FeatureKey("ab", "c", "t").digest() != FeatureKey("a", "bc", "t").digest()
    expected = hashlib.sha256(json.dumps(["fedmpt-feature-cache", 1, "ab", "c", "t"]).encode()).hexdigest()
    assert FeatureKey("ab", "c", "t").digest() == expected


@pytest.mark.parametrize("parts", [("", "d", "t"), ("m", "", "t"), ("m", "d", 3)])
def test_key_parts_must_be_non_empty_strings(parts: tuple[Any, Any, Any]) -> None:
    with pytest.raises(ConfigError, match="FeatureKey"):
        FeatureKey(*parts)


def test_directory_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        FeatureCache(path)


# ------------------------------------------------------------------------------------------- corruption


def corrupt_truncate(cache: FeatureCache) -> None:
    tensor_path = cache.paths(KEY)[0]
    tensor_path.write_bytes(tensor_path.read_bytes()[:-17])


def corrupt_flip_byte(cache: FeatureCache) -> None:
    tensor_path = cache.paths(KEY)[0]
    data = bytearray(tensor_path.read_bytes())
    data[-5] ^= 0x40  # inside the tensor payload: the file still parses, only the hash can tell
    tensor_path.write_bytes(bytes(data))


def corrupt_sidecar_garbage(cache: FeatureCache) -> None:
    cache.paths(KEY)[1].write_text("{not json")


def corrupt_sidecar_missing(cache: FeatureCache) -> None:
    cache.paths(KEY)[1].unlink()


def corrupt_sidecar_other_key(cache: FeatureCache) -> None:
    other = FeatureKey("x", "y", "z")
    cache.get_or_compute(other, CountingCompute(seed=9))
    for source, target in zip(cache.paths(other), cache.paths(KEY), strict=True):
        target.write_bytes(source.read_bytes())


def corrupt_tensor_missing(cache: FeatureCache) -> None:
    cache.paths(KEY)[0].unlink()


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncate,
        corrupt_flip_byte,
        corrupt_sidecar_garbage,
        corrupt_sidecar_missing,
        corrupt_sidecar_other_key,
        corrupt_tensor_missing,
    ],
)
def test_corrupted_entry_is_logged_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: Any
) -> None:
    cache = FeatureCache(tmp_path)
    compute = CountingCompute()
    cache.get_or_compute(KEY, compute)
    corrupt(cache)
    with caplog.at_level("WARNING", logger="fedmpt.feature_cache"):
        recomputed = cache.get_or_compute(KEY, compute)
    assert compute.calls == 2
    assert cache.invalid == 1
    assert "discarding entry" in caplog.text
    torch.testing.assert_close(recomputed[1], compute.patch_features, rtol=0, atol=0)
    # The entry is repaired: the next request is a hit.
    cache.get_or_compute(KEY, compute)
    assert compute.calls == 2


# ------------------------------------------------------------------------------------------- atomicity


def test_failing_compute_writes_nothing(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)

    def failing() -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        cache.get_or_compute(KEY, failing)
    assert leftover_files(tmp_path) == []


def test_compute_returning_wrong_type_writes_nothing(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    with pytest.raises(TypeError, match="patches features must be a torch.Tensor"):
        cache.get_or_compute(KEY, lambda: (torch.zeros(2, 3), [1, 2]))  # type: ignore[arg-type, return-value]
    assert leftover_files(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(KEY, CountingCompute(seed=1))

    def half_written_save(tensors: dict[str, torch.Tensor], filename: Path, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\x00" * 100)  # a partial file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(feature_cache, "save_file", half_written_save)
    with pytest.raises(OSError, match="No space left"):
        cache.store(KEY, *CountingCompute(seed=2)())
    assert not any(name.endswith(".tmp") for name in leftover_files(tmp_path))
    # No entry passes verification after the failed overwrite (the old sidecar was withdrawn first).
    assert cache.load(KEY) is None
    monkeypatch.undo()
    compute = CountingCompute(seed=2)
    torch.testing.assert_close(cache.get_or_compute(KEY, compute)[0], compute.global_features, rtol=0, atol=0)


def test_failure_before_sidecar_rename_leaves_no_valid_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path)
    real_replace = feature_cache.os.replace

    def replace_then_fail_on_sidecar(source: Any, target: Any) -> None:
        if str(target).endswith(".json"):
            raise OSError("crash before the sidecar lands")
        real_replace(source, target)

    monkeypatch.setattr(feature_cache.os, "replace", replace_then_fail_on_sidecar)
    with pytest.raises(OSError, match="crash"):
        cache.get_or_compute(KEY, CountingCompute())
    monkeypatch.undo()
    assert not any(name.endswith(".tmp") for name in leftover_files(tmp_path))
    assert cache.load(KEY) is None  # tensor file without sidecar: rejected


# ------------------------------------------------------------------------------------------- encode_dataset


class ToyDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index % 3


def toy_encoder(projection: torch.Tensor, seen_inference_mode: list[bool]) -> Any:
    """Patches = 2x2 pooled pixels projected to D; global = mean of patches."""

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen_inference_mode.append(torch.is_inference_mode_enabled())
        pooled = torch.nn.functional.avg_pool2d(images, 2)  # (B, C, H/2, W/2)
        patches = pooled.flatten(2).transpose(1, 2) @ projection  # (B, M, D)
        return patches.mean(dim=1), patches

    return encode


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
def test_encode_dataset_matches_whole_batch(batch_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 4, 4, generator=generator)
    projection = torch.randn(3, 5, generator=generator)
    seen: list[bool] = []
    global_features, patch_features = encode_dataset(
        toy_encoder(projection, seen), ToyDataset(images), batch_size
    )
    expected_patches = torch.nn.functional.avg_pool2d(images, 2).flatten(2).transpose(1, 2) @ projection
    torch.testing.assert_close(patch_features, expected_patches)
    torch.testing.assert_close(global_features, expected_patches.mean(dim=1))
    assert seen and all(seen)
    assert len(seen) == -(-7 // batch_size)
    # Ordinary tensors: usable by trainable code downstream.
    assert not global_features.is_inference()
    weight = torch.ones(5, requires_grad=True)
    (patch_features @ weight).sum().backward()
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, patch_features.sum(dim=(0, 1)))


def test_encode_dataset_feeds_the_cache(tmp_path: Path) -> None:
    images = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    encoder = toy_encoder(torch.eye(3), [])
    cache = FeatureCache(tmp_path)
    computed = cache.get_or_compute(KEY, lambda: encode_dataset(encoder, ToyDataset(images), 2))
    loaded = cache.get_or_compute(KEY, lambda: pytest.fail("must be a hit"))
    torch.testing.assert_close(loaded[1], computed[1], rtol=0, atol=0)


def test_encode_dataset_rejects_bad_input() -> None:
    images = torch.zeros(3, 3, 4, 4)
    encoder = toy_encoder(torch.eye(3), [])
    with pytest.raises(ConfigError, match="batch_size"):
        encode_dataset(encoder, ToyDataset(images), 0)
    with pytest.raises(DatasetError, match="empty"):
        encode_dataset(encoder, ToyDataset(images[:0]), 2)
    with pytest.raises(DatasetError, match="pairs"):
        encode_dataset(encoder, [1, 2, 3], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"global features must be \(B=2, D\)"):
        encode_dataset(lambda x: (x.flatten(1)[:1], x.flatten(2)), ToyDataset(images), 2)
