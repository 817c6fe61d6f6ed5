"""The evidence bundle: a zip of rows.jsonl, findings.json, stats.json, errors.jsonl,
report.html and manifest.json, optionally AES-encrypted (pyzipper, WinZip AES-256).

``manifest.json`` lists the SHA-256 and size of every other member, and carries
``ManifestSHA256``: the SHA-256 of its own canonical JSON without that key. It is written in
that canonical form (sorted keys, two-space indent, UTF-8, a final newline), so a changed byte
anywhere in it is a mismatch too. ``check_bundle`` verifies all of it; ``iter_bundle_rows``
refuses a bundle that does not verify.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MEMBERS = ("rows.jsonl", "findings.json", "stats.json", "errors.jsonl", "report.html")
BUNDLE_FORMAT = "rmmhunt-sweep-bundle/1"
PASSPHRASE_ENV = "RMMHUNT_BUNDLE_PASSPHRASE"


class BundleError(Exception):
    """The bundle cannot be read or does not verify (one line for the CLI)."""


def canonical_json(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal_manifest(manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> bytes:
    """The manifest with every member's hash and size and its own hash, as canonical bytes."""
    body = dict(manifest)
    body["Format"] = BUNDLE_FORMAT
    body["Members"] = {name: {"SHA256": _sha256(data), "Size": len(data)} for name, data in sorted(members.items())}
    body.pop("ManifestSHA256", None)
    body["ManifestSHA256"] = _sha256(canonical_json(body))
    return canonical_json(body)


def write_bundle(
    path: str | Path, members: Mapping[str, bytes], manifest: Mapping[str, Any], *, passphrase: str = ""
) -> None:
    """Write the zip. With a passphrase every member (the manifest too) is AES-256 encrypted."""
    import pyzipper

    sealed = seal_manifest(manifest, members)
    tmp = Path(str(path) + ".part")
    if passphrase:
        zf: zipfile.ZipFile = pyzipper.AESZipFile(
            tmp, "w", compression=zipfile.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
        )
        zf.setpassword(passphrase.encode("utf-8"))  # type: ignore[attr-defined]
        zf.setencryption(pyzipper.WZ_AES, nbits=256)  # type: ignore[attr-defined]
    else:
        zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED)
    with zf:
        for name in MEMBERS:
            if name in members:
                zf.writestr(name, members[name])
        for name, data in members.items():
            if name not in MEMBERS:
                zf.writestr(name, data)
        zf.writestr(MANIFEST, sealed)
    tmp.replace(path)


@dataclass
class BundleCheck:
    path: str
    encrypted: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def is_encrypted(path: str | Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(info.flag_bits & 0x1 for info in zf.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a readable zip: {exc}") from exc


def _read_members(path: str | Path, passphrase: str) -> dict[str, bytes]:
    import pyzipper

    try:
        with pyzipper.AESZipFile(path) as zf:
            if passphrase:
                zf.setpassword(passphrase.encode("utf-8"))
            names = zf.namelist()
            if len(names) != len(set(names)):
                raise BundleError(f"{path}: duplicate member names")
            return {name: zf.read(name) for name in names}
    except BundleError:
        raise
    except RuntimeError as exc:  # wrong or missing passphrase
        raise BundleError(f"{path}: cannot decrypt: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise BundleError(f"{path}: damaged zip: {exc}") from exc


def check_bundle(path: str | Path, *, passphrase: str = "") -> BundleCheck:
    """Verify a bundle: zip integrity (CRC), the manifest's own hash and canonical form, the
    SHA-256 and size of every member, and no member missing or unlisted. Raises BundleError
    only when the file cannot be read at all (not a zip, wrong passphrase)."""
    check = BundleCheck(str(path), encrypted=is_encrypted(path))
    try:
        members = _read_members(path, passphrase)
    except BundleError as exc:
        if "damaged zip" in str(exc):  # a flipped byte in a member's data fails its CRC
            check.problems.append(str(exc))
            return check
        raise
    check.members = members
    raw = members.get(MANIFEST)
    if raw is None:
        check.problems.append("manifest.json is missing")
        return check
    try:
        manifest = json.loads(raw.decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        check.problems.append(f"manifest.json is not valid JSON: {exc}")
        return check
    check.manifest = manifest
    if canonical_json(manifest) != raw:
        check.problems.append("manifest.json: not in canonical form (changed after sealing)")
    body = {k: v for k, v in manifest.items() if k != "ManifestSHA256"}
    if manifest.get("ManifestSHA256") != _sha256(canonical_json(body)):
        check.problems.append("manifest.json: ManifestSHA256 does not match its content")
    if manifest.get("Format") != BUNDLE_FORMAT:
        check.problems.append(f"manifest.json: unknown Format {manifest.get('Format')!r}")
    listed = manifest.get("Members")
    if not isinstance(listed, dict):
        check.problems.append("manifest.json: no Members table")
        return check
    for name in MEMBERS:
        if name not in listed:
            check.problems.append(f"{name}: not listed in the manifest")
    for name, expected in sorted(listed.items()):
        data = members.get(name)
        if data is None:
            check.problems.append(f"{name}: listed in the manifest but missing from the bundle")
            continue
        if not isinstance(expected, dict) or expected.get("SHA256") != _sha256(data):
            check.problems.append(f"{name}: SHA-256 mismatch")
        elif expected.get("Size") != len(data):
            check.problems.append(f"{name}: size mismatch")
    for name in sorted(set(members) - set(listed) - {MANIFEST}):
        check.problems.append(f"{name}: in the bundle but not in the manifest")
    return check


def iter_bundle_rows(path: str | Path, *, passphrase: str = "") -> Iterator[dict[str, Any]]:
    """Verify the bundle, then yield its rows (rows.jsonl) as dicts: Defender's PascalCase
    columns, datetimes as ISO 8601 UTC strings with Z, FolderPath/FileName in the reversible
    percent escape of agent/textenc (``unescape_path`` gives the original). Raises BundleError
    before yielding anything when the bundle fails verification."""
    check = check_bundle(path, passphrase=passphrase)
    if not check.ok:
        raise BundleError(f"{path}: bundle does not verify: {'; '.join(check.problems)}")
    for n, line in enumerate(io.BytesIO(check.members["rows.jsonl"]), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BundleError(f"{path}: rows.jsonl line {n}: {exc}") from exc
        yield row
