"""Tests of ``fedmpt conditions`` (list, show, derive) and of the defaults builder's command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedmpt.cli import main
from fedmpt.conditions import defaults_build
from fedmpt.conditions.file import builtin_condition_names, load_conditions
from fedmpt.data.classnames import BUILTIN_CLASSNAMES

from .llm_stub_server import StubLLM

KEY = "sk-cli-secret-456"
CLASSES = ["cat", "chair", "dog", "sofa"]


def _derive_args(stub: StubLLM, classes: Path, output: Path, *extra: str) -> list[str]:
    return [
        "conditions",
        "derive",
        "--classes",
        str(classes),
        "--dataset",
        "toy",
        "--n",
        "5",
        "--endpoint",
        stub.url + "/v1",
        "--model",
        "stub-model",
        "--output",
        str(output),
        "--budget",
        "4",
        "--backoff",
        "0",
        "--max-backoff",
        "0",
        "--timeout",
        "2",
        *extra,
    ]


def test_list_prints_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conditions", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(builtin_condition_names())
    for line, name in zip(lines, builtin_condition_names(), strict=True):
        assert line == f"{name}: {', '.join(load_conditions(name).conditions)}  [offline-default]"


def test_show_checks_class_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conditions", "show", "coco2014", "--dataset", "coco2014"]) == 0
    out = capsys.readouterr().out
    assert "classes: 80" in out and "0: spatial layout" in out
    assert main(["conditions", "show", "voc2007", "--dataset", "coco2014"]) == 2
    assert "made for another class list" in capsys.readouterr().err


def test_derive_end_to_end_and_resume(
    llm_stub: StubLLM,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FEDMPT_TEST_KEY", KEY)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    output = tmp_path / "conditions.json"
    args = _derive_args(llm_stub, classes, output, "--api-key-env", "FEDMPT_TEST_KEY")
    assert main(args) == 0
    cset = load_conditions(output, classnames=CLASSES)
    assert cset.dataset == "toy"
    assert cset.conditions == ("spatial layout", "object pose", "background", "lighting", "object scale")
    assert llm_stub.count == 5
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in llm_stub.requests)
    assert (tmp_path / "conditions.json.cache").is_dir()
    # The key appears nowhere: not in the file, the cache, the logs or the console.
    assert KEY not in output.read_text(encoding="utf-8")
    assert all(
        KEY not in p.read_text(encoding="utf-8") for p in (tmp_path / "conditions.json.cache").iterdir()
    )
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err
    # Rerun: everything comes from the cache.
    assert main(args) == 0
    assert llm_stub.count == 5


def test_derive_reports_endpoint_errors(
    llm_stub: StubLLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_stub.script.append("404")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES), encoding="utf-8")
    assert main(_derive_args(llm_stub, classes, tmp_path / "out.json")) == 2
    assert "HTTP 404" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_derive_needs_a_class_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["conditions", "derive", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--output", "x.json"]
    assert main(args) == 2
    assert "--dataset NAME" in capsys.readouterr().err
    assert main([*args, "--dataset", "imagenet"]) == 2
    assert "not a built-in dataset" in capsys.readouterr().err


def test_defaults_builder_cli_for_a_new_dataset(tmp_path: Path) -> None:
    classes = tmp_path / "world.txt"
    classes.write_text("circle\nsquare\ntriangle\n", encoding="utf-8")
    argv = ["--directory", str(tmp_path), "--dataset", "synthetic", "--classes", str(classes)]
    argv += [
        "--conditions",
        "shape layout, colour, background",
        "--note",
        "hand-picked for the synthetic world",
    ]
    assert defaults_build.main(argv) == 0
    cset = load_conditions(tmp_path / "synthetic.json", classnames=["circle", "square", "triangle"])
    assert cset.conditions == ("shape layout", "colour", "background")
    assert cset.provenance["note"] == "hand-picked for the synthetic world"
    assert defaults_build.main(["--directory", str(tmp_path), "--dataset", "voc2007"]) == 0
    assert load_conditions(tmp_path / "voc2007.json").classnames == BUILTIN_CLASSNAMES["voc2007"]
    assert defaults_build.main(["--directory", str(tmp_path), "--dataset", "nope"]) == 2


def test_derive_default_output_name(
    llm_stub: StubLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES), encoding="utf-8")
    args = _derive_args(llm_stub, classes, tmp_path / "unused.json")
    at = args.index("--output")
    del args[at : at + 2]
    assert main(args) == 0
    assert load_conditions(tmp_path / "toy.conditions.json", classnames=CLASSES).dataset == "toy"
    assert (tmp_path / "toy.conditions.json.cache").is_dir()
