"""The extractor on every generated fixture (real signify parsing), plus mutations."""

from __future__ import annotations

import datetime as dt
import io
import random

import pytest

from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots
from agent.schema import FILE_STATUSES
from tests.conftest import FIXTURES, TEST_ROOT_CA, fixture_entry, manifest


@pytest.fixture(scope="module")
def verifier() -> TrustVerifier:
    return TrustVerifier(load_roots([TEST_ROOT_CA]))


def _extract(name: str, verifier: TrustVerifier | None):
    data = (FIXTURES / "files" / name).read_bytes()
    return extract_stream(io.BytesIO(data), len(data), verifier=verifier)


@pytest.mark.parametrize("entry", manifest(), ids=lambda e: e["path"])
def test_every_fixture_matches_its_manifest_entry(entry, verifier):
    facts = _extract(entry["path"].split("/", 1)[1], verifier)
    assert facts.status == entry["status"], facts.detail
    assert [s.signer.display_name for s in facts.signatures] == entry["signers"]
    if entry["status"] == "OK":
        assert [s.signer.sha1 for s in facts.signatures] == entry["signer_thumbprints"]
        assert [s.signer.serial_number for s in facts.signatures] == entry["signer_serial_numbers"]
        assert facts.sha256 == entry["sha256"] and facts.sha1 == entry["sha1"]
        assert all(s.digest_valid == entry["digest_valid"] for s in facts.signatures)
        assert all(s.is_trusted == entry["trusted_with_test_root"] for s in facts.signatures)
        assert facts.kind == entry["kind"]


def test_dual_signed_yields_both_signers_with_the_nested_index():
    facts = _extract("dual_signed.exe", None)
    assert [(s.index, s.signer.display_name) for s in facts.signatures] == [
        (0, "Contoso Benign Tools Ltd."),
        (1, "MMSoft Design Ltd."),
    ]


def test_msi_signer_is_read():
    facts = _extract("signed.msi", None)
    assert facts.kind == "MSI" and facts.status == "OK"
    assert [s.signer.display_name for s in facts.signatures] == ["MMSoft Design Ltd."]


def test_flipped_byte_keeps_the_signer_but_is_not_trusted(verifier):
    facts = _extract("flipped_byte.exe", verifier)
    (sig,) = facts.signatures
    assert sig.signer.display_name == "MMSoft Design Ltd."
    assert sig.digest_valid is False
    assert sig.is_trusted is False
    assert sig.verification_status == "INVALID_DIGEST"


def test_truncated_certificate_table_is_a_parse_error():
    facts = _extract("truncated_certtable.exe", None)
    assert facts.status == "PARSE_ERROR"
    assert "certificate table" in facts.detail


def test_countersignature_time_is_read():
    facts = _extract("timestamped.exe", None)
    expected = fixture_entry("timestamped.exe")["countersignature_time"]
    assert facts.signatures[0].countersignature_time == dt.datetime.fromisoformat(expected)


def test_without_the_test_root_nothing_is_trusted():
    facts = _extract("pulseway.exe", TrustVerifier())
    (sig,) = facts.signatures
    assert sig.digest_valid is True
    assert sig.is_trusted is False
    assert sig.verification_status == "CERTIFICATE_ERROR"


def test_signer_only_mode_does_not_hash():
    facts = _extract("pulseway.exe", None)
    assert facts.sha256 == "" and facts.signatures[0].verification_status == "NOT_VERIFIED"
    assert facts.signatures[0].digest_valid is None


def test_chain_results_are_cached_per_chain():
    verifier = TrustVerifier(load_roots([TEST_ROOT_CA]))
    _extract("pulseway.exe", verifier)
    misses = verifier.cache_misses
    assert misses >= 1 and verifier.cache_hits == 0
    again = _extract("pe64.exe", verifier)  # same signer certificate, different file
    assert again.signatures[0].is_trusted
    assert verifier.cache_misses == misses
    assert verifier.cache_hits >= 1


def test_content_not_extension_decides():
    assert _extract("content_sniff.dat", None).status == "OK"
    assert _extract("text.exe", None).status == "NOT_PE"


def test_signer_extraction_reads_only_headers_and_the_certificate_table():
    data = (FIXTURES / "files" / "pulseway.exe").read_bytes()

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            chunk = super().read(n)
            Counting.read_bytes += len(chunk)
            return chunk

    from agent.extract.sniff import read_pe_header

    pe = read_pe_header(io.BytesIO(data), len(data), data[:64])
    assert pe is not None and pe.cert_table_offset > 1024  # code and data lie between headers and table
    stream = Counting(data)
    facts = extract_stream(stream, len(data), verifier=None)
    assert facts.status == "OK"
    # the headers (well under 1 KiB) plus the certificate table: never the sections in between
    assert Counting.read_bytes <= pe.cert_table_size + 1024
    assert Counting.read_bytes < len(data)


@pytest.mark.parametrize("seed", range(6))
def test_mutated_inputs_always_end_in_a_status(seed, verifier):
    """Flip and truncate bytes of signed fixtures: never an exception, always a known status."""
    rng = random.Random(seed)
    names = ["pulseway.exe", "dual_signed.exe", "timestamped.exe", "signed.msi", "pe64.exe"]
    for _ in range(40):
        data = bytearray((FIXTURES / "files" / rng.choice(names)).read_bytes())
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        facts = extract_stream(io.BytesIO(bytes(data)), len(data), verifier=verifier)
        assert facts.status in FILE_STATUSES
