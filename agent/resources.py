"""The one helper that finds shipped data files, from a checkout, an install or a PyInstaller bundle."""

from __future__ import annotations

import sys
from pathlib import Path


def data_root() -> Path:
    """The directory that holds ``config/``."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return Path(bundle)
    return Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    return data_root() / "config"


def shipped_rules_dir() -> Path:
    return config_dir() / "rules"


def rule_attribution_file() -> Path:
    return config_dir() / "rule_attribution.yaml"
