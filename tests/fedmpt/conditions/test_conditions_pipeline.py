"""End-to-end tests of the two-stage pipeline against the loopback stub, plus parser and cache tests."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmpt.conditions.file import ConditionSet, load_conditions, save_conditions
from fedmpt.conditions.llm_client import ChatClient, ChatClientConfig, LLMUnavailableError, RetryPolicy
from fedmpt.conditions.pipeline import (
    MalformedAnswerError,
    PipelineConfig,
    derive_conditions,
    domain_for_dataset,
    parse_condition_list,
    parse_stage1_sentences,
)
from fedmpt.conditions.prompt_template import load_template, parse_template
from fedmpt.conditions.response_cache import CachedResponse, ResponseCache, cache_key
from fedmpt.conditions.sampling import SamplingConfig
from fedmpt.errors import ConditionsError, ConfigError

from .llm_stub_server import StubLLM, fixture_text

CLASSES = ("cat", "chair", "dog", "sofa", "Pleural_Thickening")
EXPECTED = ("spatial layout", "object pose", "background", "lighting", "object scale")


def _client(stub: StubLLM, attempts: int = 2) -> ChatClient:
    config = ChatClientConfig(
        endpoint=stub.url,
        model="stub-model",
        timeout_s=2.0,
        retry=RetryPolicy(max_attempts=attempts, base_delay_s=0.0, max_delay_s=0.0),
    )
    return ChatClient(config, rng=np.random.default_rng(0), sleep=lambda _: None, environ={})


def _config(**kw: object) -> PipelineConfig:
    settings: dict[str, object] = {"sampling": SamplingConfig(budget=6), "seed": 3}
    settings.update(kw)
    return PipelineConfig(**settings)  # type: ignore[arg-type]


def _template_sha(name: str) -> str:
    text = resources.files("fedmpt.conditions.templates").joinpath(f"{name}.txt").read_bytes()
    return hashlib.sha256(text).hexdigest()


def test_full_pipeline_and_provenance(llm_stub: StubLLM, tmp_path: Path) -> None:
    cset = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache", dataset="toy")
    assert cset.conditions == EXPECTED
    assert cset.classnames == CLASSES
    assert llm_stub.count == 7  # 6 stage-1 combinations + 1 stage-2 request
    prov = cset.provenance
    assert prov["source"] == "llm"
    assert prov["model"] == "stub-model"
    assert prov["templates"]["stage1"] == {
        "name": "stage1_v1",
        "version": 1,
        "sha256": _template_sha("stage1_v1"),
    }
    assert prov["templates"]["stage2"]["sha256"] == _template_sha("stage2_v1")
    canonical = json.dumps(list(CLASSES), separators=(",", ":")).encode()
    assert prov["classnames_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert prov["sampling"]["weighting"] == "uniform"
    assert prov["requests_sent"] == 7 and prov["answers_from_cache"] == 0
    assert len(prov["stage1"]) == 6 and len(prov["stage2"]) == 1
    assert all(r["response"] == fixture_text("stage1_answer.txt") for r in prov["stage1"])
    assert prov["stage2"][0]["response"] == fixture_text("stage2_answer.txt")
    # The prompts recorded are the prompts sent.
    sent = [r.body["messages"] for r in llm_stub.requests]
    assert [r["messages"] for r in prov["stage1"]] + [prov["stage2"][0]["messages"]] == sent
    # Class names reach the prompts in display form, and nothing else about the data does.
    stage1_users = [m[1]["content"] for m in sent[:6]]
    assert any('"Pleural Thickening"' in text for text in stage1_users)
    # Stage 2 sees every stage-1 sentence (6 answers x 3 sentences).
    stage2_user = sent[6][1]["content"]
    assert stage2_user.count("\n- ") + stage2_user.startswith("- ") == 18
    # The result round-trips through the file format.
    path = save_conditions(cset, tmp_path / "out.json")
    assert load_conditions(path, classnames=CLASSES) == cset


def test_rerun_resumes_from_cache_without_requests(llm_stub: StubLLM, tmp_path: Path) -> None:
    first = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache")
    assert llm_stub.count == 7
    second = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache")
    assert llm_stub.count == 7
    assert second.conditions == first.conditions
    assert second.provenance["requests_sent"] == 0
    assert second.provenance["answers_from_cache"] == 7
    assert all(r["from_cache"] for r in second.provenance["stage1"])


def test_interrupted_run_resumes_where_it_stopped(llm_stub: StubLLM, tmp_path: Path) -> None:
    llm_stub.script.extend(["ok", "ok", "ok", "500", "500"])
    with pytest.raises(LLMUnavailableError):
        derive_conditions(CLASSES, _client(llm_stub, attempts=2), _config(), tmp_path / "cache")
    assert llm_stub.count == 5
    assert len(ResponseCache(tmp_path / "cache")) == 3
    cset = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache")
    assert cset.conditions == EXPECTED
    assert llm_stub.count == 5 + (7 - 3)  # only the 4 requests that never completed are sent
    assert cset.provenance["answers_from_cache"] == 3


def test_cache_is_endpoint_independent(llm_stub: StubLLM, tmp_path: Path) -> None:
    derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache")
    other = ChatClientConfig(endpoint=llm_stub.url + "/v1/chat/completions", model="stub-model")
    client = ChatClient(other, rng=np.random.default_rng(0), environ={})
    derive_conditions(CLASSES, client, _config(), tmp_path / "cache")
    assert llm_stub.count == 7


def test_malformed_stage2_is_corrected(llm_stub: StubLLM, tmp_path: Path) -> None:
    llm_stub.stage2_answers.extend(["stage2_wrong_count.txt", "stage2_think.txt"])
    cset = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache")
    assert cset.conditions == ("scene context", "arrangement", "posture", "illumination", "apparent size")
    retry = llm_stub.requests[-1].body["messages"]
    assert retry[2] == {"role": "assistant", "content": fixture_text("stage2_wrong_count.txt")}
    assert retry[3]["role"] == "user"
    assert "has 4 items, expected exactly 5" in retry[3]["content"]
    records = cset.provenance["stage2"]
    assert [(r["attempt"], r["accepted"]) for r in records] == [(0, False), (1, True)]
    assert "expected exactly 5" in records[0]["problem"]


def test_malformed_stage2_is_finally_rejected_with_raw_text(llm_stub: StubLLM, tmp_path: Path) -> None:
    llm_stub.stage2_answers.extend(["stage2_no_list.txt"] * 3)
    with pytest.raises(MalformedAnswerError, match="after 3 answers") as info:
        derive_conditions(CLASSES, _client(llm_stub), _config(format_retries=2), tmp_path / "cache")
    assert fixture_text("stage2_no_list.txt") in str(info.value)
    assert info.value.raw == fixture_text("stage2_no_list.txt")
    assert llm_stub.count == 6 + 3


def test_stage2_shows_at_most_max_descriptions(llm_stub: StubLLM, tmp_path: Path) -> None:
    derive_conditions(CLASSES, _client(llm_stub), _config(max_stage2_descriptions=5), tmp_path / "cache")
    stage2_user = llm_stub.requests[-1].body["messages"][1]["content"]
    assert sum(line.startswith("- ") for line in stage2_user.splitlines()) == 5


def test_weighted_sampling_recorded(llm_stub: StubLLM, tmp_path: Path) -> None:
    counts = np.ones((5, 5))
    cset = derive_conditions(CLASSES, _client(llm_stub), _config(), tmp_path / "cache", cooccurrence=counts)
    assert cset.provenance["sampling"]["weighting"] == "cooccurrence-counts"
    assert "counts" not in json.dumps([r.body for r in llm_stub.requests])


# ---- parsers ---------------------------------------------------------------------------------------------


def test_parse_stage1_sentences() -> None:
    sentences = parse_stage1_sentences(fixture_text("stage1_answer.txt"), 3)
    assert sentences[0].startswith("A tabby cat dozes")
    assert sentences[2].startswith("A small cat perches")
    assert len(sentences) == 3
    assert parse_stage1_sentences(fixture_text("stage1_answer.txt"), 1) == sentences[2:]
    with pytest.raises(MalformedAnswerError, match="no descriptive sentence"):
        parse_stage1_sentences("Sure!\n\nOK:", 3)


def test_parse_condition_list_variants() -> None:
    assert parse_condition_list(fixture_text("stage2_answer.txt"), 5) == EXPECTED
    think = parse_condition_list(fixture_text("stage2_think.txt"), 5, classnames=("cat", "dog", "chair"))
    assert think == ("scene context", "arrangement", "posture", "illumination", "apparent size")
    assert parse_condition_list('[["x"]] then ["a", "b"]', 2) == ("a", "b")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("no list here", "does not end with a JSON list"),
        ('["a", "b", "c"]', "has 3 items, expected exactly 2"),
        ('["a", 3]', "not a list of strings"),
        ('["Pose", "pose"]', "duplicates"),
        ('["a", "one two three four five six"]', "6 words"),
        ('["<condition 1>", "b"]', "copied placeholder"),
        ('["cat", "lighting"]', "is a class name"),
        ('["pleural thickening", "lighting"]', "is a class name"),
    ],
)
def test_parse_condition_list_rejects(text: str, fragment: str) -> None:
    with pytest.raises(MalformedAnswerError, match=fragment) as info:
        parse_condition_list(text, 2, classnames=("cat", "Pleural_Thickening"))
    assert info.value.raw == text


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(_WORD, min_size=1, max_size=8, unique=True),
    st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=200),
)
def test_final_list_found_after_any_prose(words: list[str], prose: str) -> None:
    text = f"{prose}\n{json.dumps(words)}\n"
    assert parse_condition_list(text, len(words)) == tuple(words)


def test_domain_for_dataset() -> None:
    assert domain_for_dataset("chestxray14") == "chest X-ray radiographs"
    assert domain_for_dataset(None) == "natural photographs"


# ---- templates and cache ---------------------------------------------------------------------------------


def test_templates_have_sections_and_placeholders() -> None:
    for name in ("stage1_v1", "stage2_v1"):
        template = load_template(name)
        assert set(template.sections) == {"system", "user", "correction"}
        assert template.version == 1
    rendered = load_template("stage1_v1").render(
        "user", domain="natural photographs", classes='"cat", "dog"', n_sentences=3
    )
    assert '"cat", "dog"' in rendered and "$" not in rendered
    with pytest.raises(ConfigError, match="bad placeholder"):
        load_template("stage1_v1").render("user", domain="x")
    with pytest.raises(ConfigError, match="no prompt template 'stage9_v1'"):
        load_template("stage9_v1")
    with pytest.raises(ConfigError, match="must look like"):
        load_template("../etc/passwd")
    with pytest.raises(ConfigError, match="appears twice"):
        parse_template("x_v1", "### user\na\n### user\nb")


def test_cache_key_and_entries(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    key = cache_key("m", "stage1_v1", messages)
    canonical = '{"messages":[{"content":"hi","role":"user"}],"model":"m","template":"stage1_v1"}'
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    assert cache_key("m2", "stage1_v1", messages) != key
    assert cache_key("m", "stage1_v2", messages) != key
    cache = ResponseCache(tmp_path / "c")
    assert cache.get(key) is None
    entry = CachedResponse(key, "answer", "m", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00")
    cache.put(entry)
    assert cache.get(key) == entry
    (tmp_path / "c" / f"{key}.json").write_text("{corrupt", encoding="utf-8")
    assert cache.get(key) is None  # ignored, to be re-requested
    with pytest.raises(ConditionsError, match="not a hex SHA-256"):
        cache.get("../../x")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_conditions": 0},
        {"sentences_per_combination": 0},
        {"max_stage2_descriptions": 0},
        {"format_retries": -1},
        {"domain": " "},
        {"seed": -1},
    ],
)
def test_bad_pipeline_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PipelineConfig(**kwargs)  # type: ignore[arg-type]


def test_condition_set_is_what_the_model_reads(llm_stub: StubLLM, tmp_path: Path) -> None:
    cset = derive_conditions(CLASSES, _client(llm_stub), _config(n_conditions=5), tmp_path / "cache")
    assert isinstance(cset, ConditionSet)
    assert cset.n_conditions == 5
