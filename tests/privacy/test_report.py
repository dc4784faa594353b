"""Tests of the audit report (``privacy.report``, ``fedmpt report``): content against independently computed
values (Opacus / dp_accounting replays of the ledger history, the metrics the test wrote), escaping of hostile
input, graceful degradation without DP, failures made prominent, and the CLI exit codes."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from PIL import Image as PILImage

from fedmpt.apps import kit as app_kit
from fedmpt.cli import main as cli_main
from fedmpt.rundir import ClientFailure, RoundRecord, RunDirectory
from privacy.accounting import DpSgdEvent, epsilon_pld, epsilon_rdp
from privacy.consistency import chain_heads
from privacy.ledger import (
    GENESIS_HASH,
    LEDGER_PLD_DISCRETIZATION,
    Ledger,
    LedgerEntry,
    Release,
    SamplingBasis,
    TransportProtection,
    key_id_of,
    merge_node_entries,
    verify_ledger,
)
from privacy.report import (
    KIT_MASKING_DIR,
    ONE_PROCESS_HELD_EVERY_KEY,
    RUN_KIT_DIR,
    AuditReport,
    Finding,
    Paragraph,
    Section,
    Severity,
    Table,
    markdown_escape,
    render_html,
    render_markdown,
    write_audit_report,
)
from secagg.keys import Identity

DELTA = 1e-5
RUN_ID = "report-run"
SIGMA = 1.1
Q = 0.05
ROUNDS = 3
CLIENTS = ("0", "1")
HOSTILE = "<img src=x onerror=alert(1)>|[x](javascript:alert(2))"
#: (client, round) pairs in which a client trained; client 1 skips round 2.
PARTICIPATION = {"0": (1, 2, 3), "1": (1, 3)}


def steps_of(client: str, round_: int) -> int:
    return 2 + round_ + int(client)


def dp_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "method": "fedmpt",
        "dataset": "synthetic",
        "num-server-rounds": ROUNDS,
        "fraction-train": 1.0,
        "min-clients": 1,
        "secure-aggregation": "masking",
        "dp": True,
        "dp-mode": "exact",
        "noise-multiplier": SIGMA,
        "delta": DELTA,
        "max-grad-norm": 1.0,
        "batch-size": 8,
        "max-epsilon": 100.0,
        "accountant": "rdp",
    }
    config.update(overrides)
    return config


def metrics_values(seed: int = 3) -> dict[int, dict[str, float]]:
    rng = np.random.default_rng(seed)
    return {r: {m: float(rng.uniform(0.1, 0.9)) for m in ("mAP", "CF1", "OF1")} for r in range(1, ROUNDS + 1)}


def write_metrics(run: RunDirectory, values: dict[int, dict[str, float]], epsilons: dict[int, Any]) -> None:
    """Rounds completed as the server completes them (checkpoint, metrics.jsonl line with the documented
    per-client epsilon object or null, state.json)."""
    for round_ in range(1, ROUNDS + 1):
        replied = tuple(int(c) for c in CLIENTS if round_ in PARTICIPATION[c])
        failed = tuple(
            ClientFailure(node_id=100 + int(c), client_id=int(c), reason="timeout")
            for c in CLIENTS
            if round_ not in PARTICIPATION[c]
        )
        record = RoundRecord(
            round=round_,
            wall_time_s=1.5,
            clients_sampled=tuple(int(c) for c in CLIENTS),
            clients_replied=replied,
            clients_failed=failed,
            bytes_down=1000,
            bytes_up=500,
            global_metrics=values[round_],
            clients={str(c): {"mAP": values[round_]["mAP"] / 2} for c in replied},
            epsilon=epsilons.get(round_),
        )
        run.complete_round(record, {"w": np.full(2, float(round_), dtype=np.float32)})


def history_of(client: str, up_to_round: int = ROUNDS) -> list[tuple[float, float, int]]:
    return [(SIGMA, Q, steps_of(client, r)) for r in PARTICIPATION[client] if r <= up_to_round]


def opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    """Independent RDP oracle: Opacus's own accountant over the (sigma, q, steps) history."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(DELTA))


def dp_accounting_pld(history: list[tuple[float, float, int]]) -> float:
    """Independent PLD oracle: dp_accounting composing each event, at the ledger's discretisation."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=LEDGER_PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(DELTA))


def make_dp_run(root: Path, name: str, config: dict[str, Any], *, kit: str = "provisioned") -> Path:
    """A DP run directory: run ledger (2 nodes) signed by kit identities, metrics with per-client epsilon objects.

    ``kit``: "provisioned" (a kit outside the run directory, named by the run config's 'secagg-dir'), "per-run"
    (the simulation's kit inside the run directory, every private key included) or "unnamed" (a kit outside the
    run directory that nothing in the run names: no default roster).
    """
    outside = root / f"{name}-kit"
    if kit == "provisioned":
        config = {**config, "secagg-dir": str(outside)}
    run = RunDirectory.create(config, seed=0, root=root, name=name)
    provisioned = app_kit.ensure_run_kit(run.path / "secagg" if kit == "per-run" else outside, len(CLIENTS))
    ledgers = {c: Ledger(root / f"{name}-node-{c}.jsonl", provisioned.identity(int(c))) for c in CLIENTS}
    ledger_path = run.path / "epsilon_ledger.jsonl"
    epsilons: dict[int, Any] = {}
    for round_ in range(1, ROUNDS + 1):
        entries = []
        for c in CLIENTS:
            if round_ not in PARTICIPATION[c]:
                continue
            release = Release(
                run_id=RUN_ID,
                node_id=c,
                round=round_,
                event=DpSgdEvent(SIGMA, Q, steps_of(c, round_)),
                max_grad_norm=1.0,
                delta=DELTA,
                transport_protection=TransportProtection.MASKING,
                sampling_basis=SamplingBasis.DECLARED_SIZE,  # q = B / N, as every federated site
                declared_dataset_size=round(1 / Q),
            )
            entries.append(ledgers[c].append(release))
        merge_node_entries(ledger_path, entries, provisioned.roster)
        clients = {e.node_id: {"epsilon_rdp": e.epsilon_rdp, "epsilon_pld": e.epsilon_pld} for e in entries}
        heads = chain_heads(e for ledger in ledgers.values() for e in ledger.entries())  # as the server records
        epsilons[round_] = {"delta": DELTA, "accountant": "rdp", "clients": clients, "heads": heads}
    write_metrics(run, metrics_values(), epsilons)
    return run.path


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dp_run(tmp_path_factory.mktemp("runs"), "dp-run", dp_config())


@pytest.fixture(scope="module")
def dp_report(dp_run: Path) -> tuple[Path, str, int]:
    """The report of ``dp_run`` via the CLI: (report dir, report.md text, exit code)."""
    code = cli_main(["report", str(dp_run)])
    out = dp_run / "report"
    return out, (out / "report.md").read_text(encoding="utf-8"), code


# ----------------------------------------------------------------------------------------------------------
# Content of a DP run's report


def test_final_epsilon_per_client_equals_independent_replays(dp_report: tuple[Path, str, int]) -> None:
    out, markdown, code = dp_report
    assert code == 0
    rows = {row[0]: row for row in table_rows(markdown, "client | entries")}
    assert sorted(rows) == list(CLIENTS)
    summary = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for client in CLIENTS:
        history = history_of(client)
        expected_rdp, expected_pld = opacus_epsilon(history), dp_accounting_pld(history)
        row = rows[client]
        assert int(row[1]) == len(PARTICIPATION[client])
        assert int(row[2]) == PARTICIPATION[client][-1]
        assert int(row[3]) == sum(steps for _, _, steps in history)
        assert float(row[4]) == pytest.approx(expected_rdp, rel=1e-5)  # printed to 6 significant digits
        assert float(row[5]) == pytest.approx(expected_pld, rel=1e-5)
        assert row[8] == "yes"
        assert summary["clients"][client]["epsilon_rdp"] == pytest.approx(expected_rdp, rel=1e-9)
        assert summary["clients"][client]["epsilon_pld"] == pytest.approx(expected_pld, rel=1e-6)
    assert summary["max_epsilon_rdp"] == pytest.approx(max(opacus_epsilon(history_of(c)) for c in CLIENTS), rel=1e-9)
    assert summary["ledger"]["status"] == "verified"
    assert summary["ledger"]["roster"].endswith("(the kit of the run config's 'secagg-dir')")
    assert summary["ledger"]["one_process_held_every_key"] is False and summary["ledger"]["keys_in_run_dir"] == []
    assert "one process" not in markdown
    assert summary["ok"] is True


def test_utility_table_equals_metrics(dp_report: tuple[Path, str, int]) -> None:
    _, markdown, _ = dp_report
    values = metrics_values()
    rows = table_rows(markdown, "round | mAP")
    assert len(rows) == ROUNDS
    for row, round_ in zip(rows, range(1, ROUNDS + 1), strict=True):
        expected_replied = sum(round_ in PARTICIPATION[c] for c in CLIENTS)
        assert row == [
            str(round_),
            f"{values[round_]['mAP']:.4f}",
            f"{values[round_]['CF1']:.4f}",
            f"{values[round_]['OF1']:.4f}",
            f"{expected_replied}/{len(CLIENTS)}",
            str(len(CLIENTS) - expected_replied),
        ]


def test_dp_parameters_threat_model_and_limitations(dp_report: tuple[Path, str, int]) -> None:
    _, markdown, _ = dp_report
    params = {row[0]: row[1] for row in table_rows(markdown, "parameter | value")}
    assert params["noise multiplier sigma"] == f"{SIGMA:.6g}"
    assert params["sample rate q"] == f"{Q:.6g}"
    assert params["delta"] == f"{DELTA:.6g}"
    totals = sorted({sum(s for _, _, s in history_of(c)) for c in CLIENTS})
    assert params["DP-SGD steps per client (total)"] == ", ".join(str(t) for t in totals)
    assert "Transport protection in force: masking" in markdown
    assert "dp-mode exact: per-sample gradients of all trainable parameters" in markdown
    flat = " ".join(markdown.split())
    assert "a server that deviates arbitrarily" in flat and "2t &gt; m + c" in flat
    assert "secure\\_mode is unavailable on Python 3.11" in markdown
    assert "Empirical audit: not available" in markdown


def test_plots_are_pngs_and_html_is_self_contained(dp_report: tuple[Path, str, int]) -> None:
    out, markdown, _ = dp_report
    for name in ("epsilon.png", "map.png"):
        with PILImage.open(out / name) as image:
            assert image.format == "PNG" and image.size == (700, 420)  # figsize (7, 4.2) at 100 dpi
        assert f"]({name})" in markdown
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r'src="(?!data:)', page)  # no external resource


# ----------------------------------------------------------------------------------------------------------
# Escaping


class TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.data: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.data.append(data)


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "strong", "ul", "li", "table",
                "thead", "tbody", "tr", "th", "td", "figure", "img"}  # fmt: skip


def test_hostile_run_name_and_config_values_are_escaped(tmp_path: Path) -> None:
    run = RunDirectory.create(dp_config(dp=False, method=HOSTILE, **{HOSTILE: "<b>bold</b>"}), seed=0, root=tmp_path,
                              name="plain")  # fmt: skip
    write_metrics(run, metrics_values(), {})
    hostile_dir = run.path.rename(tmp_path / "<script>alert(3)<")
    written = write_audit_report(hostile_dir)
    page = written.html.read_text(encoding="utf-8")
    parser = TagCollector()
    parser.feed(page)
    assert {tag for tag, _ in parser.tags} <= ALLOWED_TAGS
    assert all(not name.startswith("on") for _, attrs in parser.tags for name, _ in attrs)
    text = "".join(parser.data)
    assert HOSTILE in text and "<b>bold</b>" in text and "<script>alert(3)<" in text  # shown literally
    assert html.escape(HOSTILE) in page
    markdown = written.markdown.read_text(encoding="utf-8")
    assert "<img" not in markdown and "<script" not in markdown and "<b>" not in markdown
    assert markdown_escape(HOSTILE) in markdown


def unescape_markdown(text: str) -> str:
    """Inverse of the documented escaping: drop backslash escapes, then decode the HTML entities."""
    return html.unescape(re.sub(r"\\(.)", r"\1", text))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_markdown_escape_is_inert_and_invertible(text: str) -> None:
    escaped = markdown_escape(text)
    assert "<" not in escaped and ">" not in escaped
    assert len(escaped.splitlines()) <= 1
    assert not re.search(r"(?<!\\)(\\\\)*[|\[\]`]", escaped)  # every table/link/code character is escaped
    assert unescape_markdown(escaped) == " ".join(text.splitlines())


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs", "Cc"])), st.text(min_size=1, max_size=20))
def test_html_shows_any_text_literally(text: str, cell: str) -> None:
    report = AuditReport(
        title="t",
        findings=(Finding(Severity.WARNING, text),),
        sections=(Section("s", (Paragraph(text), Table(("h",), ((cell,),)))),),
        summary={},
    )
    parser = TagCollector()
    parser.feed(render_html(report, {}))
    assert {tag for tag, _ in parser.tags} <= ALLOWED_TAGS
    assert text in "".join(parser.data) and html.escape(cell) in render_html(report, {})
    assert render_markdown(report).count("\n## ") == 1


# ----------------------------------------------------------------------------------------------------------
# Failures and degradation


def test_tampered_ledger_fails_prominently_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_path = make_dp_run(tmp_path, "tampered", dp_config())
    ledger_path = run_path / "epsilon_ledger.jsonl"
    lines = ledger_path.read_bytes().split(b"\n")
    target = 2  # 0-based: the third line
    lines[target] = lines[target].replace(
        b'"steps":', b'"steps":1', 1
    )  # a validly formed line whose signature no longer matches
    ledger_path.write_bytes(b"\n".join(lines))
    code = cli_main(["report", str(run_path)])
    assert code == 1
    assert "REPORT FOUND FAILURES" in capsys.readouterr().err
    markdown = (run_path / "report" / "report.md").read_text(encoding="utf-8")
    head = markdown.split("## Run summary")[0]  # the failure is stated before the first section
    assert "Status: FAILED" in head and "LEDGER VERIFICATION FAILED at line 3" in head
    summary = json.loads((run_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert summary["ledger"]["status"] == "failed" and summary["ok"] is False
    assert 'class="alert"' in (run_path / "report" / "report.html").read_text(encoding="utf-8")


def test_run_without_dp_degrades_gracefully(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = dp_config(dp=False, **{"secure-aggregation": "none"})
    for key in ("noise-multiplier", "max-epsilon", "delta", "max-grad-norm"):
        config.pop(key)
    run = RunDirectory.create(config, seed=1, root=tmp_path, name="no-dp")
    write_metrics(run, metrics_values(seed=9), {})
    out = tmp_path / "elsewhere"
    code = cli_main(["report", str(run.path), "--out", str(out)])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "DP is off for this run" in markdown
    assert "Ledger verification" in markdown and "not available: no epsilon\\_ledger.jsonl (DP is off)" in markdown
    assert "Empirical audit: not available" in markdown
    assert "Transport protection in force: none" in markdown
    assert not (out / "epsilon.png").exists() and (out / "map.png").exists()
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["dp"] is False
    assert not (run.path / "report").exists()


def test_dp_run_without_ledger_is_a_failure(tmp_path: Path) -> None:
    run = RunDirectory.create(dp_config(), seed=0, root=tmp_path, name="no-ledger")
    write_metrics(run, metrics_values(), {})
    written = write_audit_report(run.path)
    assert not written.ok
    assert any("DP run without epsilon_ledger.jsonl" in f.text for f in written.report.findings)


def test_audit_beside_claim_and_over_budget(tmp_path: Path) -> None:
    # A budget below client 0's final epsilon and an audit whose one-run bound exceeds its claim.
    eps0 = opacus_epsilon(history_of("0"))
    eps1 = opacus_epsilon(history_of("1"))
    budget = (eps0 + eps1) / 2 if eps0 > eps1 else None
    assert budget is not None  # client 0 takes more steps, so it spends more
    run_path = make_dp_run(tmp_path, "audited", dp_config(**{"max-epsilon": budget}))
    audit = {
        "canary": {"trials": 2000, "epsilon_lb": 0.8125, "claimed_epsilon": 4.25, "alpha": 0.05, "delta": 1e-5},
        "one_run": {"m": 1000, "r": 100, "v": 100, "epsilon_lb": 3.47, "claimed_epsilon": 2.5},
    }
    (run_path / "audit.json").write_text(json.dumps(audit), encoding="utf-8")
    written = write_audit_report(run_path)
    markdown = written.markdown.read_text(encoding="utf-8")
    audit_rows = {row[0]: row for row in table_rows(markdown, "audit | epsilon\\_lb")}
    assert audit_rows["canary (one DP step)"][1:4] == ["0.8125", "4.25", "no violation detected"]
    assert audit_rows["one-run (whole training)"][1:3] == ["3.47", "2.5"]
    assert audit_rows["one-run (whole training)"][3].startswith("VIOLATION")
    failures = [f.text for f in written.report.findings if f.severity is Severity.FAILURE]
    assert any("client 0 spent epsilon" in text for text in failures)
    assert not any("client 1 spent" in text for text in failures)
    assert any("epsilon_lb 3.47 > claimed epsilon 2.5" in text for text in failures)
    assert len(failures) == 2
    assert cli_main(["report", str(run_path)]) == 1


def test_not_a_run_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"format": "something-else"}', encoding="utf-8")
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "is not a fedmpt-run config file" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_dropped_ledger_tail_is_caught_by_the_rounds_the_client_replied_in(tmp_path: Path) -> None:
    # Dropping a chain's last entry leaves a ledger that verifies; metrics.jsonl shows the client replied later.
    run_path = make_dp_run(tmp_path, "dropped-tail", dp_config())
    ledger_path = run_path / "epsilon_ledger.jsonl"
    lines = ledger_path.read_bytes().split(b"\n")[:-1]
    last_of_client_1 = max(i for i, line in enumerate(lines) if json.loads(line)["node_id"] == "1")
    dropped = lines.pop(last_of_client_1)
    ledger_path.write_bytes(b"".join(line + b"\n" for line in lines))
    written = write_audit_report(run_path)
    assert written.report.summary["ledger"]["status"] == "verified"  # the ledger alone cannot tell
    failures = [f.text for f in written.report.findings if f.severity is Severity.FAILURE]
    rounds_1 = PARTICIPATION["1"]
    assert failures == [
        f"RUN RECORDS DISAGREE: round {rounds_1[-1]}: the server recorded node 1's entry seq {len(rounds_1) - 1} "
        f"({chain_heads([LedgerEntry.from_line(dropped)])['1'][1][:12]}...), which the ledger does not hold "  # type: ignore[index]
        "(truncated or rewritten)",
        f"client 1 replied in round {rounds_1[-1]} but its ledger chain ends at round {rounds_1[-2]}: entries are "
        "missing and its epsilon is under-reported",
    ]
    assert written.report.summary["clients"]["1"]["epsilon_rdp"] == pytest.approx(
        opacus_epsilon(history_of("1", up_to_round=rounds_1[-2])), rel=1e-9
    )
    warnings = [f.text for f in written.report.findings if f.severity is Severity.WARNING]
    assert any("metrics.jsonl epsilon differs from the ledger replay for client(s) 1 " in text for text in warnings)


def test_unusable_roster_fails_and_unreadable_audit_warns(tmp_path: Path) -> None:
    run_path = make_dp_run(tmp_path, "bad-roster", dp_config())
    roster_path = tmp_path / "bad-roster-kit" / "masking" / "roster.bin"
    roster_path.write_bytes(b"FMRS")  # the magic and nothing else
    (run_path / "audit.json").write_text("{truncated", encoding="utf-8")
    written = write_audit_report(run_path)
    by_severity = {s: [f.text for f in written.report.findings if f.severity is s] for s in Severity}
    assert by_severity[Severity.FAILURE] == [
        f"LEDGER NOT VERIFIED: roster {roster_path} (the kit of the run config's 'secagg-dir') is unusable: "
        "roster bytes: bad magic or truncated header"
    ]
    assert any(text.startswith("empirical audit unreadable: audit.json is not readable JSON") for text in
               by_severity[Severity.WARNING])  # fmt: skip


def test_run_without_completed_rounds(tmp_path: Path) -> None:
    run = RunDirectory.create(dp_config(dp=False), seed=0, root=tmp_path, name="fresh")
    written = write_audit_report(run.path)
    markdown = written.markdown.read_text(encoding="utf-8")
    assert written.ok
    assert "| rounds completed | 0 of 3 configured |" in markdown
    assert "No completed rounds: utility not available." in markdown
    assert sorted(p.name for p in written.directory.iterdir()) == ["report.html", "report.json", "report.md"]


# ----------------------------------------------------------------------------------------------------------
# Trust: the roster comes from the kit, and a report says when one process held every key


def test_kit_layout_names_mirror_fedmpt_apps_kit() -> None:
    assert (RUN_KIT_DIR, KIT_MASKING_DIR) == (app_kit.RUN_KIT_DIR, app_kit.MASKING_DIR)


def test_per_run_kit_is_named_in_the_first_lines(tmp_path: Path) -> None:
    run_path = make_dp_run(tmp_path, "simulated", dp_config(**{"secagg-dir": ""}), kit="per-run")
    written = write_audit_report(run_path)
    assert written.ok  # the ledger verifies against the per-run kit's roster ...
    first = written.report.findings[0]  # ... and the report says first what that is worth
    assert first.severity is Severity.WARNING and first.text.startswith(ONE_PROCESS_HELD_EVERY_KEY)
    assert str(run_path / "secagg" / "masking") in first.text and "nodes 0, 1" in first.text
    markdown = written.markdown.read_text(encoding="utf-8")
    assert markdown.splitlines()[4] == f"- **warning**: {markdown_escape(first.text)}"  # title, status, this
    ledger = written.report.summary["ledger"]
    assert ledger["status"] == "verified" and ledger["roster"].endswith("(the run's per-run kit)")
    assert ledger["one_process_held_every_key"] is True and ledger["keys_in_run_dir"] == [0, 1]
    assert "All node keys were generated and held by one process" in written.html.read_text(encoding="utf-8")


def forge_chain(ledger_path: Path, node_id: str, factor: float, signer: Identity | None = None) -> None:
    """Re-sign node ``node_id``'s chain with ``signer`` (default: a fresh key, not in the roster), ``factor`` x the
    noise and matching epsilons: the attack on a run whose keys all sit in one place."""
    forger = signer or Identity.generate(int(node_id))
    out, prev_hash, history = [], GENESIS_HASH, []
    for line in ledger_path.read_bytes().split(b"\n")[:-1]:
        entry = LedgerEntry.from_line(line)
        if entry.node_id == node_id:
            history.append(DpSgdEvent(entry.noise_multiplier * factor, entry.sample_rate, entry.steps))
            unsigned = LedgerEntry(
                **{
                    **entry.payload(),
                    "noise_multiplier": history[-1].noise_multiplier,
                    "epsilon_rdp": epsilon_rdp(history, entry.delta),
                    "epsilon_pld": epsilon_pld(history, entry.delta, entry.pld_value_discretization),
                    "prev_hash": prev_hash,
                    "key_id": key_id_of(forger.public),
                    "public_key": forger.public.hex(),
                }
            )
            entry = LedgerEntry(**{**unsigned.payload(), "signature": forger.sign(unsigned.signed_bytes()).hex()})
            prev_hash = entry.entry_hash()
        out.append(entry.canonical_bytes())
    ledger_path.write_bytes(b"".join(line + b"\n" for line in out))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # sigma = 44: RDP's tightest order is the top
def test_ledger_resigned_with_40x_the_noise_fails_the_report(tmp_path: Path) -> None:
    run_path = make_dp_run(tmp_path, "forged", dp_config())
    forge_chain(run_path / "epsilon_ledger.jsonl", "0", 40.0)
    written = write_audit_report(run_path)
    assert not written.ok
    failures = [f.text for f in written.report.findings if f.severity is Severity.FAILURE]
    assert failures[0].startswith("LEDGER VERIFICATION FAILED at line 1 (node '0'): signed by ed25519:")
    assert failures[0].endswith("not by the node's roster key")


def test_without_a_roster_the_ledger_is_not_verified_and_the_option_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_path = make_dp_run(tmp_path, "no-roster", dp_config(), kit="unnamed")
    assert cli_main(["report", str(run_path)]) == 1
    summary = json.loads((run_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert summary["ledger"]["status"] == "error" and summary["ok"] is False
    (failure,) = [f for f in summary["findings"] if f["severity"] == "failure"]
    assert failure["text"].startswith("LEDGER NOT VERIFIED: no roster: the run config sets no 'secagg-dir'")
    assert "--roster PATH" in failure["text"] and "--kit DIR" in failure["text"]
    assert "LEDGER NOT VERIFIED" in capsys.readouterr().err
    kit_dir = tmp_path / "no-roster-kit"
    for option in (["--kit", str(kit_dir)], ["--roster", str(kit_dir / "masking" / "roster.bin")]):
        assert cli_main(["report", str(run_path), *option]) == 0
        summary = json.loads((run_path / "report" / "report.json").read_text(encoding="utf-8"))
        assert summary["ledger"]["status"] == "verified" and summary["ledger"]["roster"].endswith("given)")


def drop_last_round(run_path: Path) -> None:
    """Cut the last round out of both the ledger and metrics.jsonl: every remaining signature stays valid."""
    ledger_path = run_path / "epsilon_ledger.jsonl"
    kept = [line for line in ledger_path.read_bytes().split(b"\n")[:-1] if json.loads(line)["round"] < ROUNDS]
    ledger_path.write_bytes(b"".join(line + b"\n" for line in kept))
    metrics = (run_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[:-1]
    (run_path / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics), encoding="utf-8")


def test_a_run_cut_short_in_ledger_and_metrics_fails_verify_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_path = make_dp_run(tmp_path, "cut", dp_config())
    assert cli_main(["ledger", "verify", str(run_path)]) == 0
    capsys.readouterr()
    drop_last_round(run_path)
    assert verify_ledger(run_path / "epsilon_ledger.jsonl", app_kit.Kit.load(tmp_path / "cut-kit").roster).ok
    assert cli_main(["ledger", "verify", str(run_path)]) == 1
    err = capsys.readouterr().err
    assert f"state.json says {ROUNDS} round(s) completed, metrics.jsonl has {ROUNDS - 1}" in err
    assert f"the newest checkpoint is of round {ROUNDS}, metrics.jsonl ends at round {ROUNDS - 1}" in err
    written = write_audit_report(run_path)
    assert not written.ok
    assert any(f.text.startswith("RUN RECORDS DISAGREE: state.json says") for f in written.report.findings)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_ledger_resigned_with_the_kits_own_keys_fails_verify_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a simulation every key sits in the run directory: re-signing a chain with the node's own key and 40x the
    noise passes every signature check; the chain heads the server wrote into metrics.jsonl catch it."""
    run_path = make_dp_run(tmp_path, "resigned", dp_config(**{"secagg-dir": ""}), kit="per-run")
    identity = app_kit.Kit.load(run_path / "secagg").identity(0)
    forge_chain(run_path / "epsilon_ledger.jsonl", "0", 40.0, signer=identity)
    assert verify_ledger(run_path / "epsilon_ledger.jsonl", app_kit.Kit.load(run_path / "secagg").roster).ok
    assert cli_main(["ledger", "verify", str(run_path)]) == 1
    assert "the server recorded node 0's entry seq 0" in capsys.readouterr().err
    written = write_audit_report(run_path)
    assert not written.ok and written.report.findings[0].text.startswith(ONE_PROCESS_HELD_EVERY_KEY)
    failures = [f.text for f in written.report.findings if f.severity is Severity.FAILURE]
    assert failures and all("node 0" in f or "client 0" in f for f in failures)
    assert any("which the ledger does not hold (truncated or rewritten)" in f for f in failures)


def test_verify_with_a_site_chain_catches_a_consistent_rewrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever rewrites every file of the run consistently is caught only by a record outside it: the site's own."""
    run_path = make_dp_run(tmp_path, "rewritten", dp_config())
    site_chain = tmp_path / "rewritten-node-1.jsonl"  # node 1's own chain, kept at the site
    assert cli_main(["ledger", "verify", str(run_path), "--site-chain", str(site_chain)]) == 0
    drop_last_round(run_path)
    state = json.loads((run_path / "state.json").read_text())
    (run_path / "state.json").write_text(json.dumps({**state, "last_completed_round": ROUNDS - 1}))
    (run_path / "checkpoints" / f"round_{ROUNDS:04d}.safetensors").unlink()
    capsys.readouterr()
    assert cli_main(["ledger", "verify", str(run_path)]) == 0  # the run directory alone now tells one story
    assert cli_main(["ledger", "verify", str(run_path), "--site-chain", str(site_chain)]) == 1
    assert "the run ledger lacks node 1's entry" in capsys.readouterr().err


def test_a_client_sampling_from_its_own_count_fails_the_report(tmp_path: Path) -> None:
    """q = B / n releases n: the report says add/remove-one DP does not hold for that client."""
    run_path = make_dp_run(tmp_path, "local-count", dp_config())
    ledger_path = run_path / "epsilon_ledger.jsonl"
    kit = app_kit.Kit.load(tmp_path / "local-count-kit")
    lines = ledger_path.read_bytes().split(b"\n")[:-1]
    node1 = [LedgerEntry.from_line(x) for x in lines if json.loads(x)["node_id"] == "1"]
    chain = Ledger(tmp_path / "local-count-node-1.jsonl", kit.identity(1))  # node 1's own chain, one more round
    release = Release(run_id=RUN_ID, node_id="1", round=ROUNDS, event=DpSgdEvent(SIGMA, Q, 1), max_grad_norm=1.0,
                      delta=DELTA, transport_protection=TransportProtection.MASKING)  # fmt: skip
    merge_node_entries(ledger_path, [*node1, chain.append(release)], kit.roster)
    written = write_audit_report(run_path)
    failures = [f.text for f in written.report.findings if f.severity is Severity.FAILURE]
    assert any(f.startswith("client(s) 1 computed q from their own record count") for f in failures)
