"""Tests of the conditions file: validation, JSON round trip, hash, class-list checks, packaged defaults."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.conditions import file as cfile
from fedmpt.conditions.defaults_build import DEFAULT_CONDITIONS, write_all_defaults, write_default
from fedmpt.conditions.file import (
    ConditionSet,
    ProvenanceSource,
    builtin_condition_names,
    load_conditions,
    save_conditions,
    validate_conditions,
)
from fedmpt.errors import ConditionsError

PROV = {"source": "llm", "created": "2026-11-21T20:00:00+00:00", "model": "m"}


def _cset(**kw: Any) -> ConditionSet:
    args: dict[str, Any] = {
        "conditions": ("spatial layout", "object pose"),
        "classnames": ("cat", "chair", "dog"),
        "dataset": "toy",
        "provenance": PROV,
    }
    args.update(kw)
    return ConditionSet(**args)


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_round_trip_and_documented_json_fields(tmp_path: Path) -> None:
    cset = _cset()
    path = save_conditions(cset, tmp_path / "c.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    # Independent hash of the canonical JSON text of the class list.
    expected_hash = hashlib.sha256(b'["cat","chair","dog"]').hexdigest()
    assert data == {
        "format": "fedmpt-conditions",
        "version": 1,
        "conditions": ["spatial layout", "object pose"],
        "classnames": ["cat", "chair", "dog"],
        "classnames_sha256": expected_hash,
        "dataset": "toy",
        "provenance": PROV,
    }
    loaded = load_conditions(path, classnames=["cat", "chair", "dog"])
    assert loaded == cset
    assert loaded.source is ProvenanceSource.LLM
    assert not list(tmp_path.glob(".c.json.*"))  # no temp file left behind


def test_provenance_is_read_only_copy() -> None:
    prov = dict(PROV)
    cset = _cset(provenance=prov)
    prov["model"] = "changed"
    assert cset.provenance["model"] == "m"
    with pytest.raises(TypeError):
        cset.provenance["model"] = "x"  # type: ignore[index]


def test_copy_and_pickle_round_trip() -> None:
    import copy
    import pickle

    cset = _cset()
    # Our own object, pickled and unpickled locally: the case of handing it to a local worker process.
    clone = pickle.loads(pickle.dumps(cset))
    assert clone == cset and clone.provenance["model"] == "m"
    assert copy.deepcopy(cset) == cset


def test_whitespace_is_normalised() -> None:
    assert validate_conditions(["  spatial   layout ", "pose"]) == ("spatial layout", "pose")


@pytest.mark.parametrize(
    ("conditions", "fragment"),
    [
        ([], "empty"),
        (["pose", "  "], "#1 is empty"),
        (["Pose", "pose"], "duplicates condition #0"),
        (["one two three four five six"], "6 words"),
        (["x" * 41], "41 characters"),
        (["pose\nlight"], "control characters"),
        (["pose", 3], "not a string"),
    ],
)
def test_bad_conditions_are_rejected(conditions: list[Any], fragment: str) -> None:
    with pytest.raises(ConditionsError, match=fragment):
        validate_conditions(conditions, where="here")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(categories=("L", "N"), max_codepoint=0x2FF), min_size=1, max_size=8),
        min_size=1,
        max_size=6,
    )
)
def test_validate_accepts_exactly_the_valid_lists(words: list[str]) -> None:
    """Property: validation succeeds iff the casefolded items are distinct (all are short one-word items)."""
    distinct = len({w.casefold() for w in words}) == len(words)
    if distinct:
        assert validate_conditions(words) == tuple(words)
    else:
        with pytest.raises(ConditionsError, match="duplicates"):
            validate_conditions(words)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(format="other"), "format is 'other'"),
        (lambda d: d.update(version=2), "version is 2"),
        (lambda d: d.update(version=True), "version is True"),
        (lambda d: d.update(extra=1), "unknown top-level keys \\['extra'\\]"),
        (lambda d: d.pop("dataset"), "missing keys \\['dataset'\\]"),
        (lambda d: d.update(conditions="pose"), "conditions is str"),
        (lambda d: d.update(conditions=["pose", "POSE"]), "duplicates"),
        (lambda d: d.update(classnames_sha256="0" * 64), "classnames_sha256 is"),
        (lambda d: d["classnames"].append("zebra"), "classnames_sha256 is"),
        (lambda d: d.update(classnames=["cat", "cat"]), "appears more than once"),
        (lambda d: d["provenance"].update(source="web"), "provenance.source is 'web'"),
        (lambda d: d["provenance"].update(created="yesterday"), "not an ISO 8601"),
        (lambda d: d["provenance"].pop("created"), "provenance.created is None"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path: Path, mutate: Any, fragment: str) -> None:
    data = _cset().to_json_dict()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConditionsError, match=fragment) as info:
        load_conditions(path)
    assert str(path) in str(info.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConditionsError, match="not valid JSON"):
        load_conditions(bad)
    with pytest.raises(ConditionsError, match="no such file.*not a built-in name"):
        load_conditions("no_such_dataset")


def test_class_list_mismatch_says_which_names(tmp_path: Path) -> None:
    path = save_conditions(_cset(), tmp_path / "c.json")
    with pytest.raises(ConditionsError, match=r"missing from the file: \['bird'\].*not expected: \['dog'\]"):
        load_conditions(path, classnames=["cat", "chair", "bird"])
    with pytest.raises(ConditionsError, match="position 1 is 'chair' in the file but 'dog' expected"):
        load_conditions(path, classnames=["cat", "dog", "chair"])
    with pytest.raises(ConditionsError, match="not expected: \\['dog'\\]"):
        load_conditions(path, classnames=["cat", "chair"])


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_conditions(_cset(), tmp_path / "c.json")
    before = path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cfile.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_conditions(_cset(conditions=("background",)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_save_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConditionsError, match="does not exist"):
        save_conditions(_cset(), tmp_path / "nope" / "c.json")


def test_builtin_defaults_match_classnames_and_are_marked() -> None:
    from fedmpt.data.classnames import BUILTIN_CLASSNAMES

    assert set(DEFAULT_CONDITIONS) <= set(builtin_condition_names())
    for name, conditions in DEFAULT_CONDITIONS.items():
        cset = load_conditions(name, classnames=BUILTIN_CLASSNAMES[name])
        assert cset.conditions == conditions
        assert cset.dataset == name
        assert cset.source is ProvenanceSource.OFFLINE_DEFAULT
        assert "not produced by an LLM" in cset.provenance["note"]
    assert load_conditions("voc2007").conditions == (
        "spatial layout",
        "object pose",
        "background",
        "lighting",
        "object scale",
    )


def test_packaged_defaults_are_up_to_date(tmp_path: Path) -> None:
    """Rebuilding into a temp folder reproduces the packaged files' content (apart from the timestamp)."""
    write_all_defaults(tmp_path)
    for name in DEFAULT_CONDITIONS:
        fresh = load_conditions(tmp_path / f"{name}.json")
        packaged = load_conditions(name)
        assert fresh.to_json_dict() | {"provenance": None} == packaged.to_json_dict() | {"provenance": None}


def test_write_default_keeps_timestamp_on_rerun(tmp_path: Path) -> None:
    first = write_default(
        "synthetic", ["a", "b"], ["shape", "colour"], note="hand-picked", directory=tmp_path
    )
    text = first.read_text(encoding="utf-8")
    second = write_default(
        "synthetic", ["a", "b"], ["shape", "colour"], note="hand-picked", directory=tmp_path
    )
    assert second.read_text(encoding="utf-8") == text
    with pytest.raises(ConditionsError, match="cannot name a defaults file"):
        write_default("../x", ["a"], ["shape"], note="n", directory=tmp_path)
