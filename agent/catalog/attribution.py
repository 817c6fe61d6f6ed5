"""The shipped catalog measured against LOLRMM's real vendor certificates, and the tool attribution
(`config/rule_attribution.yaml`) generated from that measurement.

Every certificate LOLRMM publishes as DER (`CodeSigning.certificates[].certificate_der_base64` in
the per-tool YAML, and the same field in `api/rmm_certificates.json`) becomes a row the way the
extractor would make it: Signer, Issuer, SignerHash... come from `agent.extract.certinfo`, never
from LOLRMM's own text. A certificate is tried once with no file name (a pure signer match) and
once with each file name LOLRMM gives for the tool, so that rules which narrow a broad vendor
signer by FileName can be measured too.

A rule is "shared with" every other tool whose vendor certificates it fires on. Certificates whose
signer is generic, or that LOLRMM files under the wrong tool, are listed in
`config/generic_signers.yaml` and never make a rule shared.

Regenerate the attribution file after changing a rule: `python -m agent.catalog.attribution`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from agent.extract.authenticode import FileFacts, SignatureFacts
from agent.extract.certinfo import CertIdentity, parse_certificate
from agent.resources import config_dir, rule_attribution_file, shipped_rules_dir
from agent.rows import Device, build_rows
from agent.rules.loader import Rule, RuleSet, load_rules
from agent.rules.terms import term_key
from agent.schema import COLUMN_NAMES

log = logging.getLogger(__name__)

REFERENCE_ENV = "RMMHUNT_REFERENCE_DIR"
# shared/ sits beside the checkout (as in CI); RMMHUNT_REFERENCE_DIR points elsewhere.
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference"
GENERIC_SIGNERS_FILE = "generic_signers.yaml"
_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Generic signers that must never fire a rule, whatever generic_signers.yaml says.
CORE_GENERIC_SIGNERS: tuple[str, ...] = (
    "Microsoft Corporation",
    "Microsoft Windows",
    "Google LLC",
    "Simon Tatham",
    "win.rar GmbH",
    "The Qt Company Oy",
    "Oracle America, Inc.",
    "Realtek Semiconductor Corp.",
    "NOTEPAD++",
)

# LOLRMM tool name -> the tool name the catalog uses. Published rules name their tool in their file
# and rule name (`DWService`, `parsec.app`); LOLRMM spells the same tools differently and lists some
# twice (YAML and website JSON, old and new product names). Unlisted names are used as they are.
TOOL_ALIASES: Mapping[str, str] = {
    "Ammyy Admin": "Ammyy",
    "Anyplace Control": "AnyplaceControl",
    "AweRay": "AweSun",
    "Aweray": "AweSun",
    "Barracuda": "BarracudaRMM",
    "BeyondTrust (Bomgar)": "BeyondTrust",
    "BeyondTrust Remote Support": "BeyondTrust",
    "CentraStage (Now Datto)": "DattoRMM",
    "ConnectWise Control": "ConnectWise",
    "ScreenConnect": "ConnectWise",
    "Connectwise Automate (LabTech)": "ConnectWise Automate",
    "LabTech RMM (Now ConnectWise Automate)": "ConnectWise Automate",
    "LabTeach (Connectwise Automate)": "ConnectWise Automate",
    "CrossTec Remote Control": "CrossTec",
    "Distant Desktop": "DistantDesktop",
    "DW Service": "DWService",
    "FleetDeck.io": "FleetDeck",
    "GoToAssist (GoTo Resolve)": "GoToAssist",
    "ISL Light": "ISLOnline",
    "ISL Online": "ISLOnline",
    "Iperius Remote": "IperiusRemote",
    "Jump Cloud": "JumpCloud",
    "Kaseya (VSA)": "Kaseya",
    "Level.io": "Level",
    "Lite Manager": "LiteManager",
    "Manage Engine (Desktop Central)": "ManageEngine",
    "ManageEngine RMM Central": "ManageEngine",
    "Microsoft Quick Assist": "Quick Assist",
    "Mikogo": "BeamYourScreen",
    "MSP360": "MSP360_CloudBerry",
    "mstsc.exe (Microsoft Remote Desktop Connection)": "mstsc",
    "N-Able Advanced Monitoring Agent": "NAble",
    "NetSupport Manager": "NetSupport",
    "Netop": "Netop Remote Control",
    "Netop Remote Control (aka Impero Connect)": "Netop Remote Control",
    "Netop Remote Control (Impero Connect)": "Netop Remote Control",
    "Netviewer (GoToMeet)": "Netviewer",
    "NinjaOne (formerly NinjaRMM)": "NinjaRMM",
    "Parsec": "parsec.app",
    "Pcvisit": "PcVisit",
    "PDQ Connect": "PDQ",
    "Pocket Controller": "Pocket Controller (Soti Xsight)",
    "Quest KACE Agent (formerly Dell KACE)": "Quest KACE",
    "Remote Desktop Manager (Devolutions)": "Devolutions Remote Desktop Manager",
    "Remote Utilities": "RemoteUtilities",
    "Royal Apps": "Royal TS",
    "Splashtop (Beta)": "Splashtop",
    "Splashtop Remote": "Splashtop",
    "Supremo": "SupRemo",
    "Syncro": "SyncroMSP",
    "Tactical RMM": "TacticalRMM",
    "Tanium Deploy": "Tanium",
    "Ultra VNC": "UltraVNC",
    "VNC Connect": "RealVNC",
    "Zoho Assist": "ZohoAssist",
}

# A plausible Windows file name (LOLRMM also lists globs, log files and sandbox sample names).
_FILE_NAME = re.compile(r"^[A-Za-z0-9][\w .+()-]*\.(?:exe|dll|msi|com|scr|sys)$", re.IGNORECASE)
_RULE_FILE_TOOL = re.compile(r"^(?:rmm|rmmhunt)_(?P<tool>.+)_filesig$")


def canonical_tool(lolrmm_name: str) -> str:
    name = lolrmm_name.strip()
    return TOOL_ALIASES.get(name, name)


def reference_dir(explicit: Path | None = None) -> Path:
    """The shared reference folder: an explicit path, else $RMMHUNT_REFERENCE_DIR, else the default."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(REFERENCE_ENV)
    return Path(env) if env else DEFAULT_REFERENCE_DIR


def generic_signers_file() -> Path:
    return config_dir() / GENERIC_SIGNERS_FILE


# --- LOLRMM certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LolrmmCertificate:
    """One real certificate (DER) that LOLRMM lists for one tool, as the extractor would see it."""

    tool: str  # canonical tool name
    listed_as: tuple[str, ...]  # LOLRMM tool names it was listed under
    sha1: str  # SignerHash: SHA-1 of the DER
    signer: str  # Signer: simple display name of the subject
    issuer: str
    subject: str
    issuer_subject: str
    serial_number: str
    not_before: datetime
    not_after: datetime
    crl_urls: tuple[str, ...]
    file_company: str
    sources: tuple[str, ...]  # reference files it came from
    identity: CertIdentity  # what parse_certificate() derived from the DER


@dataclass(frozen=True)
class LolrmmListing:
    """A certificate LOLRMM lists without DER: only its signer name and thumbprint are known."""

    tool: str
    listed_as: str
    signer_name: str
    thumbprint: str
    source: str


@dataclass(frozen=True)
class LolrmmCatalog:
    certificates: tuple[LolrmmCertificate, ...]
    without_der: tuple[LolrmmListing, ...]
    file_names: Mapping[str, tuple[str, ...]]  # canonical tool -> file names LOLRMM gives for it
    invalid_der: tuple[str, ...] = ()  # "source: tool: error" for DER that did not parse


def _tool_file_names(entry: Mapping[str, Any]) -> set[str]:
    """File names a LOLRMM YAML entry gives for its tool (PE metadata, install paths, search names, disk)."""
    raw: list[str] = []
    details = entry.get("Details") or {}
    metadata = details.get("PEMetadata")
    for item in metadata if isinstance(metadata, list) else [metadata]:
        if isinstance(item, dict):
            raw.extend(str(item.get(key) or "") for key in ("Filename", "OriginalFileName"))
    raw.extend(str(path) for path in details.get("InstallationPaths") or [])
    raw.extend(str(name) for name in (entry.get("CodeSigning") or {}).get("search_names") or [])
    for artifact in (entry.get("Artifacts") or {}).get("Disk") or []:
        if isinstance(artifact, dict):
            raw.append(str(artifact.get("File") or ""))
    return {name for name in (re.split(r"[\\/]", text.strip())[-1] for text in raw) if _FILE_NAME.match(name)}


def _decode_der(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


def parse_lolrmm(
    yaml_entries: Iterable[tuple[str, Mapping[str, Any]]], api_entries: Iterable[Mapping[str, Any]]
) -> LolrmmCatalog:
    """Build the catalog from parsed LOLRMM data (pure): (source name, YAML document) pairs and the
    entries of `api/rmm_certificates.json`."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    without_der: list[LolrmmListing] = []
    names: dict[str, set[str]] = {}
    invalid: list[str] = []

    def add(listed_as: str, cert: Mapping[str, Any], source: str) -> None:
        tool = canonical_tool(listed_as)
        der_text = cert.get("certificate_der_base64") or ""
        if not der_text:
            without_der.append(
                LolrmmListing(
                    tool,
                    listed_as,
                    str(cert.get("signer_name") or ""),
                    str(cert.get("certificate_thumbprint") or ""),
                    source,
                )
            )
            return
        try:
            identity = parse_certificate(_decode_der(str(der_text)))
        except (ValueError, binascii.Error) as exc:
            invalid.append(f"{source}: {listed_as}: {exc}")
            return
        slot = found.setdefault((tool, identity.sha1), {"identity": identity, "listed": {}, "sources": {}, "co": ""})
        slot["listed"][listed_as] = None
        slot["sources"][source] = None
        slot["co"] = slot["co"] or str(cert.get("src_file_company") or "").strip()

    for source, entry in yaml_entries:
        listed_as = str(entry.get("Name") or source)
        names.setdefault(canonical_tool(listed_as), set()).update(_tool_file_names(entry))
        for cert in (entry.get("CodeSigning") or {}).get("certificates") or []:
            if isinstance(cert, dict):
                add(listed_as, cert, source)
    for entry in api_entries:
        listed_as = str(entry.get("name") or "")
        tool_names = {str(name) for name in entry.get("search_names") or []}
        names.setdefault(canonical_tool(listed_as), set()).update(n for n in tool_names if _FILE_NAME.match(n))
        for cert in entry.get("certificates") or []:
            if isinstance(cert, dict):
                add(listed_as, cert, "api/rmm_certificates.json")

    certificates = []
    for (tool, _), slot in sorted(found.items()):
        identity = slot["identity"]
        certificates.append(
            LolrmmCertificate(
                tool=tool,
                listed_as=tuple(slot["listed"]),
                sha1=identity.sha1,
                signer=identity.display_name,
                issuer=identity.issuer_display_name,
                subject=identity.subject,
                issuer_subject=identity.issuer,
                serial_number=identity.serial_number,
                not_before=identity.not_before,
                not_after=identity.not_after,
                crl_urls=identity.crl_urls,
                file_company=slot["co"],
                sources=tuple(slot["sources"]),
                identity=identity,
            )
        )
    file_names = {tool: tuple(sorted(values, key=lambda n: (n.lower(), n))) for tool, values in sorted(names.items())}
    return LolrmmCatalog(tuple(certificates), tuple(without_der), file_names, tuple(invalid))


def load_lolrmm(reference: Path) -> LolrmmCatalog:
    """Read `lolrmm/yaml/*.y*ml` and `lolrmm/api/rmm_certificates.json` under the reference folder."""
    root = Path(reference) / "lolrmm"
    yaml_files = sorted(p for p in (root / "yaml").iterdir() if p.suffix in (".yaml", ".yml"))
    if not yaml_files:
        raise FileNotFoundError(f"no LOLRMM YAML files under {root / 'yaml'}")
    yaml_entries = []
    for path in yaml_files:
        entry = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
        if isinstance(entry, dict):
            yaml_entries.append((f"yaml/{path.name}", entry))
    api_path = root / "api" / "rmm_certificates.json"
    api_entries = json.loads(api_path.read_text(encoding="utf-8")) if api_path.exists() else []
    return parse_lolrmm(yaml_entries, api_entries)


# --- generic signers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignerNote:
    signer: str
    reason: str
    tool: str | None = None  # set for not_vendor entries


@dataclass(frozen=True)
class GenericSigners:
    generic: tuple[SignerNote, ...]
    not_vendor: tuple[SignerNote, ...] = ()
    _generic_keys: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = {term_key(note.signer): note.reason for note in self.generic}
        for signer in CORE_GENERIC_SIGNERS:
            keys.setdefault(term_key(signer), "core generic signer")
        object.__setattr__(self, "_generic_keys", keys)

    @property
    def signers(self) -> tuple[str, ...]:
        """Every generic signer string: the file's list plus the core list."""
        listed = [note.signer for note in self.generic]
        keys = {term_key(s) for s in listed}
        return tuple(listed + [s for s in CORE_GENERIC_SIGNERS if term_key(s) not in keys])

    def generic_reason(self, signer: str) -> str | None:
        return self._generic_keys.get(term_key(signer))

    def not_vendor_reason(self, tool: str, signer: str) -> str | None:
        key = term_key(signer)
        for note in self.not_vendor:
            if note.tool == tool and term_key(note.signer) == key:
                return note.reason
        return None

    def exclusion_reason(self, cert: LolrmmCertificate) -> str | None:
        """Why this certificate is not one of its tool's vendor certificates, or None."""
        generic = self.generic_reason(cert.signer)
        if generic is not None:
            return f"generic signer: {generic}"
        not_vendor = self.not_vendor_reason(cert.tool, cert.signer)
        if not_vendor is not None:
            return f"not this tool's vendor: {not_vendor}"
        return None


def parse_generic_signers(data: Any) -> GenericSigners:
    """Validate the parsed `generic_signers.yaml` (pure). Raises ValueError naming the bad entry."""
    if not isinstance(data, dict):
        raise ValueError("generic signers file must be a mapping with 'generic' and 'not_vendor' lists")
    unknown = sorted(set(data) - {"generic", "not_vendor"})
    if unknown:
        raise ValueError(f"unknown key(s) in generic signers file: {unknown}")

    def notes(key: str, need_tool: bool) -> tuple[SignerNote, ...]:
        out = []
        for index, item in enumerate(data.get(key) or []):
            if not isinstance(item, dict) or not all(
                isinstance(item.get(k), str) and item[k].strip() for k in ("signer", "reason")
            ):
                raise ValueError(f"{key}[{index}] needs non-empty 'signer' and 'reason' strings")
            if need_tool and not (isinstance(item.get("tool"), str) and item["tool"].strip()):
                raise ValueError(f"{key}[{index}] needs a 'tool'")
            if not term_key(item["signer"]):
                raise ValueError(f"{key}[{index}]: signer {item['signer']!r} has no letters or digits")
            out.append(SignerNote(item["signer"], item["reason"], item.get("tool") if need_tool else None))
        return tuple(out)

    return GenericSigners(notes("generic", False), notes("not_vendor", True))


def load_generic_signers(path: Path | None = None) -> GenericSigners:
    path = Path(path) if path is not None else generic_signers_file()
    return parse_generic_signers(yaml.safe_load(path.read_text(encoding="utf-8")))


# --- rows and evaluation ------------------------------------------------------------------------------

DUMMY_DEVICE_ID = "0" * 40
DUMMY_DEVICE_NAME = "lolrmm-catalog.invalid"


def _blank_row(now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMN_NAMES)
    row.update(
        Timestamp=now,
        DeviceId=DUMMY_DEVICE_ID,
        DeviceName=DUMMY_DEVICE_NAME,
        SHA1="",
        IsSigned=True,
        SignatureType="Embedded",
        Signer="",
        SignerHash="",
        Issuer="",
        IssuerHash="",
        CertificateSerialNumber="",
        CrlDistributionPointUrls="[]",
        IsTrusted=False,
        IsRootSignerMicrosoft=False,
        ReportId=0,
        FolderPath="",
        FileName="",
        FileSize=0,
        SHA256="",
        SignerSubject="",
        IssuerSubject="",
        ProgramName="",
        DigestValid=None,
        VerificationStatus="NOT_VERIFIED",
        SignatureIndex=0,
        Source="scan",
        ProcessName="",
        ProcessUser="",
        ParentProcessName="",
        Excluded=False,
        ExclusionId="",
    )
    return row


def signer_row(signer: str, *, now: datetime, file_name: str = "", report_id: int = 0) -> dict[str, Any]:
    """A row that knows nothing but the Signer (and optionally the FileName)."""
    row = _blank_row(now)
    row.update(Signer=signer, SignerSubject=f"CN={signer}", FileName=file_name, ReportId=report_id)
    return row


def certificate_row(cert: LolrmmCertificate, *, now: datetime, file_name: str = "", report_id: int = 0) -> dict:
    """The row the extractor would emit for a file signed with this certificate: built by the
    same ``build_rows`` the scanner uses, from the certificate's parsed identity."""
    signature = SignatureFacts(
        index=0,
        signer=cert.identity,
        issuer_hash="",
        program_name="",
        countersignature_time=None,
        digest_algorithm="sha256",
        digest_valid=None,
        verification_status="NOT_VERIFIED",
        verification_error="",
        is_trusted=False,
        is_root_microsoft=False,
    )
    facts = FileFacts("OK", "PE", 0, signatures=(signature,))
    (row,) = build_rows(facts, file_name, Device(DUMMY_DEVICE_ID, DUMMY_DEVICE_NAME), now, "scan")
    row["ReportId"] = report_id
    return row


def rules_firing(rules: Sequence[Rule], row: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    """Ids of the rules whose row filter passes `row`."""
    return tuple(rule.id for rule in rules if rule.query.filter_row(row, now=now) is not None)


@dataclass(frozen=True)
class CertificateHits:
    cert: LolrmmCertificate
    by_signer: tuple[str, ...]  # rule ids firing on the row without a file name
    by_file_name: Mapping[str, tuple[str, ...]]  # rule id -> file names that made it fire (if not by signer)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return self.by_signer + tuple(self.by_file_name)


def evaluate_certificates(
    rules: Sequence[Rule], catalog: LolrmmCatalog, *, now: datetime | None = None
) -> tuple[CertificateHits, ...]:
    now = now or datetime.now(UTC)
    # A row filter only reads the columns its query uses: memoise on those values, and try the file
    # names only on rules that read FileName (for the others the answer is the signer-only one).
    used = {rule.id: tuple(sorted(rule.query.columns_used)) for rule in rules}
    name_rules = [rule for rule in rules if "FileName" in rule.query.columns_used]
    memo: dict[tuple[Any, ...], bool] = {}

    def fires(rule: Rule, row: Mapping[str, Any]) -> bool:
        key = (rule.id, *(row.get(column) for column in used[rule.id]))
        if key not in memo:
            memo[key] = rule.query.filter_row(row, now=now) is not None
        return memo[key]

    out = []
    for index, cert in enumerate(catalog.certificates, start=1):
        signer_only = certificate_row(cert, now=now, report_id=index)
        by_signer = tuple(rule.id for rule in rules if fires(rule, signer_only))
        by_name: dict[str, list[str]] = {}
        for file_name in catalog.file_names.get(cert.tool, ()):
            row = certificate_row(cert, now=now, file_name=file_name, report_id=index)
            for rule in name_rules:
                if rule.id not in by_signer and fires(rule, row):
                    by_name.setdefault(rule.id, []).append(file_name)
        out.append(CertificateHits(cert, by_signer, {k: tuple(v) for k, v in by_name.items()}))
    return tuple(out)


def generic_signer_hits(rules: Sequence[Rule], signers: Iterable[str], *, now: datetime | None = None) -> dict:
    """Generic signer -> ids of the rules that fire on a row carrying only that Signer (must be empty)."""
    now = now or datetime.now(UTC)
    hits = {}
    for signer in signers:
        fired = rules_firing(rules, signer_row(signer, now=now), now)
        if fired:
            hits[signer] = fired
    return hits


# --- attribution --------------------------------------------------------------------------------------


def rule_tool(rule: Rule) -> str:
    """The tool a rule is written for, ignoring any attribution file: the `rmmhunt.tool` of our
    own rules, else the tool in the file name (`rmm_<Tool>_filesig.yaml`), else the loader's."""
    tool = rule.meta.get("tool") if isinstance(rule.meta, Mapping) else None
    if isinstance(tool, str) and tool.strip():
        return tool.strip()
    match = _RULE_FILE_TOOL.match(Path(rule.path).stem)
    return match["tool"] if match else rule.tool


def compute_attribution(
    rules: Sequence[Rule], hits: Iterable[CertificateHits], generic: GenericSigners
) -> dict[str, dict[str, Any]]:
    """rule id -> {tool, shared_with}: the other tools whose vendor certificates the rule fires on."""
    shared: dict[str, set[str]] = {rule.id: set() for rule in rules}
    tools = {rule.id: rule_tool(rule) for rule in rules}
    for hit in hits:
        if generic.exclusion_reason(hit.cert) is not None:
            continue
        for rule_id in hit.rule_ids:
            if rule_id in shared and hit.cert.tool != tools[rule_id]:
                shared[rule_id].add(hit.cert.tool)
    return {rule.id: {"tool": tools[rule.id], "shared_with": sorted(shared[rule.id], key=str.lower)} for rule in rules}


def format_attribution(attribution: Mapping[str, Mapping[str, Any]], rules: Sequence[Rule]) -> str:
    """The attribution file's text: a header, then one entry per rule sorted by file name."""
    lines = [
        "# Generated by `python -m agent.catalog.attribution` from the LOLRMM certificates in the shared",
        "# reference folder and config/generic_signers.yaml. Do not edit by hand: change a rule or the",
        "# generic signer list and regenerate.",
        "#",
        "# rule id -> tool: the tool the rule is written for; shared_with: the other tools whose real",
        "# vendor certificates (LOLRMM) the rule also fires on, so a hit may be any of them.",
    ]
    for rule in sorted(rules, key=lambda r: Path(r.path).name.lower()):
        entry = attribution[rule.id]
        shared = ", ".join(json.dumps(tool, ensure_ascii=False) for tool in entry["shared_with"])
        lines.append(f"{rule.id}:  # {Path(rule.path).name}")
        lines.append(f"  tool: {json.dumps(entry['tool'], ensure_ascii=False)}")
        lines.append(f"  shared_with: [{shared}]")
    return "\n".join(lines) + "\n"


def load_unattributed_rules(rule_dirs: Sequence[Path]) -> RuleSet:
    """The catalog as written, without any attribution file applied."""
    return load_rules(list(rule_dirs), attribution=None)


def generate_attribution(
    rule_dirs: Sequence[Path], reference: Path, generic_path: Path | None = None, *, now: datetime | None = None
) -> str:
    ruleset = load_unattributed_rules(rule_dirs)
    if ruleset.problems:
        raise ValueError("rule problems: " + "; ".join(str(p) for p in ruleset.problems))
    catalog = load_lolrmm(reference)
    hits = evaluate_certificates(ruleset.rules, catalog, now=now)
    attribution = compute_attribution(ruleset.rules, hits, load_generic_signers(generic_path))
    return format_attribution(attribution, ruleset.rules)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.catalog.attribution", description="Regenerate config/rule_attribution.yaml."
    )
    parser.add_argument("--rules", type=Path, action="append", help="rules directory (default: the shipped one)")
    parser.add_argument(
        "--reference", type=Path, help=f"reference folder (default: ${REFERENCE_ENV} or {DEFAULT_REFERENCE_DIR})"
    )
    parser.add_argument("--out", type=Path, default=rule_attribution_file(), help="file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date; write nothing")
    args = parser.parse_args(argv)
    text = generate_attribution(args.rules or [shipped_rules_dir()], reference_dir(args.reference))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m agent.catalog.attribution", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
