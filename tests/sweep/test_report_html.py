"""report.html in headless Chromium (Playwright driving Debian's chromium): it opens offline,
makes no request, sorts and filters, and hostile names stay text. A PNG is saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.settings import load_settings
from agent.sweep.contents import build_manifest, build_members
from agent.sweep.driver import run_sweep
from agent.sweep.records import file_records, result_records, tool_summary
from agent.sweep.report import render_report
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, FIXTURES

HOSTILE = '<img src=x onerror="document.title=1">"><svg onload="document.title=2"><script>x=1<\\script>.exe'


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    tree = d / "tree"
    tree.mkdir()
    for name in ("pulseway.exe", "dwservice.exe", "servereye.exe", "alpemix.exe", "truncated_certtable.exe"):
        shutil.copy(FIXTURES / "files" / name, tree / name)
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / HOSTILE)
    shutil.copy(FIXTURES / "files" / "dwservice.exe", tree / "bidi\u202egnp.exe")
    outcome = run_sweep(str(tree), load_settings(state_dir=str(d / "state")), device_name="ir-host-01")
    manifest = build_manifest(outcome, version="test", operator_host="analyst-ws", operator_user="analyst")
    members = build_members(outcome, manifest)
    page = d / "report.html"
    page.write_bytes(members["report.html"])
    return page


def test_hostile_values_are_escaped_in_the_markup():
    files = [
        {
            "FolderPath": "C:\\x\\<b>bold</b>.exe",
            "FileName": "<b>bold</b>.exe",
            "SHA256": "0" * 64,
            "Signer": "</td><script>alert(1)</script>",
            "IsTrusted": False,
            "Trust": "untrusted",
            "SigningTime": None,
            "Running": False,
            "Tools": ["<i>Tool</i>"],
            "Techniques": ["T1219"],
            "RuleNames": ['"quoted"'],
        }
    ]
    page = render_report(
        tools=tool_summary(files),
        files=files,
        results=[],
        errors=[{"path": "<svg onload=x>", "status": "PARSE_ERROR", "detail": "\x1b[31mred"}],
        stats={"statuses": {}},
        manifest={"Device": {"DeviceName": "<h1>dev</h1>"}, "Source": {"Path": "/e/<x>"}},
    )
    for raw in ("<script>alert", "<b>bold", "<i>Tool", "<svg", "<h1>dev", "<x>", "\x1b"):
        assert raw not in page
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own sort/filter script only
    assert "http://" not in page and "https://" not in page
    assert file_records([]) == [] and result_records([]) == []


def test_report_renders_offline_in_chromium_sorts_filters_and_stays_inert(report_file, tmp_path):
    from playwright import sync_api

    requests: list[str] = []
    dialogs: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda req: requests.append(req.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(report_file.as_uri())
            page.wait_for_load_state("load")
            assert page.title().startswith("rmmhunt sweep")  # neither hostile handler ran
            assert requests == [report_file.as_uri()] and not dialogs
            assert page.locator("script").count() == 1 and page.locator("img, svg").count() == 0
            body = page.inner_text("body")
            assert HOSTILE.replace("\n", "") in body  # shown as text
            assert "%E2%80%AE" in body  # the bidi override is shown escaped, never obeyed
            tools = page.locator("#tools tbody tr td:first-child").all_inner_texts()
            assert {"Pulseway", "DWService", "ServerEye", "Alpemix"} <= set(tools)
            assert page.locator("#errors tbody tr").count() >= 1
            # filter
            rows = page.locator("#files tbody tr")
            total = rows.count()
            page.fill("input[data-filter=files]", "dwservice")
            visible = [r for r in rows.all() if r.is_visible()]
            assert 0 < len(visible) < total
            assert page.inner_text("#files-count") == str(len(visible))
            page.fill("input[data-filter=files]", "")
            # sort by path, both ways
            page.click("#files thead th:nth-child(7)")
            first = page.locator("#files tbody tr td:nth-child(7)").all_inner_texts()
            assert first == sorted(first, key=str.lower)
            page.click("#files thead th:nth-child(7)")
            assert page.locator("#files tbody tr td:nth-child(7)").all_inner_texts() == first[::-1]
            page.click("#files thead th:nth-child(7)")
            png = tmp_path / "report.png"
            page.screenshot(path=str(png), full_page=True)
            assert png.stat().st_size > 10_000
            print(f"report screenshot: {png}")
        finally:
            browser.close()


def test_report_forbids_external_requests_and_carries_the_manifest_summary(report_file):
    text = report_file.read_text(encoding="utf-8")
    assert 'http-equiv="Content-Security-Policy"' in text and "default-src 'none'" in text
    assert "ir-host-01" in text and "analyst-ws" in text
