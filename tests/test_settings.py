"""Settings: one declaration per option, validated at load with FILE:LINE: key: message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from asn1crypto import pem

from agent import platform
from agent.settings import (
    OPTIONS,
    OPTIONS_BY_NAME,
    ConfigError,
    Settings,
    load_settings,
    locate_config_file,
    parse_key_lines,
    validate_config_file,
)
from tests.conftest import ROOT, TEST_ROOT_CA

MiB = 1024 * 1024


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, **kwargs):
    return load_settings(config_file=str(path), env={}, **kwargs)


# A bad value always sits on line 4, after a comment and a blank line, so the line is really looked up.
PREAMBLE = "# rmmhunt\n[agent]\n\n"

BAD_AGENT_VALUES = [
    # (TOML line 4, the key as reported, a piece of the message)
    ('max_file_size = "big"', "max_file_size", 'expected an integer (bytes), got string "big"'),
    ('file_time_budget = "fast"', "file_time_budget", 'expected a number (seconds), got string "fast"'),
    ('verify = "no"', "verify", 'expected true or false, got string "no"'),
    ("verify = 0", "verify", "expected true or false, got integer 0"),
    ("max_file_size = -1", "max_file_size", "must be >= 1 (bytes), got -1"),
    ("max_file_size = 1.5", "max_file_size", "expected an integer"),
    ("file_time_budget = -2.0", "file_time_budget", "must be >= 0.001 (seconds), got -2"),
    ("file_time_budget = 0", "file_time_budget", "must be >= 0.001"),
    ("file_time_budget = nan", "file_time_budget", "expected a finite number"),
    ("reobserve_interval = -5", "reobserve_interval", "must be >= 0"),
    ("follow_symlinks = 1", "follow_symlinks", "expected true or false"),
    ("max_cpu_percent = 150", "max_cpu_percent", "must be <= 100 (percent), got 150"),
    ('device_id = "xyz"', "device_id", "expected 40 hexadecimal characters"),
    ("device_id = 5", "device_id", "expected a string, got integer 5"),
    ('device_name = "a\\nb"', "device_name", "control characters"),
    ("state_dir = 7", "state_dir", "expected a path (a string), got integer 7"),
    ('state_dir = ""', "state_dir", "empty path"),
    ("rules_dirs = [1, 2]", "rules_dirs", "expected an array of paths"),
    ('rules_dirs = ["no-such-rules"]', "rules_dirs", "no-such-rules: not a directory"),
    ('trusted_roots = ["missing.pem"]', "trusted_roots", "missing.pem: no such file"),
    ('trusted_roots = ["garbage.pem"]', "trusted_roots", "garbage.pem: not a PEM or DER X.509 certificate"),
    ('trusted_roots = ["key.pem"]', "trusted_roots", "holds a PEM PRIVATE KEY block"),
    ('trusted_roots = ["."]', "trusted_roots", "not a regular file"),
    ("max_cert_table_size = 0", "max_cert_table_size", "must be >= 1"),
    ("max_certificates = -3", "max_certificates", "must be >= 1"),
    ('max_signatures = "32"', "max_signatures", 'expected an integer, got string "32"'),
    ("watch_roots = true", "watch_roots", "expected an array of paths (strings), got boolean true"),
    ("rescan_interval = -1", "rescan_interval", "must be >= 0"),
    ("process_sweep_interval = false", "process_sweep_interval", "expected a number (seconds), got boolean"),
    ("settle_seconds = inf", "settle_seconds", "expected a finite number"),
    ("memory_limit_mb = -512", "memory_limit_mb", "must be >= 0 (MiB)"),
    ("log_file = 3", "log_file", "expected a path"),
    ("log_max_bytes = -1", "log_max_bytes", "must be >= 0 (bytes)"),
    ('log_backups = "5"', "log_backups", "expected an integer"),
    ("lock_timeout = -1", "lock_timeout", "must be >= 0 (seconds)"),
    ("max_file_szie = 3", "max_file_szie", "unknown key in [agent]; did you mean 'max_file_size'?"),
    ("exclusions = 3", "exclusions", "unknown key in [agent]"),
]


@pytest.fixture
def cert_files(tmp_path: Path) -> Path:
    (tmp_path / "garbage.pem").write_bytes(b"this is not a certificate\n")
    (tmp_path / "key.pem").write_bytes(pem.armor("PRIVATE KEY", b"\x30\x03\x02\x01\x00"))
    return tmp_path


@pytest.mark.parametrize(("line", "key", "message"), BAD_AGENT_VALUES)
def test_a_bad_agent_value_names_file_line_and_key(cert_files: Path, line: str, key: str, message: str):
    path = write(cert_files, PREAMBLE + line + "\n# end\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:4: {key}: "), text
    assert message in text
    assert validate_config_file(path) == [text]


BAD_COLLECTOR_VALUES = [
    ('url = "ftp://collector.example"', "collector.url", "expected an https:// URL"),
    ('url = "http://collector.example"', "collector.url", "plain http is allowed only to localhost"),
    ('url = "https://user:pw@collector.example"', "collector.url", "must not carry credentials"),
    ('url = "https://collector.example:99999"', "collector.url", "not a valid URL"),
    ("url = 443", "collector.url", "expected a string"),
    ("enroll_secret = 1234", "collector.enroll_secret", "expected a string, got integer 1234"),
    ('ca_file = "garbage.pem"', "collector.ca_file", "not a PEM or DER X.509 certificate"),
    ('forward = "some"', "collector.forward", "expected one of 'hits', 'all', got 'some'"),
    ("max_outbox_bytes = -1", "collector.max_outbox_bytes", "must be >= 65536 (bytes), got -1"),
    ('max_outbox_bytes = "256MiB"', "collector.max_outbox_bytes", "expected an integer (bytes)"),
    ("uri = 1", "collector.uri", "unknown key in [collector]; did you mean 'url'?"),
]


@pytest.mark.parametrize(("line", "key", "message"), BAD_COLLECTOR_VALUES)
def test_a_bad_collector_value_names_file_line_and_key(cert_files: Path, line: str, key: str, message: str):
    path = write(cert_files, "[agent]\nverify = true\n\n[collector]\n" + line + "\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:5: {key}: "), str(err.value)
    assert message in str(err.value)


BAD_STRUCTURE = [
    ("[agent]\nverify = true\n\n[agnet]\nx = 1\n", 4, "agnet: unknown table or key"),
    ("verify = true\n", 1, "verify: belongs in the [agent] table"),
    ("agent = 5\n", 1, "agent: expected a table [agent]"),
    ("[agent]\nverify = true\nmax_file_size = \n", 3, "invalid TOML: Invalid value (column"),
    ("[agent]\nverify = true\nverify = false\n", 3, "invalid TOML: Cannot overwrite a value (column"),
    ("[agent]\nverify = true\n[agent]\n", 3, "invalid TOML"),
    ("exclusions = 5\n", 1, "exclusions: expected [[exclusions]] tables"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_STRUCTURE)
def test_bad_structure_names_file_and_line(tmp_path: Path, text: str, line: int, message: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert message in str(err.value)


def test_every_problem_is_listed_and_the_error_says_how_many_more(tmp_path: Path):
    path = write(tmp_path, '[agent]\nmax_file_size = "big"\nverify = "no"\n[collector]\nforward = "x"\n[bogus]\n')
    problems = validate_config_file(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:5", f"{path}:6"]
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.problems == problems
    assert str(err.value) == problems[0] + " (and 3 more; 'rmmhunt config check' lists them)"


def test_a_file_that_is_not_utf8_or_missing_is_one_problem(tmp_path: Path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[agent]\n# caf\xe9\nverify = true\n")
    assert validate_config_file(bad) == [f"{bad}:2: not UTF-8 text: invalid continuation byte"]
    assert validate_config_file(tmp_path / "none.toml") == [
        f"{tmp_path / 'none.toml'}: cannot read: No such file or directory"
    ]


def test_the_shipped_example_config_is_valid():
    example = ROOT / "config" / "agent.example.toml"
    assert validate_config_file(example) == []
    settings = load(example)
    assert settings.max_file_size == 256 * MiB and settings.verify is True
    line = next(n for n, text in enumerate(example.read_text().splitlines(), 1) if text.startswith("max_file_size"))
    assert settings.origin("max_file_size") == f"file:{example}:{line}"


def test_good_values_are_typed_and_paths_resolve_against_the_config_file(tmp_path: Path):
    der = tmp_path / "certs" / "root.cer"
    der.parent.mkdir()
    _kind, _headers, der_bytes = pem.unarmor(TEST_ROOT_CA.read_bytes())
    der.write_bytes(der_bytes)  # DER is accepted as well as PEM
    (tmp_path / "bundle.pem").write_bytes(TEST_ROOT_CA.read_bytes() + (TEST_ROOT_CA.parent / "tsa.pem").read_bytes())
    (tmp_path / "rules").mkdir()
    path = write(
        tmp_path,
        "[agent]\n"
        "max_file_size = 1024\n"
        "file_time_budget = 2\n"  # an integer where a float is declared is fine
        'trusted_roots = ["certs/root.cer", "bundle.pem"]\n'
        'rules_dirs = "rules"\n'  # a single path where a list is declared is fine
        'watch_roots = ["/opt", "later/created"]\n'
        'log_file = ""\n'
        'device_id = "ABCDEF0123456789abcdef0123456789ABCDEF01"\n'
        "[collector]\n"
        'url = "https://collector.example:8443/api"\n'
        'ca_file = "bundle.pem"\n'
        'forward = "all"\n'
        "max_outbox_bytes = 1048576\n",
    )
    s = load(path)
    assert s.max_file_size == 1024 and s.file_time_budget == 2.0 and isinstance(s.file_time_budget, float)
    assert s.trusted_roots == (der.resolve(), (tmp_path / "bundle.pem").resolve())
    assert s.rules_dirs == ((tmp_path / "rules").resolve(),)
    assert s.watch_roots == (Path("/opt"), (tmp_path / "later" / "created").resolve())
    assert s.log_file is None
    assert s.collector_url == "https://collector.example:8443/api"
    assert s.collector_ca_file == (tmp_path / "bundle.pem").resolve()
    assert s.collector_forward == "all" and s.collector_max_outbox_bytes == MiB
    assert s.config_file == path and s.origin("config_file") == "flag"
    assert s.origin("trusted_roots") == f"file:{path}:4" and s.origin("collector_forward") == f"file:{path}:12"


def test_new_settings_and_their_defaults():
    s = Settings()
    assert (s.max_cert_table_size, s.max_certificates, s.max_signatures) == (8 * MiB, 500, 32)
    assert s.watch_roots == () and s.rescan_interval == 86400 and s.process_sweep_interval == 300
    assert s.settle_seconds == 1.0 and s.memory_limit_mb == 512 and s.log_file is None
    assert s.log_max_bytes > 0 and s.log_backups >= 1 and s.max_cpu_percent == 0
    assert s.lock_timeout == 60
    assert (s.collector_url, s.collector_enroll_secret, s.collector_ca_file) == ("", "", None)
    assert (s.collector_forward, s.collector_max_outbox_bytes) == ("hits", 256 * MiB)
    assert OPTIONS_BY_NAME["collector_url"].dotted == "collector.url"
    assert OPTIONS_BY_NAME["collector_enroll_secret"].secret


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(str(v)) for v in value) + "]"
    return repr(value)


def test_every_option_is_declared_once_and_its_default_passes_its_own_checks(tmp_path: Path):
    """Each option has a type, help and a TOML key; writing every default into a config file
    loads back to the defaults, so no default violates its own declared range."""
    assert len({o.name for o in OPTIONS}) == len(OPTIONS) == len({(o.table, o.key) for o in OPTIONS})
    lines = {"agent": [], "collector": []}
    for opt in OPTIONS:
        assert opt.help and opt.kind in {"int", "float", "bool", "str", "path", "optional_path", "paths"}
        assert opt.table in lines and opt.env == "RMMHUNT_" + opt.name.upper()
        if opt.default is not None:
            lines[opt.table].append(f"{opt.key} = {toml_value(opt.default)}")
    text = "[agent]\n" + "\n".join(lines["agent"]) + "\n[collector]\n" + "\n".join(lines["collector"]) + "\n"
    settings = load(write(tmp_path, text))
    defaults = load_settings(env={}, default_config_file=None)
    for opt in OPTIONS:
        assert getattr(settings, opt.name) == getattr(defaults, opt.name), opt.name
        if opt.default is not None:
            assert settings.origin(opt.name).startswith(f"file:{tmp_path / 'agent.toml'}:"), opt.name
    assert defaults.state_dir == platform.default_state_dir()


def test_precedence_default_file_env_flag_with_origins(tmp_path: Path):
    path = write(tmp_path, "[agent]\nmax_file_size = 1000\nsettle_seconds = 2.0\nverify = false\n")
    env = {"RMMHUNT_SETTLE_SECONDS": "3.5", "RMMHUNT_VERIFY": "yes", "RMMHUNT_WATCH_ROOTS": "/a:/b"}
    s = load_settings(config_file=str(path), env=env, state_dir=str(tmp_path / "st"), verify=False)
    assert s.max_file_size == 1000 and s.origin("max_file_size") == f"file:{path}:2"
    assert s.settle_seconds == 3.5 and s.origin("settle_seconds") == "env:RMMHUNT_SETTLE_SECONDS"
    assert s.verify is False and s.origin("verify") == "flag"
    assert s.watch_roots == (Path("/a"), Path("/b")) and s.origin("watch_roots") == "env:RMMHUNT_WATCH_ROOTS"
    assert s.state_dir == tmp_path / "st" and s.origin("state_dir") == "flag"
    assert s.file_time_budget == 30.0 and s.origin("file_time_budget") == "default"
    s = load_settings(env={"RMMHUNT_STATE_DIR": str(tmp_path / "e")}, default_config_file=None)
    assert s.state_dir == tmp_path / "e" and s.origin("state_dir") == "env:RMMHUNT_STATE_DIR"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RMMHUNT_VERIFY", "maybe", 'env:RMMHUNT_VERIFY: verify: expected true or false, got string "maybe"'),
        ("RMMHUNT_MAX_FILE_SIZE", "big", "env:RMMHUNT_MAX_FILE_SIZE: max_file_size: expected an integer (bytes)"),
        ("RMMHUNT_FILE_TIME_BUDGET", "-1", "env:RMMHUNT_FILE_TIME_BUDGET: file_time_budget: must be >= 0.001"),
        ("RMMHUNT_COLLECTOR_FORWARD", "everything", "env:RMMHUNT_COLLECTOR_FORWARD: collector_forward: expected one"),
    ],
)
def test_a_bad_environment_value_names_the_variable(name: str, value: str, message: str):
    with pytest.raises(ConfigError) as err:
        load_settings(env={name: value}, default_config_file=None)
    assert str(err.value).startswith(message), str(err.value)


def test_a_bad_flag_value_is_an_error():
    with pytest.raises(ConfigError, match=r"^--max-file-size: max_file_size: must be >= 1"):
        load_settings(env={}, default_config_file=None, max_file_size=-1)


def test_default_config_path_then_env_then_flag(tmp_path: Path):
    default = write(tmp_path, "[agent]\nmax_file_size = 111\n", "default.toml")
    other = write(tmp_path, "[agent]\nmax_file_size = 222\n", "other.toml")
    flag = write(tmp_path, "[agent]\nmax_file_size = 333\n", "flag.toml")
    s = load_settings(env={}, default_config_file=default)
    assert s.max_file_size == 111 and s.config_file == default and s.origin("config_file") == "default"
    s = load_settings(env={"RMMHUNT_CONFIG": str(other)}, default_config_file=default)
    assert s.max_file_size == 222 and s.origin("config_file") == "env:RMMHUNT_CONFIG"
    s = load_settings(config_file=str(flag), env={"RMMHUNT_CONFIG": str(other)}, default_config_file=default)
    assert s.max_file_size == 333 and s.origin("config_file") == "flag"
    # a default path that does not exist is simply not read; an explicit one must exist
    s = load_settings(env={}, default_config_file=tmp_path / "absent.toml")
    assert s.config_file is None and s.max_file_size == 256 * MiB
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read: No such file"):
        load_settings(config_file=str(tmp_path / "absent.toml"), env={})
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read: No such file"):
        load_settings(env={"RMMHUNT_CONFIG": str(tmp_path / "absent.toml")}, default_config_file=default)
    # a bad default config file is as fatal as an explicit one
    default.write_text('[agent]\nverify = "no"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(default))}:2: verify: "):
        load_settings(env={}, default_config_file=default)
    assert locate_config_file(None, {}, default) == (default, "default", False)


def test_platform_default_config_path():
    expected = Path("/etc/rmmhunt/agent.toml")
    if platform.IS_WINDOWS:  # pragma: no cover - Windows
        expected = Path(r"C:\ProgramData") / "rmmhunt" / "agent.toml"
    assert platform.default_config_file() == expected


def test_key_lines_skip_multiline_strings_and_follow_tables():
    text = (
        "# c\n"
        "[agent]\n"
        "verify = true\n"
        '"max_file_size" = 3\n'
        "[[exclusions]]\n"
        "expression = '''a\n"
        "verify = false\n"
        "'''\n"
        "[[exclusions]]\n"
        "id = 'b'\n"
        "[ collector ]\n"
        "url.x = 1\n"
        "agent.trusted_roots = 2\n"
    )
    lines = parse_key_lines(text)
    assert lines[("agent",)] == 2 and lines[("agent", "verify")] == 3 and lines[("agent", "max_file_size")] == 4
    assert lines[("exclusions",)] == 5 and lines[("exclusions", 0, "expression")] == 6
    assert lines[("exclusions", 1)] == 9 and lines[("exclusions", 1, "id")] == 10
    assert lines[("collector",)] == 11 and lines[("collector", "url", "x")] == 12
    assert ("agent", "verify") in lines and 7 not in lines.values()


def test_deeply_nested_toml_is_one_problem_not_a_recursion_error(tmp_path: Path):
    from agent.config_cli import check_config_file

    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    problems = check_config_file(deep)
    assert problems == [f"{deep}:1: invalid TOML: arrays or tables nested too deeply"]
    with pytest.raises(ConfigError):
        load_settings(config_file=str(deep), default_config_file=None)
