"""The committed fixtures agree with their manifest, checked with real signify parsing.

tests/fixtures/manifest.json is the contract other tests build on (extractor, rows, rules):
every file under tests/fixtures/files/ is listed with why it exists and what a correct
extractor must read from it. Regenerate with ``make fixtures``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.compat import oscrypto_fix

oscrypto_fix.install()

from asn1crypto import x509 as asn1_x509  # noqa: E402
from signify.authenticode import AuthenticodeFile, AuthenticodeSignature  # noqa: E402
from signify.exceptions import AuthenticodeNotSignedError, ParseError, SignifyError  # noqa: E402
from signify.x509 import Certificate, CertificateStore  # noqa: E402

from agent.extract.certinfo import CertIdentity, identity_of  # noqa: E402

log = logging.getLogger(__name__)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FILES = FIXTURES / "files"
PKI = FIXTURES / "pki"
MANIFEST_PATH = FIXTURES / "manifest.json"

KINDS = {"PE", "MSI", "TEXT"}
STATUSES = {"OK", "NOT_SIGNED", "NOT_PE", "PARSE_ERROR"}
OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
REQUIRED_KEYS = {
    "path",
    "kind",
    "status",
    "signers",
    "digest_valid",
    "trusted_with_test_root",
    "countersignature_time",
    "sha256",
    "why",
}


def load_manifest() -> list[dict[str, Any]]:
    with MANIFEST_PATH.open(encoding="utf-8") as f:
        entries = json.load(f)
    assert isinstance(entries, list)
    return entries


MANIFEST = load_manifest()


def _entries(*statuses: str) -> list[Any]:
    return [pytest.param(e, id=e["path"]) for e in MANIFEST if not statuses or e["status"] in statuses]


def _read(entry: dict[str, Any]) -> bytes:
    return (FIXTURES / entry["path"]).read_bytes()


def _signer_certificate(signature: AuthenticodeSignature) -> asn1_x509.Certificate:
    info = signature.signer_info
    cert = signature.certificates.find_certificate(issuer=info.issuer, serial_number=info.serial_number)
    return cert.asn1


def _test_root_store() -> CertificateStore:
    root = Certificate.from_pem((PKI / "root-ca.pem").read_bytes())
    return CertificateStore([root], trusted=True)


def _security_directory(data: bytes) -> tuple[int, int]:
    """(file offset, size) of the PE certificate table, from the data directory."""
    e_lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    opt = e_lfanew + 4 + 20
    magic = struct.unpack_from("<H", data, opt)[0]
    offset, size = struct.unpack_from("<II", data, opt + (128 if magic == 0x10B else 144))
    return int(offset), int(size)


# ----------------------------------------------------------------- manifest <-> disk


def test_manifest_has_no_orphan_or_missing_files() -> None:
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FILES.rglob("*") if p.is_file()}
    listed = [e["path"] for e in MANIFEST]
    assert len(listed) == len(set(listed)), "duplicate paths in manifest.json"
    orphans = sorted(on_disk - set(listed))
    missing = sorted(set(listed) - on_disk)
    assert not orphans, f"files not in manifest.json (add an entry with a why, or delete them): {orphans}"
    assert not missing, f"manifest.json lists files that do not exist (run `make fixtures`): {missing}"


def test_pki_folder_holds_only_public_certificates() -> None:
    for path in FIXTURES.rglob("*"):
        if path.is_file() and path.suffix in {".pem", ".key", ".p12", ".pfx", ".der"}:
            assert path.parent == PKI, f"key material outside pki/: {path}"
            assert b"PRIVATE KEY" not in path.read_bytes(), f"private key committed: {path}"


def test_test_root_signs_the_intermediate() -> None:
    root = Certificate.from_pem((PKI / "root-ca.pem").read_bytes()).asn1
    inter = Certificate.from_pem((PKI / "intermediate-ca.pem").read_bytes()).asn1
    assert root.self_signed in ("maybe", "yes")
    assert root.ca and inter.ca
    assert inter.issuer == root.subject
    assert inter.authority_key_identifier == root.key_identifier


@pytest.mark.parametrize("entry", _entries())
def test_entry_is_well_formed(entry: dict[str, Any]) -> None:
    assert REQUIRED_KEYS <= entry.keys(), f"missing keys: {REQUIRED_KEYS - entry.keys()}"
    assert entry["path"].startswith("files/")
    assert entry["kind"] in KINDS
    assert entry["status"] in STATUSES
    assert isinstance(entry["why"], str) and entry["why"].strip(), "every fixture needs a why"
    if entry["status"] == "OK":
        assert entry["signers"], "a signed fixture names its signers"
        assert entry["digest_valid"] in (True, False)
        assert entry["trusted_with_test_root"] in (True, False)
        for key in ("signer_subjects", "signer_thumbprints", "signer_serial_numbers", "issuers", "program_names"):
            assert len(entry[key]) == len(entry["signers"]), key
    else:
        assert entry["signers"] == []
        assert entry["digest_valid"] is None and entry["trusted_with_test_root"] is None
        assert entry["countersignature_time"] is None
    if entry["status"] == "NOT_PE":
        assert entry["kind"] == "TEXT"


@pytest.mark.parametrize("entry", _entries())
def test_hashes_and_size_match(entry: dict[str, Any]) -> None:
    data = _read(entry)
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    if "sha1" in entry:
        assert hashlib.sha1(data).hexdigest() == entry["sha1"]
    if "size" in entry:
        assert len(data) == entry["size"]


@pytest.mark.parametrize("entry", _entries())
def test_kind_matches_content(entry: dict[str, Any]) -> None:
    data = _read(entry)
    is_pe = data[:2] == b"MZ" and len(data) >= 0x40 and data[struct.unpack_from("<I", data, 0x3C)[0] :][:4] == b"PE\0\0"
    is_msi = data[:8] == OLE_MAGIC
    assert (entry["kind"] == "PE") == is_pe
    assert (entry["kind"] == "MSI") == is_msi


def test_every_status_is_covered() -> None:
    assert {e["status"] for e in MANIFEST} == STATUSES


# ----------------------------------------------------------------- signify reads the facts


@dataclass(frozen=True)
class SignifyView:
    """What signify (real parsing, no mocks) sees in one signed fixture."""

    identities: tuple[CertIdentity, ...]  # per signature, nested included, in file order
    program_names: tuple[str | None, ...]
    countersignature_times: tuple[datetime | None, ...]
    digests_valid: tuple[bool, ...]
    with_test_root: str  # AuthenticodeVerificationResult name
    with_test_root_all: str  # the same, but every signature must verify
    with_default_roots: str


def _countersignature_time(signature: AuthenticodeSignature) -> datetime | None:
    countersigner = signature.signer_info.countersigner
    return None if countersigner is None else countersigner.signing_time


@functools.cache
def signify_view(rel_path: str) -> SignifyView:
    with (FIXTURES / rel_path).open("rb") as f:
        signed = AuthenticodeFile.from_stream(f)
        signatures = list(signed.iter_embedded_signatures(include_nested=True, ignore_parse_errors=False))
        store = _test_root_store()
        return SignifyView(
            identities=tuple(identity_of(_signer_certificate(sig)) for sig in signatures),
            program_names=tuple(sig.signer_info.program_name for sig in signatures),
            countersignature_times=tuple(_countersignature_time(sig) for sig in signatures),
            digests_valid=tuple(
                signed.get_fingerprint(sig.indirect_data.digest_algorithm) == sig.indirect_data.digest
                for sig in signatures
            ),
            with_test_root=signed.explain_verify(trusted_certificate_store=store)[0].name,
            with_test_root_all=signed.explain_verify(trusted_certificate_store=store, multi_verify_mode="all")[0].name,
            with_default_roots=signed.explain_verify()[0].name,
        )


@pytest.mark.parametrize("entry", _entries("OK"))
def test_signify_reads_the_expected_signers(entry: dict[str, Any]) -> None:
    view = signify_view(entry["path"])
    assert [i.display_name for i in view.identities] == entry["signers"]
    assert [i.subject for i in view.identities] == entry["signer_subjects"]
    assert [i.sha1 for i in view.identities] == entry["signer_thumbprints"]
    assert [i.serial_number for i in view.identities] == entry["signer_serial_numbers"]
    assert [i.issuer_display_name for i in view.identities] == entry["issuers"]
    assert [list(i.crl_urls) for i in view.identities] == entry["crl_urls"]
    assert list(view.program_names) == entry["program_names"]


@pytest.mark.parametrize("entry", _entries("OK"))
def test_countersignature_time(entry: dict[str, Any]) -> None:
    view = signify_view(entry["path"])
    expected = entry["countersignature_time"]
    primary = view.countersignature_times[0]
    assert primary == (datetime.fromisoformat(expected) if expected else None)


@pytest.mark.parametrize("entry", _entries("OK"))
def test_digest_and_trust_with_the_test_root(entry: dict[str, Any]) -> None:
    view = signify_view(entry["path"])
    assert all(view.digests_valid) is entry["digest_valid"]
    assert view.with_test_root == entry["verification_with_test_root"]
    assert (view.with_test_root == "OK") is entry["trusted_with_test_root"]
    if entry["trusted_with_test_root"]:
        # every signature holds on its own, nested ones included
        assert view.with_test_root_all == "OK"


@pytest.mark.parametrize("entry", _entries("OK"))
def test_nothing_is_trusted_by_the_default_roots(entry: dict[str, Any]) -> None:
    # The throwaway root is in no real store: a fixture that verified here would mean a leaked trust anchor.
    assert entry["trusted_with_default_roots"] is False
    assert signify_view(entry["path"]).with_default_roots != "OK"


def test_flipped_byte_keeps_its_signer_but_fails_verification() -> None:
    entry = next(e for e in MANIFEST if e["path"] == "files/flipped_byte.exe")
    view = signify_view(entry["path"])
    assert [i.display_name for i in view.identities] == ["MMSoft Design Ltd."]
    assert view.digests_valid == (False,)
    assert view.with_test_root != "OK"


def test_dual_signed_lists_primary_then_nested() -> None:
    view = signify_view("files/dual_signed.exe")
    assert [i.display_name for i in view.identities] == ["Contoso Benign Tools Ltd.", "MMSoft Design Ltd."]


# ----------------------------------------------------------------- unsigned, not PE, malformed


@pytest.mark.parametrize("entry", _entries("NOT_SIGNED"))
def test_not_signed_opens_but_has_no_signature(entry: dict[str, Any]) -> None:
    data = _read(entry)
    if entry["kind"] == "PE":
        assert _security_directory(data) == (0, 0)
    with (FIXTURES / entry["path"]).open("rb") as f:
        signed = AuthenticodeFile.from_stream(f)
        if entry["kind"] == "MSI":
            # Unlike for PEs, signify raises for an MSI without a DigitalSignature stream, even when
            # told to ignore parse errors; the extractor must map that to NOT_SIGNED.
            with pytest.raises(AuthenticodeNotSignedError):
                list(signed.iter_embedded_signatures())
        else:
            assert list(signed.iter_embedded_signatures()) == []
        assert signed.explain_verify()[0].name == "NOT_SIGNED"


@pytest.mark.parametrize("entry", _entries("NOT_PE"))
def test_not_pe_is_rejected_by_signify(entry: dict[str, Any]) -> None:
    with (FIXTURES / entry["path"]).open("rb") as f, pytest.raises(ParseError):
        AuthenticodeFile.from_stream(f)


@pytest.mark.parametrize("entry", _entries("PARSE_ERROR"))
def test_parse_error_fixtures_are_malformed(entry: dict[str, Any]) -> None:
    data = _read(entry)
    offset, size = _security_directory(data)
    assert size > 0, "a PARSE_ERROR PE claims a certificate table"
    with (FIXTURES / entry["path"]).open("rb") as f:
        signed = AuthenticodeFile.from_stream(f)
        if offset + size > len(data):
            # signify drops a table that runs past EOF and reports the same error as for an unsigned
            # file, so the extractor must look at the data directory itself to say PARSE_ERROR.
            assert signed.explain_verify()[0].name == "NOT_SIGNED"
        else:
            with pytest.raises((SignifyError, ValueError)):
                list(signed.iter_embedded_signatures(ignore_parse_errors=False))
        assert signed.explain_verify()[0].name != "OK"


def test_truncated_certtable_points_past_eof() -> None:
    data = (FILES / "truncated_certtable.exe").read_bytes()
    offset, size = _security_directory(data)
    assert offset < len(data) < offset + size


def test_readme_describes_every_fixture() -> None:
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    undocumented = [e["path"] for e in MANIFEST if f"`{Path(e['path']).name}`" not in readme]
    assert not undocumented, f"add these to tests/fixtures/README.md: {undocumented}"
