"""Tests of the synthetic world: determinism, the causal structure, spurious pairs, rendering, captions."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.errors import ConfigError
from fedmpt.world import (
    ALL_CLASSES,
    CONDITION_FACTORS,
    TASK_CLASSES,
    FederatedWorldConfig,
    SceneDistribution,
    WorldDataset,
    make_federated_world,
    pretraining_distribution,
)
from fedmpt.world.captions import caption, scene_facts
from fedmpt.world.factors import BACKGROUND, BACKGROUND_GROUPS
from fedmpt.world.glyphs import GLYPHS, glyph_mask
from fedmpt.world.render import render_scene


def _cooccurrence(labels: np.ndarray, a: int, b: int) -> float:
    """P(b present | a present), estimated from a label matrix."""
    has_a = labels[:, a] == 1
    return float((labels[has_a, b] == 1).mean())


def test_dataset_is_deterministic_and_order_independent() -> None:
    d1 = WorldDataset(pretraining_distribution(), 20, seed=3, stream=(7,))
    d2 = WorldDataset(pretraining_distribution(), 20, seed=3, stream=(7,))
    img_late = d2.image(13).copy()  # render row 13 first in one copy, last in the other
    np.testing.assert_array_equal(d1.images()[13], img_late)
    np.testing.assert_array_equal(d1.labels, d2.labels)
    assert d1.fingerprint() == d2.fingerprint()
    d3 = WorldDataset(pretraining_distribution(), 20, seed=4, stream=(7,))
    assert not np.array_equal(d1.labels, d3.labels) or not np.array_equal(d1.images(), d3.images())
    assert d1.fingerprint() != d3.fingerprint()


def test_labels_match_scenes_and_object_counts() -> None:
    dist = SceneDistribution(min_objects=1, max_objects=4)
    data = WorldDataset(dist, 300, seed=0)
    counts = data.labels.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 4
    for scene, row in zip(data.scenes, data.labels, strict=True):
        assert {TASK_CLASSES[i] for i in np.flatnonzero(row)} == set(scene.classes)


def test_oracle_background_drives_cooccurrence() -> None:
    # With context_strength s, an object on a "striped" background is from the striped group with probability
    # s + (1 - s) * 3/12; on a plain background the group has no pull.
    dist = SceneDistribution(context_strength=0.8, min_objects=1, max_objects=1)
    data = WorldDataset(dist, 3000, seed=1)
    bg = data.conditions[:, CONDITION_FACTORS.index(BACKGROUND)]
    group = [TASK_CLASSES.index(c) for c in BACKGROUND_GROUPS["striped"]]
    striped = bg == BACKGROUND.values.index("striped")
    frac = data.labels[striped][:, group].sum() / striped.sum()
    expected = 0.8 + 0.2 * 3 / 12
    assert abs(frac - expected) < 4 * np.sqrt(expected * (1 - expected) / striped.sum())


def test_client_spurious_pairs_are_far_more_frequent_than_oracle_and_broken_in_decorrelated_split() -> None:
    world = make_federated_world(
        FederatedWorldConfig(num_clients=3, train_per_client=1500, global_test_size=1500)
    )
    oracle = world.test_in_distribution.labels
    broken = world.test_decorrelated.labels
    for client in world.clients:
        ((a, b),) = client.spurious_pairs
        ia, ib = TASK_CLASSES.index(a), TASK_CLASSES.index(b)
        local = _cooccurrence(client.train.labels, ia, ib)
        assert local > 0.85  # spurious_strength 0.9 (minus rare replacement losses)
        assert _cooccurrence(oracle, ia, ib) < 0.4
        assert ((broken[:, ia] == 1) & (broken[:, ib] == 1)).sum() == 0
        assert (broken[:, ia] == 1).sum() > 50 and (broken[:, ib] == 1).sum() > 50


def test_pretraining_world_is_broader_and_has_no_pair_structure() -> None:
    data = WorldDataset(pretraining_distribution(), 4000, seed=2)
    assert data.classnames == ALL_CLASSES and len(ALL_CLASSES) > len(TASK_CLASSES)
    freq = data.labels.mean(axis=0)
    # Independent uniform draws: P(b | a) is close to the marginal of b for every pair (no client pairing).
    for a in range(len(ALL_CLASSES)):
        for b in range(len(ALL_CLASSES)):
            if a != b:
                assert abs(_cooccurrence(data.labels, a, b) - freq[b]) < 0.09


@given(st.sampled_from(sorted(GLYPHS)), st.sampled_from([0.0, 30.0, -90.0, 180.0]), st.integers(4, 24))
@settings(max_examples=40, deadline=None)
def test_glyph_masks_are_valid_alpha(name: str, rotation: float, size: int) -> None:
    mask = glyph_mask(name, rotation, size)
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert 0.05 * size * size < mask.sum() < 0.95 * size * size


def test_rotation_180_flips_the_mask() -> None:
    upright = glyph_mask("arrow", 0.0, 16)
    flipped = glyph_mask("arrow", 180.0, 16)
    np.testing.assert_allclose(flipped, upright[::-1, ::-1], atol=1e-6)


def test_render_coverage_locates_objects() -> None:
    data = WorldDataset(SceneDistribution(min_objects=2, max_objects=2), 10, seed=5)
    for i in range(10):
        cover = data.patch_coverage(i)  # (C, G, G)
        present = set(np.flatnonzero(cover.sum(axis=(1, 2)) > 0))
        assert present == set(np.flatnonzero(data.labels[i]))


def test_captions_only_claim_true_facts_and_vary() -> None:
    data = WorldDataset(pretraining_distribution(), 200, seed=6)
    texts = set()
    for i, scene in enumerate(data.scenes):
        cap = caption(scene, np.random.default_rng(i))
        assert cap.claims and cap.claims <= scene_facts(scene)
        texts.add(cap.text)
    assert len(texts) > 180


def test_generator_throughput_is_thousands_per_second() -> None:
    data = WorldDataset(pretraining_distribution(), 1000, seed=8)
    start = time.perf_counter()
    data.images()
    rate = len(data) / (time.perf_counter() - start)
    assert rate > 150, f"{rate:.0f} images/s"  # ~2000/s on an idle core (experiments/bench_world.py); loose floor


def test_bad_knobs_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="context_strength"):
        SceneDistribution(context_strength=1.5)
    with pytest.raises(ConfigError, match="unknown world classes"):
        SceneDistribution(classes=("unicorn",))
    with pytest.raises(ConfigError, match="background_probs"):
        SceneDistribution(background_probs=(1.0,))
    with pytest.raises(ConfigError, match="num_clients"):
        FederatedWorldConfig(num_clients=0)
    with pytest.raises(ConfigError, match="pair"):
        SceneDistribution(spurious_pairs=(("star", "star"),), spurious_strength=0.5)


def test_render_rejects_nothing_for_every_condition_value() -> None:
    from fedmpt.world.scene import Scene

    rng = np.random.default_rng(0)
    for f, factor in enumerate(CONDITION_FACTORS):
        for v in range(len(factor.values)):
            cond = [0] * len(CONDITION_FACTORS)
            cond[f] = v
            scene = Scene(("star", "tree", "heart", "house"), ("red", "blue", "magenta", "violet"), tuple(cond))
            out = render_scene(scene, rng)
            assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8


def test_synthetic_world_is_a_load_dataset_dataset() -> None:
    from fedmpt.data import DATASETS, load_dataset

    assert "synthetic" in DATASETS
    data = load_dataset("synthetic", ".", "client1-train", num_clients=2, train_per_client=12, seed=4)
    direct = make_federated_world(FederatedWorldConfig(num_clients=2, train_per_client=12, seed=4)).clients[1].train
    np.testing.assert_array_equal(data.labels, direct.labels)
    image, row = data[3]
    np.testing.assert_array_equal(np.asarray(image), direct.image(3))
    with pytest.raises(ConfigError, match="unknown synthetic split"):
        load_dataset("synthetic", ".", "client9-train", num_clients=2)
    with pytest.raises(ConfigError, match="bad synthetic world option"):
        load_dataset("synthetic", ".", "test-iid", colour_count=3)
