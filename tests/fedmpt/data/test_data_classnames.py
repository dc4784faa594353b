"""Checks of the canonical class lists against counts and positions taken from the official files."""

import pytest

from fedmpt.data.classnames import (
    BIGEARTHNET19_CLASSES,
    BIGEARTHNET43_CLASSES,
    BUILTIN_CLASSNAMES,
    CHESTXRAY14_CLASSES,
    COCO_CLASSES,
    MLRSNET_CLASSES,
    NUSWIDE_CLASSES,
    VOC2007_CLASSES,
)


@pytest.mark.parametrize(
    ("classes", "count"),
    [
        (VOC2007_CLASSES, 20),
        (COCO_CLASSES, 80),
        (NUSWIDE_CLASSES, 81),
        (CHESTXRAY14_CLASSES, 14),
        (BIGEARTHNET19_CLASSES, 19),
        (BIGEARTHNET43_CLASSES, 43),
        (MLRSNET_CLASSES, 60),
    ],
)
def test_counts_and_uniqueness(classes: tuple[str, ...], count: int) -> None:
    assert len(classes) == count
    assert len(set(classes)) == count


def test_known_positions() -> None:
    # Positions read off the official lists (devkit, COCO category ids, Concepts81.txt, label CSV headers).
    assert (VOC2007_CLASSES[0], VOC2007_CLASSES[10], VOC2007_CLASSES[19]) == (
        "aeroplane",
        "diningtable",
        "tvmonitor",
    )
    assert (COCO_CLASSES[0], COCO_CLASSES[9], COCO_CLASSES[79]) == ("person", "traffic light", "toothbrush")
    assert (NUSWIDE_CLASSES[0], NUSWIDE_CLASSES[62], NUSWIDE_CLASSES[80]) == ("airport", "sunset", "zebra")
    assert CHESTXRAY14_CLASSES[12] == "Pleural_Thickening"
    assert "No Finding" not in CHESTXRAY14_CLASSES
    assert (MLRSNET_CLASSES[0], MLRSNET_CLASSES[25], MLRSNET_CLASSES[59]) == (
        "airplane",
        "habor",
        "wind turbine",
    )
    assert BIGEARTHNET43_CLASSES[0] == "Continuous urban fabric"
    assert BIGEARTHNET19_CLASSES[-1] == "Marine waters"


def test_alphabetical_lists_are_sorted() -> None:
    # VOC and NUS-WIDE publish their lists alphabetically.
    assert list(VOC2007_CLASSES) == sorted(VOC2007_CLASSES)
    assert list(NUSWIDE_CLASSES) == sorted(NUSWIDE_CLASSES)


def test_bigearthnet_lists_match_bigearthnet_common() -> None:
    constants = pytest.importorskip("bigearthnet_common.constants")
    assert tuple(constants.OLD_LABELS_ORIGINAL_ORDER) == BIGEARTHNET43_CLASSES
    assert tuple(constants.NEW_LABELS_ORIGINAL_ORDER) == BIGEARTHNET19_CLASSES


def test_builtin_registry_keys() -> None:
    assert set(BUILTIN_CLASSNAMES) == {
        "voc2007",
        "coco2014",
        "nuswide",
        "chestxray14",
        "bigearthnet",
        "mlrsnet",
    }
    assert BUILTIN_CLASSNAMES["coco2014"] is COCO_CLASSES
