"""The shared views as plain functions: records, the findings table, CSV safety and the progress line.
Rows come from real fixtures through the real extractor and row builder."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import threading

import pytest
from rich.cells import cell_len
from rich.console import Console

from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots
from agent.hunt import HuntResult
from agent.output import csv_cell, format_for, render_csv, render_json
from agent.rows import Device, build_rows
from agent.scanner import ScanStats
from agent.textenc import unescape_path
from agent.views.progress import ScanProgress, count_files, estimate_file_count
from agent.views.records import (
    BROKEN,
    NOT_VERIFIED,
    TRUSTED,
    UNTRUSTED,
    error_record,
    findings_of,
    incomplete_reasons,
    row_record,
    trust_verdict,
)
from agent.views.table import findings_table, make_console, print_findings, shorten_middle, shorten_path
from tests.conftest import FIXTURES, TEST_ROOT_CA

DEVICE = Device("a" * 40, "host.example")
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _rows(name: str, path: str | None = None, *, verify: bool = True, trust_test_root: bool = False):
    data = (FIXTURES / "files" / name).read_bytes()
    verifier = TrustVerifier(load_roots([TEST_ROOT_CA] if trust_test_root else [])) if verify else None
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    rows = build_rows(facts, path or f"/srv/{name}", DEVICE, NOW, "scan")
    for n, row in enumerate(rows, start=1):
        row["ReportId"] = n
    return rows


class _Rule:
    """A rule's identity as the views read it (the evaluator is not needed to group findings)."""

    def __init__(self, rule_id: str, tool: str, source: str = "published") -> None:
        self.id, self.name, self.tool, self.source = rule_id, f"{tool} rule {rule_id}", tool, source
        self.techniques, self.shared_with, self.tactics = ("T1219",), (), ()


def test_trust_verdict_in_words_from_real_signatures():
    assert trust_verdict(_rows("pulseway.exe")[0]) == UNTRUSTED
    assert trust_verdict(_rows("pulseway.exe", trust_test_root=True)[0]) == TRUSTED
    assert trust_verdict(_rows("flipped_byte.exe", trust_test_root=True)[0]) == BROKEN
    assert trust_verdict(_rows("pulseway.exe", verify=False)[0]) == NOT_VERIFIED


def test_a_published_and_a_supplementary_rule_on_one_file_make_one_finding():
    rows = tuple(_rows("pulseway.exe"))
    other = tuple(_rows("dwservice.exe"))
    published, supplementary, dws = _Rule("p", "Pulseway"), _Rule("s", "Pulseway", "rmmhunt"), _Rule("d", "DWService")
    results = [
        HuntResult(published, {}, rows),  # type: ignore[arg-type]
        HuntResult(supplementary, {}, rows),  # type: ignore[arg-type]
        HuntResult(dws, {}, other),  # type: ignore[arg-type]
    ]
    findings = findings_of(results)
    assert [(f.tool, [r.id for r in f.rules]) for f in findings] == [("DWService", ["d"]), ("Pulseway", ["p", "s"])]
    pulse = findings[1]
    assert pulse.signer == "MMSoft Design Ltd." and pulse.verdict == UNTRUSTED and pulse.path == "/srv/pulseway.exe"
    tables, legend = findings_table(findings, 200)
    assert len(tables) == 1 and [r.id for r in legend] == ["d", "p", "s"]


def test_row_record_types_and_an_undecodable_path_round_trips():
    raw_path = os.fsdecode(b"/srv/odd\n\xff\x1b[2J=.exe")
    (row,) = _rows("pulseway.exe", raw_path)
    rec = row_record(row)
    assert rec["FolderPath"] == "/srv/odd%0A%FF%1B[2J=.exe" and unescape_path(rec["FolderPath"]) == raw_path
    assert unescape_path(rec["FileName"]) == os.fsdecode(b"odd\n\xff\x1b[2J=.exe")
    assert rec["CrlDistributionPointUrls"] == ["http://crl.rmmhunt.invalid/code-signing-ca.crl"]
    text = render_json({"rows": 1}, [rec], [error_record({"path": raw_path, "status": "TIMEOUT", "detail": "x"})])
    text.encode("utf-8")  # writable as strict UTF-8
    payload = json.loads(text)
    assert payload["results"][0]["IsTrusted"] is False and payload["errors"][0]["Path"] == rec["FolderPath"]
    (unverified,) = _rows("pulseway.exe", verify=False)
    assert row_record(unverified)["IsTrusted"] is None and row_record(unverified)["DigestValid"] is None


def test_csv_neutralises_formula_injection_but_not_numbers():
    for text in ("=1+2", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    assert csv_cell("safe=1") == "safe=1" and csv_cell(-5) == "-5" and csv_cell(None) == ""
    assert csv_cell(True) == "true" and csv_cell(["=a"]) == '["=a"]'
    out = render_csv([{"A": "=HYPERLINK(1)", "B": 3}], ["A", "B"])
    assert list(csv.reader(io.StringIO(out))) == [["A", "B"], ["'=HYPERLINK(1)", "3"]]


def test_out_extension_selects_the_format_unless_format_is_given():
    assert format_for("r.json", None) == "json" and format_for("r.JSONL", None) == "jsonl"
    assert format_for("r.csv", None) == "csv" and format_for("r.txt", None) == "table"
    assert format_for("r.json", "csv") == "csv" and format_for(None, None) == "table"


def test_shortening_keeps_both_ends_and_counts_terminal_cells():
    path = "/very/long/" + "d" * 80 + "/agent.exe"
    short = shorten_path(path, 30)
    assert cell_len(short) == 30 and short.startswith("/very/") and short.endswith("/agent.exe") and "…" in short
    wide = "/😀😀😀😀😀😀😀😀😀😀/" + "x" * 40
    assert cell_len(shorten_middle(wide, 21)) <= 21


def test_findings_table_fits_the_width_and_hostile_text_is_escaped():
    rows = _rows("pulseway.exe", "/opt/" + "deep/" * 30 + "pulse\x1b[31m.exe")
    for row in rows:
        row["Signer"] = "Evil\u202eCorp\x07"
    findings = findings_of([HuntResult(_Rule("p", "Pulseway"), {}, tuple(rows))])  # type: ignore[arg-type]
    for width in (80, 100, 200):
        buf = io.StringIO()
        print_findings(findings, make_console(buf, width=width))
        lines = buf.getvalue().splitlines()
        assert all(cell_len(line.rstrip()) <= width for line in lines), width
        assert "\x1b" not in buf.getvalue() and "\u202e" not in buf.getvalue() and "\x07" not in buf.getvalue()
        if width >= 200:  # narrower, the Signer column may fold the name onto two lines
            assert "Evil%E2%80%AECorp%07" in buf.getvalue()
        assert any(line.rstrip().endswith("%1B[31m.exe") for line in lines)


def test_incomplete_reasons():
    assert incomplete_reasons({"OK": 5, "NOT_PE": 2}, 0) == []
    reasons = incomplete_reasons({"ACCESS_DENIED": 2, "TIMEOUT": 1}, 3)
    assert len(reasons) == 3 and "ACCESS_DENIED" in reasons[0] and "DIRECTORY_ERROR" in reasons[2]


@pytest.mark.parametrize("width", [80, 40, 160])
def test_progress_is_one_line_redrawn_in_place_and_gone_at_the_end(width):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width, color_system=None)
    progress = ScanProgress(console, 1000)
    stats = ScanStats()
    for i in range(1, 6):
        stats.files = i * 150
        progress.last = 0.0  # redraw every call here; the scan redraws at most every 0.1 s
        progress(stats, "/usr/lib/x86_64-linux-gnu/" + "long-directory/" * 8 + f"file{i}")
    drawn = buf.getvalue()
    assert "\n" not in drawn  # every redraw replaces the line
    frames = [ANSI.sub("", f) for f in drawn.split("\r") if ANSI.sub("", f).strip()]
    assert len(frames) >= 5 and all(cell_len(f) <= width for f in frames)
    last = frames[-1]
    assert "750/1,000" in last
    if width >= 80:
        assert "75%" in last and "/s" in last and "/usr/lib" in last and re.search(r"\d:\d\d:\d\d", last)
    progress.close()
    assert buf.getvalue().endswith("\x1b[2K")  # the line is erased: nothing left on screen


def test_progress_total_estimates(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1", "a/2", "3"):
        (tmp_path / name).write_bytes(b"x")
    assert estimate_file_count([str(tmp_path / "3")]) == 1
    assert estimate_file_count([str(tmp_path)]) is None  # not a whole filesystem: counted instead
    assert count_files([str(tmp_path)], [], threading.Event()) == 3
    assert count_files([str(tmp_path)], [str(tmp_path / "a")], threading.Event()) == 1
    used = estimate_file_count(["/"], ["/proc", "/sys", "/dev"], [])
    st = os.statvfs("/")
    assert used is None or used >= st.f_files - st.f_ffree > 0
    stopped = threading.Event()
    stopped.set()
    assert count_files([str(tmp_path)], [], stopped) is None


def test_helpers_for_other_command_modules_give_the_new_shapes():
    from agent import cli

    results = [HuntResult(_Rule("p", "Pulseway"), {"DeviceId": "a" * 40, "Count": 1}, tuple(_rows("pulseway.exe")))]  # type: ignore[arg-type]
    payload = json.loads(cli._render_results(results, "json", True))
    assert set(payload) == {"summary", "results", "errors"} and payload["results"][0]["Rows"]
    assert cli._result_records(results)[0]["RuleId"] == "p" and cli._drill_records(results)[0]["Tool"] == "Pulseway"
    assert "Pulseway" in cli._render_results(results, "table", False)


def test_a_hit_on_a_running_process_is_marked_running_in_the_table_and_the_records():
    from agent.rows import ProcessContext
    from agent.views.records import drill_records, finding_record

    data = (FIXTURES / "files" / "pulseway.exe").read_bytes()
    facts = extract_stream(io.BytesIO(data), len(data), verifier=None)
    running = build_rows(
        facts, "/opt/p/Pulseway.exe", DEVICE, NOW, "process", ProcessContext(42, "Pulseway.exe", "root", "init")
    )
    on_disk = _rows("pulseway.exe", "/srv/pulseway.exe")
    for n, row in enumerate(running, start=10):
        row["ReportId"] = n
    result = HuntResult(_Rule("p", "Pulseway"), {}, tuple(running) + tuple(on_disk))  # type: ignore[arg-type]
    findings = findings_of([result])
    assert {f.path: f.running for f in findings} == {"/opt/p/Pulseway.exe": True, "/srv/pulseway.exe": False}
    assert [finding_record(f)["Running"] for f in findings] == [True, False]
    assert {r["FolderPath"]: r["Running"] for r in drill_records(result)} == {
        "/opt/p/Pulseway.exe": True,
        "/srv/pulseway.exe": False,
    }
    buf = io.StringIO()
    print_findings(findings, make_console(buf, width=200))
    line = next(line for line in buf.getvalue().splitlines() if "/opt/p/Pulseway.exe" in line)
    assert "running" in line
