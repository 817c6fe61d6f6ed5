"""Running processes as a source: real helper processes that memory-map signed fixtures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import psutil
import pytest

from agent.cli import main
from agent.service.pipeline import Pipeline, ProcessSweep, load_everything
from agent.sources.processes import SweepCounters, iter_process_files
from tests.runtime.conftest import DWSERVICE_RULE, SIGNED_DWSERVICE, SIGNED_PULSEWAY, loader, write_config

MAPPER = textwrap.dedent(
    """
    import mmap, sys
    f = open(sys.argv[1], "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    print("mapped", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    """
)


@contextlib.contextmanager
def mapping_process(tmp_path, name: str | None, fixture):
    """A real process that memory-maps a copy of ``fixture``; run under ``name`` via a symlink
    to the interpreter (the kernel takes the process name from the executed path)."""
    target = tmp_path / f"mapped_{fixture.name}"
    shutil.copy(fixture, target)
    script = tmp_path / "mapper.py"
    script.write_text(MAPPER)
    exe = sys.executable
    if name:
        (tmp_path / "bin").mkdir(exist_ok=True)
        link = tmp_path / "bin" / name
        link.symlink_to(os.path.realpath(sys.executable))
        exe = str(link)
    proc = subprocess.Popen([exe, str(script), str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mapped"
        yield proc, str(target)
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


@pytest.fixture
def two_processes(tmp_path):
    with (
        mapping_process(tmp_path / "a", "Pulseway.exe", SIGNED_PULSEWAY) as pulse,
        mapping_process(tmp_path / "b", None, SIGNED_DWSERVICE) as other,
    ):
        yield pulse, other


@pytest.fixture(autouse=True)
def _dirs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()


def test_process_sweep_rows_carry_the_process_and_process_exclusions_apply(tmp_path, two_processes):
    (pulse, pulse_file), (other, other_file) = two_processes
    config = write_config(tmp_path / "agent.toml", (("pulseway-proc", 'process.name == "Pulseway.exe"'),))
    pipeline = Pipeline(load_everything(loader(config, tmp_path / "state")()))
    try:
        sweeper = ProcessSweep(pipeline)
        stats, counters = sweeper.run(skip_pids=frozenset({os.getpid()}))
        rows = {r["FolderPath"]: r for r in sweeper.last_rows}
        me = psutil.Process()
        pulse_row = rows[pulse_file]
        assert (pulse_row["ProcessId"], pulse_row["ProcessName"]) == (pulse.pid, "Pulseway.exe")
        assert pulse_row["ProcessUser"] == me.username() and pulse_row["ParentProcessName"] == me.name()
        assert pulse_row["Source"] == "process"
        assert pulse_row["Excluded"] is True and pulse_row["ExclusionId"] == "pulseway-proc"
        other_row = rows[other_file]
        assert other_row["ProcessId"] == other.pid and other_row["ProcessName"] != "Pulseway.exe"
        assert other_row["Excluded"] is False
        assert counters.processes > 2 and counters.statuses["OK"] >= 2
        # the same processes again: no new rows (the cache and reobserve_interval decide)
        sweeper.run(skip_pids=frozenset({os.getpid()}))
        assert not [r for r in sweeper.last_rows if r["FolderPath"] in (pulse_file, other_file)]
    finally:
        pipeline.close()
    stored = [r for r in _stored(tmp_path / "state") if r["Source"] == "process"]
    assert {r["FolderPath"] for r in stored} >= {pulse_file, other_file}


def _stored(state):
    from tests.runtime.conftest import stored_rows

    return stored_rows(state)


def test_scan_processes_command_reports_running_rmm_and_honours_exclusions(tmp_path, two_processes):
    (pulse, pulse_file), (other, other_file) = two_processes
    config = write_config(tmp_path / "agent.toml", (("pulseway-proc", 'process.name == "Pulseway.exe"'),))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(
            ["scan", "--processes", "--format", "json", "--rows", "--config", str(config), "--state-dir", str(tmp_path)]
        )
    payload = json.loads(out.getvalue())
    assert code == 1
    assert DWSERVICE_RULE in {r["RuleId"] for r in payload["results"]}
    drill = [row for r in payload["results"] for row in r["Rows"]]
    assert any(r["FolderPath"] == other_file and r["ProcessId"] == other.pid and r["Running"] for r in drill)
    assert not any(r["FolderPath"] == pulse_file for r in drill)  # excluded by process.name
    assert payload["summary"]["processes"]["processes"] > 2


def test_a_process_that_vanishes_mid_sweep_is_a_status(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        list(psutil.process_iter())  # psutil now knows the helper
        counters = SweepCounters()
        files = iter_process_files(counters)
        next(files)
        proc.stdin.close()
        proc.wait(10)
        for _ in files:  # the helper is gone by the time the sweep reaches it
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert counters.statuses["VANISHED"] >= 1
    assert all(s in ("OK", "VANISHED", "ACCESS_DENIED") for s in counters.statuses)
