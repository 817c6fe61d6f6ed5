"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): login, the devices x
tools matrix, a drill-down, a hostile signer shown and never run, and 500 devices x 60 tools."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.output import plain
from collector.fleetplan import RuleIndex, parse_fleet_plan
from collector.storage import Collector
from tests.collector.conftest import free_port
from tests.collector.fleetdata import device_id, make_row
from tests.collector.live import API_TOKEN, ENROLL_SECRET, LiveCollector
from tests.conftest import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "MMSoft Design Ltd. <img src=x onerror=\"window.__xss='img'\"><script>window.__xss='script'</script>"


def screenshot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("RMMHUNT_SCREENSHOT_DIR", tmp_path))
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _login(page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", API_TOKEN)
    page.click("#login")
    page.wait_for_selector("body[data-ready='1']", timeout=60000)


def test_dashboard_matrix_drilldown_and_hostile_signer(tmp_path, browser):
    state = tmp_path / "agent"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndevice_id = "{device_id(1)}"\ndevice_name = "fixtures-host"\n', encoding="utf-8")
    with LiveCollector(tmp_path / "collector", free_port()) as live:
        env = dict(os.environ, RMMHUNT_COLLECTOR_URL=live.url, RMMHUNT_ENROLL_SECRET=ENROLL_SECRET)
        base = [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "--config", str(config)]
        subprocess.run(
            [*base, "scan", str(ROOT / "tests" / "fixtures"), "--no-progress"],
            env=env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        fwd = subprocess.run([*base, "forward", "--once"], env=env, capture_output=True, text=True, timeout=120)
        assert fwd.returncode == 0, fwd.stderr
        with live.client() as c:  # a second device whose signer name is an attack on the dashboard
            key = c.post(
                "/api/v1/enroll",
                json={"enroll_secret": ENROLL_SECRET, "device_id": device_id(2), "device_name": "hostile-host"},
            ).json()["node_key"]
            row = make_row(
                2, 1, HOSTILE, dt.datetime.now(dt.UTC), ProcessName="pulseway.exe", ProcessId=42, IsTrusted=False
            )
            body = gzip.compress(json.dumps({"node_key": key, "batch_id": "x", "rows": [plain(row)]}).encode())
            assert c.post("/api/v1/rows", content=body, headers={"Content-Encoding": "gzip"}).status_code == 200
            assert c.get("/api/v1/matrix").status_code == 401

        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        response = page.goto(live.url + "/")
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.locator("#token").count() == 1  # not logged in: the login form
        _login(page, live.url)
        cookie = [c for c in page.context.cookies() if c["name"] == "rmmhunt_session"][0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != API_TOKEN
        headers = page.locator("#matrix thead th").all_inner_texts()
        assert any(h.startswith("Pulseway") for h in headers) and any(h.startswith("DWService") for h in headers)
        assert "fixtures-host" in page.locator("#matrix tbody").inner_text()
        page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard.png"), full_page=True)
        # drill down from the hostile device's Pulseway cell
        tools = [h.split(" (")[0] for h in headers[1:]]
        row = page.locator("#matrix tbody tr", has_text="host-2.example.org")
        cell = row.locator("td").nth(tools.index("Pulseway"))
        assert "R" in cell.inner_text() and "!" in cell.inner_text()  # running, untrusted
        cell.hover()  # the tooltip is made on the first hover
        title = cell.get_attribute("title") or ""
        assert "FirstSeen" in title and "LastSeen" in title and "untrusted signature" in title
        cell.click()
        page.wait_for_selector("#drill:not([hidden]) #files tbody tr")
        files = page.locator("#files tbody").inner_text()
        assert HOSTILE in files and "untrusted" in files
        assert page.evaluate("window.__xss") is None and dialogs == []
        assert page.locator("#files img, #files script").count() == 0
        # filters: by tool and by technique
        page.fill("#f-tool", "dwserv")
        assert [h.split(" (")[0] for h in page.locator("#matrix thead th").all_inner_texts()[1:]] == ["DWService"]
        page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-drilldown.png"), full_page=True)
        # no state-changing GET: logout is a POST, and a GET of it is refused
        with live.client() as c:
            assert c.get("/logout").status_code == 405


def test_dashboard_500_devices_by_60_tools(tmp_path, browser, shipped_rules):
    # 60 tools, one signer each, taken from the rules' own patterns; a signer that several tools'
    # rules share is skipped so that the matrix has exactly 60 columns
    index = RuleIndex([parse_fleet_plan(r) for r in shipped_rules])
    probe_time = dt.datetime.now(dt.UTC)
    chosen: list[tuple[str, str]] = []
    seen_tools: set[str] = set()
    for rule in shipped_rules:
        for label, op, pattern in rule.query.string_patterns:
            if label != "Signer" or op not in ("has", "has_any") or rule.tool in seen_tools:
                continue
            probe = make_row(0, 1, pattern, probe_time)
            hit_tools = {p.rule.tool for p in index.candidates(probe) if p.ingest.filter_row(probe, now=probe_time)}
            if hit_tools == {rule.tool}:
                chosen.append((rule.tool, pattern))
                seen_tools.add(rule.tool)
    chosen = chosen[:60]
    now = dt.datetime.now(dt.UTC)
    rows = [
        make_row(d, t + 1, signer, now - dt.timedelta(hours=(d + t) % 48))
        for d in range(500)
        for t, (_tool, signer) in enumerate(chosen)
    ]
    db = tmp_path / "collector" / "collector.sqlite3"
    db.parent.mkdir()
    collector = Collector(f"sqlite:///{db}", shipped_rules)
    try:
        collector.start(background=False)
        started = time.perf_counter()
        collector.ingest(rows)
        ingest_s = time.perf_counter() - started
    finally:
        collector.close()
    with LiveCollector(tmp_path / "collector", free_port()) as live:
        page = browser.new_page()
        page.goto(live.url + "/")
        page.fill("#token", API_TOKEN)
        started = time.perf_counter()
        page.click("#login")
        page.wait_for_selector("body[data-ready='1']", timeout=120000)
        first_render = time.perf_counter() - started
        render_ms = page.evaluate("document.body.dataset.renderMs")
        fetch_ms = page.evaluate("document.body.dataset.fetchMs")
        page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-500x60.png"))
        # a second sign-in at once (another analyst) is served from the matrix cache
        other = browser.new_context().new_page()
        other.goto(live.url + "/")
        other.fill("#token", API_TOKEN)
        started = time.perf_counter()
        other.click("#login")
        other.wait_for_selector("body[data-ready='1']", timeout=120000)
        cached_render = time.perf_counter() - started
        fetch_again_ms = other.evaluate("document.body.dataset.fetchMs")
        assert other.locator("#matrix tbody tr").count() == 100
        other.close()
        # the first 100 device rows are built; the status counts all 500; more come on scrolling
        assert page.locator("#matrix tbody tr").count() == 100
        assert page.locator("#matrix thead th").count() == 61
        assert page.locator("#status").inner_text().startswith("500 devices (100 shown), 60 tools")
        assert page.locator("#matrix tbody td.hit").count() == 100 * 60
        page.locator("#more").scroll_into_view_if_needed()
        page.locator("#matrix tbody tr").nth(199).wait_for(state="attached")  # the observer added a page
        deadline = time.monotonic() + 30
        while page.locator("#matrix tbody tr").count() < 500 and time.monotonic() < deadline:
            page.evaluate("() => { const w = document.getElementById('matrix-wrap'); w.scrollTop = w.scrollHeight; }")
            page.wait_for_timeout(100)
        assert page.locator("#matrix tbody tr").count() == 500 and page.locator("#more").is_hidden()
        assert page.locator("#status").inner_text().startswith("500 devices, 60 tools")
        # the filters work over all 500 devices, not only the rows built
        page.fill("#f-device", "host-499.")
        assert page.locator("#matrix tbody tr").all_inner_texts()[0].startswith("host-499.example.org")
        assert page.locator("#matrix tbody tr").count() == 1
        tools = [h.split(" (")[0] for h in page.locator("#matrix thead th").all_inner_texts()[1:]]
        page.fill("#f-tool", tools[-1].lower())
        assert page.locator("#matrix thead th").count() == 2 and page.locator("#matrix tbody td.hit").count() == 1
        page.locator("#matrix tbody td.hit").click()  # the drill-down of a cell built from the filtered view
        page.wait_for_selector("#drill:not([hidden]) #files tbody tr")
        assert page.locator("#drill-title").inner_text() == f"{tools[-1]} on host-499.example.org"
    print(
        f"\ndashboard 500 devices x 60 tools ({len(rows)} rows, ingest {ingest_s:.1f}s): "
        f"time to first render {first_render:.2f}s (matrix fetch {fetch_ms} ms, built in the page in {render_ms} ms; "
        f"a second sign-in, matrix cached: first render {cached_render:.2f}s, fetch {fetch_again_ms} ms)"
    )


def test_matrix_cache_follows_ingest_and_window(tmp_path, shipped_rules):
    from collector.dashboard import MatrixCache

    now = dt.datetime.now(dt.UTC)
    collector = Collector(f"sqlite:///{tmp_path}/c.db", shipped_rules)
    try:
        collector.start(background=False)
        assert collector.enroll(device_id(1), "one") is not None
        collector.ingest([make_row(1, 1, "MMSoft Design Ltd.", now)], device_id=device_id(1))
        cache = MatrixCache(collector, ttl=60)
        first = cache.get(5.0)
        assert cache.get(5.0) is first  # served again, not rebuilt
        assert json.loads(first)["cells"][0][4] == 1
        collector.ingest([make_row(1, 2, "MMSoft Design Ltd.", now)], device_id=device_id(1))
        again = json.loads(cache.get(5.0))  # an API ingest changes the marker: rebuilt
        assert again["cells"][0][4] == 2
        assert json.loads(cache.get(1.0)) == again  # another window is its own entry
        expired = MatrixCache(collector, ttl=0)
        assert expired.get(5.0) is not expired.get(5.0)
    finally:
        collector.close()
