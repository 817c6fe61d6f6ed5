"""Issue 7, Deliver 1: hostile and odd file names in every view.

A generated tree (built here in tmp_path; the `paths` branch brings a shared hostile-tree
fixture and the lead will unify the two) holds a signed RMM fixture under each name. It is
scanned and listed in every output format: no name causes an error status, every path
round-trips through ``unescape_path``, the terminal views carry no raw control characters,
and CSV cells cannot start a spreadsheet formula.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import pytest
from rich.cells import cell_len

from agent.textenc import escape_path, unescape_path
from tests.cli.test_scan_cli import rmmhunt
from tests.conftest import FIXTURES

HOSTILE_NAMES: tuple[bytes, ...] = (
    b"newline\nname.exe",
    b"tab\tname.exe",
    b"cr\rname.exe",
    b"esc\x1b[31mred\x1b[0m.exe",
    b"bell\x07del\x7f.exe",
    b"c1-csi\xc2\x9b31m.exe",  # U+009B, the one-character CSI
    b"bidi-\xe2\x80\xaeexe.txt",  # U+202E RIGHT-TO-LEFT OVERRIDE
    b"percent%41%25.exe",
    b"=HYPERLINK(1).exe",
    b"+plus.exe",
    b"-minus.exe",
    b"@at.exe",
    b"\tleading-tab.exe",
    b'comma,quote"semi;.exe',
    b"back\\slash.exe",
    b"unicode-\xc3\xa9\xe2\x80\x8b\xf0\x9f\x98\x80.exe",  # é, zero-width space, emoji
    b"nfd-e\xcc\x81.exe",
    b" leading and trailing space .exe",
    b"[bold]markup[reset].exe",
    b"x" * 200 + b".exe",
)
HOSTILE_DIR = b"dir\nwith-newline-\x1b[1m-and-escape"
# Names that are not valid UTF-8: the store keeps them exactly only with the `paths` branch
# (agent.textenc.to_db in Store); see test_undecodable_names_round_trip_end_to_end.
UNDECODABLE_NAMES: tuple[bytes, ...] = (b"latin1-\xe9\xff\xfe.exe", b"\xff\nnewline-too.exe")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
RAW_CONTROLS = ["\x1b", "\x07", "\x7f", "\x9b", "\r", "\u202e", "\t"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(tree, state, {raw path bytes}) after one scan of the tree."""
    base = tmp_path_factory.mktemp("hostile")
    tree = os.fsencode(base / "tree")
    os.mkdir(tree)
    os.mkdir(os.path.join(tree, HOSTILE_DIR))
    signed = (FIXTURES / "files" / "pulseway.exe").read_bytes()
    created = set()
    for folder in (tree, os.path.join(tree, HOSTILE_DIR)):
        for name in HOSTILE_NAMES:
            path = os.path.join(folder, name)
            with open(path, "wb") as handle:
                handle.write(signed)
            created.add(path)
    state = base / "state"
    first = rmmhunt("scan", os.fsdecode(tree), "--format", "json", state=state)
    assert first.returncode == 1, first.stderr
    yield os.fsdecode(tree), state, created
    shutil.rmtree(base, ignore_errors=True)


def _raw(escaped: str) -> bytes:
    return os.fsencode(unescape_path(escaped))


def _no_raw_controls(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text.replace("\n", ""), repr(char)


def test_no_name_causes_an_error_status(hostile):
    tree, state, created = hostile
    out = rmmhunt("scan", tree, "--format", "json", state=state)
    payload = json.loads(out.stdout)
    assert payload["errors"] == []
    assert payload["summary"]["statuses"]["OK"] == len(created) == payload["summary"]["files"]
    assert payload["summary"]["findings"] == len(created)


@pytest.mark.parametrize("command", ["scan", "hunt"])
def test_json_and_jsonl_paths_round_trip(hostile, command):
    tree, state, created = hostile
    target = [tree] if command == "scan" else []
    payload = json.loads(rmmhunt(command, *target, "--format", "json", "--rows", state=state).stdout)
    rows = [row for result in payload["results"] for row in result["Rows"]]
    assert {_raw(r["FolderPath"]) for r in rows} == created
    assert {os.path.basename(_raw(r["FolderPath"])) for r in rows} == {_raw(r["FileName"]) for r in rows}
    lines = rmmhunt(command, *target, "--format", "jsonl", "--rows", state=state).stdout.splitlines()
    assert {_raw(json.loads(line)["FolderPath"]) for line in lines} == created


def test_rows_command_round_trips_in_every_machine_format(hostile):
    _tree, state, created = hostile
    payload = json.loads(rmmhunt("rows", "--format", "json", state=state).stdout)
    assert {_raw(r["FolderPath"]) for r in payload["results"]} == created
    jsonl = rmmhunt("rows", "--format", "jsonl", state=state).stdout.splitlines()
    assert {_raw(json.loads(line)["FolderPath"]) for line in jsonl} == created


def _unneutralise(cell: str) -> str:
    """Undo the CSV formula guard: a ' added before a formula character (docs/output.md)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell


@pytest.mark.parametrize("command", ["scan", "hunt", "rows"])
def test_csv_round_trips_and_neutralises_formulas(hostile, command):
    tree, state, created = hostile
    args = {"scan": ("scan", tree, "--rows"), "hunt": ("hunt", "--rows"), "rows": ("rows",)}[command]
    text = rmmhunt(*args, "--format", "csv", state=state).stdout
    records = list(csv.DictReader(io.StringIO(text)))
    assert {_raw(_unneutralise(r["FolderPath"])) for r in records} == created
    for record in records:
        for key, cell in record.items():
            assert not cell.startswith(FORMULA_START), (key, cell)
    names = {_unneutralise(r["FileName"]) for r in records}
    assert {os.fsencode(unescape_path(n)) for n in names} == set(HOSTILE_NAMES)
    assert "'=HYPERLINK(1).exe" in {r["FileName"] for r in records}
    assert "'-minus.exe" in {r["FileName"] for r in records}


@pytest.mark.parametrize("args", [("scan",), ("hunt",), ("hunt", "--rows"), ("rows",), ("hunt", "--view", "summary")])
def test_tables_show_every_name_escaped_and_obey_no_control_character(hostile, args):
    tree, state, created = hostile
    target = [tree] if args[0] == "scan" else []
    out = rmmhunt(*args, *target, state=state)
    assert out.returncode in (0, 1), out.stderr
    _no_raw_controls(out.stdout)
    _no_raw_controls(out.stderr)
    if args[-1] != "summary":
        flat = "".join(out.stdout.split())
        for path in created:
            shown = "".join(escape_path(os.fsdecode(path)).split())
            assert shown in flat, shown


def test_table_at_80_columns_stays_within_the_width(hostile):
    tree, state, _created = hostile
    out = rmmhunt("scan", tree, state=state, extra_env={"COLUMNS": "80"})
    assert all(cell_len(line.rstrip()) <= 80 for line in out.stdout.splitlines())  # terminal cells
    _no_raw_controls(out.stdout)


def test_explain_shows_a_hostile_name_escaped(hostile):
    _tree, state, created = hostile
    path = next(p for p in created if b"\x1b" in p and HOSTILE_DIR in p)
    out = rmmhunt("explain", os.fsdecode(path), state=state)
    assert out.returncode == 1
    _no_raw_controls(out.stdout)
    assert escape_path(os.fsdecode(path)) in out.stdout


def test_undecodable_names_round_trip_end_to_end(tmp_path):
    tree = os.fsencode(tmp_path / "tree")
    os.makedirs(os.path.join(tree, b"dir-\xff"))
    signed = (FIXTURES / "files" / "pulseway.exe").read_bytes()
    created = set()
    for folder in (tree, os.path.join(tree, b"dir-\xff")):
        for name in UNDECODABLE_NAMES:
            created.add(os.path.join(folder, name))
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(signed)
    out = rmmhunt("scan", os.fsdecode(tree), "--format", "json", "--rows", state=tmp_path / "s")
    assert out.returncode == 1, out.stderr
    rows = [row for result in json.loads(out.stdout)["results"] for row in result["Rows"]]
    assert {_raw(r["FolderPath"]) for r in rows} == created
