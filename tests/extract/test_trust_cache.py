"""Issue 12: the verification caches (root index, chain cache, certificate and key memos)
never let one certificate, key, usage or moment reuse another's outcome, and they give
signify's own answer. Real signify, certvalidator and OpenSSL on the signed fixtures."""

from __future__ import annotations

import datetime as dt
import hashlib
import io

import pytest
from asn1crypto import cms

from agent.extract import authenticode  # first: makes signify importable (agent.compat.oscrypto_fix)
from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots
from agent.extract.trust import CertMemo, issuer_and_subject
from tests.conftest import FIXTURES, TEST_ROOT_CA
from tests.extract.pe_surgery import der_tlv, first_pkcs7, win_certificate, with_table

# signify, through the module that made it importable
Certificate = authenticode.Certificate
CertificateVerificationError = authenticode.CertificateVerificationError
SignedPEFile = authenticode.SignedPEFile
VerificationContext = authenticode.VerificationContext
signify_speedups = authenticode.signify_speedups

SIGNED = ["pulseway.exe", "dwservice.exe", "alpemix.exe", "timestamped.exe", "dual_signed.exe", "pe64.exe"]


def _fixture(name: str) -> bytes:
    return (FIXTURES / "files" / name).read_bytes()


def _facts(data: bytes, verifier: TrustVerifier):
    return extract_stream(io.BytesIO(data), len(data), verifier=verifier)


def _signature(data: bytes):
    return next(SignedPEFile(io.BytesIO(data)).iter_embedded_signatures())


def _leaf(sig) -> Certificate:
    si = sig.signer_info
    return sig.certificates.find_certificate(issuer=si.issuer, serial_number=si.serial_number)


def _intermediate_der(data: bytes) -> bytes:
    """The DER of the certificate that issued the signer's certificate (not a root)."""
    sig = _signature(data)
    leaf = _leaf(sig)
    (issuer,) = [c for c in sig.certificates if c.subject == leaf.issuer and c != leaf]
    assert issuer.subject != issuer.issuer
    return issuer.to_der


def _with_certificates(data: bytes, keep) -> bytes:
    """The file with its signature's certificate set filtered (the signature stays valid:
    the certificates are outside what is signed and outside the file digest)."""
    info = cms.ContentInfo.load(first_pkcs7(data))
    signed = info["content"]
    parts = []
    for name in ("version", "digest_algorithms", "encap_content_info", "certificates", "signer_infos"):
        if name == "certificates":
            kept = b"".join(c.dump() for c in signed["certificates"] if keep(c.chosen.dump()))
            parts.append(der_tlv(0xA0, kept))
        else:
            parts.append(signed[name].dump())
    pkcs7 = der_tlv(0x30, info["content_type"].dump() + der_tlv(0xA0, der_tlv(0x30, b"".join(parts))))
    return with_table(data, win_certificate(pkcs7))


@pytest.fixture()
def verifier() -> TrustVerifier:
    return TrustVerifier(load_roots([TEST_ROOT_CA]))


def _reference(verifier: TrustVerifier, sig, cert: Certificate, **kwargs) -> list[str] | str:
    """signify's own answer, uncached: the chain's thumbprints or the error text."""
    ctx = VerificationContext(verifier.store, sig.certificates, **kwargs)
    try:
        return [c.sha1_fingerprint for c in ctx.verify(cert)]
    except CertificateVerificationError as exc:
        return str(exc)


def _ours(verifier: TrustVerifier, sig, cert: Certificate, **kwargs) -> list[str] | str:
    ctx = authenticode._CachedChainContext(verifier, verifier.store, sig.certificates, **kwargs)
    try:
        return [c.sha1_fingerprint for c in ctx.verify(cert)]
    except CertificateVerificationError as exc:
        return str(exc)


@pytest.mark.parametrize("name", SIGNED)
def test_chains_are_signifys_on_a_miss_and_on_a_hit(name):
    with_root = TrustVerifier(load_roots([TEST_ROOT_CA]))
    without = TrustVerifier()  # the chain cannot reach a trusted root: decided on the full index
    sig = _signature(_fixture(name))
    leaf = _leaf(sig)
    for verifier in (with_root, without):
        expected = _reference(verifier, sig, leaf, extended_key_usages=["code_signing"])
        misses = verifier.cache_misses
        assert _ours(verifier, sig, leaf, extended_key_usages=["code_signing"]) == expected
        assert _ours(verifier, sig, leaf, extended_key_usages=["code_signing"]) == expected
        assert verifier.cache_misses == misses + 1 and verifier.cache_hits >= 1
    assert isinstance(_reference(with_root, sig, leaf, extended_key_usages=["code_signing"]), list)
    assert isinstance(_reference(without, sig, leaf, extended_key_usages=["code_signing"]), str)


def test_a_tampered_intermediate_never_reuses_the_genuine_outcome(verifier):
    data = _fixture("pulseway.exe")
    genuine = _intermediate_der(data)
    tampered = genuine[:-5] + bytes([genuine[-5] ^ 0x01]) + genuine[-4:]  # inside its signature
    bad = data.replace(genuine, tampered)
    assert bad != data and len(bad) == len(data)
    assert _facts(data, verifier).signatures[0].is_trusted  # the genuine chain is cached
    (sig,) = _facts(bad, verifier).signatures
    assert sig.digest_valid is True  # the file is intact; only the chain certificate changed
    assert sig.is_trusted is False and sig.verification_status == "CERTIFICATE_ERROR"
    assert "signature" in sig.verification_error
    assert _facts(data, verifier).signatures[0].is_trusted  # and the genuine one still is


def test_certificates_offered_by_one_file_never_help_another(verifier):
    """certvalidator adds a file's certificates to its registry: the shared root index must
    come out of every validation unchanged, or a file without its intermediate would chain
    through the one another file offered."""
    data = _fixture("pulseway.exe")
    intermediate = _intermediate_der(data)
    stripped = _with_certificates(data, lambda der: der != intermediate)
    assert _facts(data, verifier).signatures[0].is_trusted
    (sig,) = _facts(stripped, verifier).signatures
    assert sig.digest_valid is True
    assert sig.is_trusted is False and sig.verification_status == "CERTIFICATE_ERROR"
    reference = _reference(verifier, _signature(stripped), _leaf(_signature(stripped)))
    assert isinstance(reference, str) and sig.verification_error.endswith(reference.split(": ", 1)[1])


def test_a_moment_outside_a_validity_period_is_never_answered_from_the_cache(verifier):
    sig = _signature(_fixture("pulseway.exe"))
    leaf = _leaf(sig)
    usage = {"extended_key_usages": ["code_signing"]}
    assert isinstance(_ours(verifier, sig, leaf, **usage), list)  # now: cached as good
    for moment in (leaf.valid_to + dt.timedelta(days=1), leaf.valid_from - dt.timedelta(days=1)):
        expected = _reference(verifier, sig, leaf, timestamp=moment, **usage)
        assert isinstance(expected, str) and ("expired" in expected or "not valid until" in expected)
        assert _ours(verifier, sig, leaf, timestamp=moment, **usage) == expected
        assert _ours(verifier, sig, leaf, timestamp=moment, **usage) == expected  # cached failure
    inside = leaf.valid_from + (leaf.valid_to - leaf.valid_from) / 2
    assert _ours(verifier, sig, leaf, timestamp=inside, **usage) == _reference(
        verifier, sig, leaf, timestamp=inside, **usage
    )


def test_a_different_usage_is_decided_again(verifier):
    sig = _signature(_fixture("pulseway.exe"))
    leaf = _leaf(sig)
    assert isinstance(_ours(verifier, sig, leaf, extended_key_usages=["code_signing"]), list)
    for usage in (
        {"extended_key_usages": ["time_stamping"]},
        {"extended_key_usages": ["code_signing"], "key_usages": ["key_encipherment"], "optional_ku": False},
        {"extended_key_usages": ["server_auth"], "optional_eku": False},
    ):
        expected = _reference(verifier, sig, leaf, **usage)
        assert isinstance(expected, str), usage  # the leaf is for code signing only
        assert _ours(verifier, sig, leaf, **usage) == expected
    assert isinstance(_ours(verifier, sig, leaf, extended_key_usages=["code_signing"]), list)


def test_a_trust_list_date_is_the_chains_expiry_of_trust():
    verifier = TrustVerifier()
    dated = None
    for store in authenticode.flatten_stores([verifier.store]):
        if store.ctl is None or isinstance(store.ctl, dict):
            continue
        for cert in store:
            subject = store.ctl.find_subject(cert)
            if subject is not None and subject.disallowed_filetime is not None:
                dated = (cert, subject.disallowed_filetime)
                break
    assert dated, "the Microsoft trust list has roots with a DisallowedFiletime"
    cert, when = dated
    assert verifier.trusted_until(cert) == when
    test_root = next(iter(load_roots([TEST_ROOT_CA])))
    assert TrustVerifier([test_root]).trusted_until(test_root) is None  # a configured root: no dates


def test_the_roots_are_found_from_the_raw_names():
    verifier = TrustVerifier()
    roots = list(verifier.store)
    assert len(roots) > 100
    for cert in roots:
        assert issuer_and_subject(cert.to_der) == (cert.asn1.issuer.dump(), cert.asn1.subject.dump())
    assert issuer_and_subject(b"\x30\x03\x02\x01\x00") is None
    assert issuer_and_subject(b"") is None
    assert issuer_and_subject(roots[0].to_der[:40]) is None


def test_membership_in_the_trusted_store_is_exact(verifier):
    sig = _signature(_fixture("pulseway.exe"))
    root = next(iter(load_roots([TEST_ROOT_CA])))
    assert verifier.store.is_trusted(root)
    assert not any(verifier.store.is_trusted(c) for c in sig.certificates if c != root)
    twin = Certificate.from_der(root.to_der[:-1] + bytes([root.to_der[-1] ^ 1]))  # same name, same key
    assert twin.subject == root.subject and not verifier.store.is_trusted(twin)


def test_the_certificate_memo_is_bounded_by_entries_and_bytes():
    certs = list(TrustVerifier().store)[:50]
    memo = CertMemo(entries=10, max_bytes=1 << 30)
    for cert in certs:
        memo.facts(cert)
    assert len(memo) == 10
    small = CertMemo(entries=1000, max_bytes=5000)
    for cert in certs:
        assert small.facts(cert).sha256 == hashlib.sha256(cert.to_der).digest()
    assert small.bytes <= 5000 and len(small) < 50


def test_public_keys_and_extensions_memos_are_bounded_and_keyed_by_exact_der(verifier):
    assert signify_speedups.install() is True
    signify_speedups.public_keys.clear()
    for name in SIGNED:
        assert _facts(_fixture(name), verifier).signatures[0].is_trusted
    assert 0 < len(signify_speedups.public_keys) <= signify_speedups.MEMO_ENTRIES
    assert len(signify_speedups.extensions) <= signify_speedups.MEMO_ENTRIES
    leaf = _leaf(_signature(_fixture("pulseway.exe")))
    got = leaf.extensions
    got["extended_key_usage"] = ["changed"]  # a caller's copy: the memo is not poisoned
    assert leaf.extensions["extended_key_usage"] != ["changed"]
    # a key that differs by one bit is loaded, not taken from the memo, and fails
    data = _fixture("pulseway.exe")
    leaf_der = leaf.to_der
    key_at = leaf_der.find(leaf.asn1.public_key.dump())
    other = bytearray(leaf_der)
    other[key_at + len(leaf.asn1.public_key.dump()) - 3] ^= 0x01
    bad = data.replace(leaf_der, bytes(other))
    (sig,) = _facts(bad, verifier).signatures
    assert sig.is_trusted is False and sig.verification_status != "OK"


def test_name_equality_falls_back_to_signify_for_other_encodings():
    from asn1crypto import x509 as asn1_x509
    from signify.x509 import CertificateName  # after agent.extract (see the imports)

    printable = asn1_x509.Name.build({"common_name": "Example Root", "country_name": "US"}, use_printable=True)
    utf8 = asn1_x509.Name.build({"common_name": "Example Root", "country_name": "US"})
    assert printable.dump() != utf8.dump()
    a, b = CertificateName(printable), CertificateName(utf8)
    assert a == b and signify_speedups._original_name_eq(a, b)  # same text, other string type
    lower = CertificateName(asn1_x509.Name.build({"common_name": "example root", "country_name": "US"}))
    assert (a == lower) == signify_speedups._original_name_eq(a, lower)
    c = CertificateName(asn1_x509.Name.build({"common_name": "Example Root 2", "country_name": "US"}))
    assert not a == c and not signify_speedups._original_name_eq(a, c)
    assert a == CertificateName(asn1_x509.Name.load(printable.dump()))
