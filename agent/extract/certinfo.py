"""Certificate identity: the signer columns of a row, derived from one X.509 certificate.

Pure functions over DER bytes or asn1crypto objects. The extractor and the catalog report
both call :func:`parse_certificate`, so a LOLRMM certificate and a signed file yield the
same Signer string.
"""

from __future__ import annotations

import functools
import hashlib

from asn1crypto import x509 as asn1_x509

from agent.extract.facts import CertIdentity

# Windows CERT_NAME_SIMPLE_DISPLAY_TYPE walks these attributes in this order and takes the
# first one present (CertGetNameString, wincrypt.h): CN, OU, O, then the RSA email OID.
SIMPLE_DISPLAY_ORDER = ("common_name", "organizational_unit_name", "organization_name", "email_address")

# RFC 4514 section 3: the short names a string representation uses; others print as dotted OIDs.
_RFC4514_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}


def _attribute_text(value: object) -> str:
    native = getattr(value, "native", value)
    if isinstance(native, bytes):
        return native.hex()
    return str(native)


def simple_display_name(name: asn1_x509.Name, alt_emails: tuple[str, ...] = ()) -> str:
    """CERT_NAME_SIMPLE_DISPLAY_TYPE: first CN, else OU, else O, else email; else the SAN
    rfc822Name; else the first attribute of the name; else ''."""
    rdns = list(name.chosen) if name.chosen is not None else []
    flat = [(atv["type"].native, atv["value"]) for rdn in rdns for atv in rdn]
    for wanted in SIMPLE_DISPLAY_ORDER:
        for kind, value in flat:
            if kind == wanted:
                return _attribute_text(value)
    if alt_emails:
        return alt_emails[0]
    return _attribute_text(flat[0][1]) if flat else ""


def _escape_rfc4514(text: str) -> str:
    out = []
    for i, ch in enumerate(text):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and (i == 0 or i == len(text) - 1)):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def rfc4514(name: asn1_x509.Name) -> str:
    """RFC 4514 string: RDNs in reverse order, short names where RFC 4514 defines them,
    dotted OIDs otherwise; string values escaped, non-string values as #hex of their DER."""
    rdns = list(name.chosen) if name.chosen is not None else []
    parts = []
    for rdn in reversed(rdns):
        atvs = []
        for atv in rdn:
            oid = atv["type"].dotted
            key = _RFC4514_NAMES.get(oid, oid)
            value = atv["value"]
            native = value.native
            if isinstance(native, str):
                atvs.append(f"{key}={_escape_rfc4514(native)}")
            else:
                atvs.append(f"{key}=#{value.dump().hex()}")
        parts.append("+".join(atvs))
    return ",".join(parts)


def _crl_urls(cert: asn1_x509.Certificate) -> tuple[str, ...]:
    urls: list[str] = []
    try:
        points = cert.crl_distribution_points
    except Exception:  # malformed extension: the URLs are simply unknown
        return ()
    for point in points:
        try:
            urls.extend(u for u in (point.url,) if u)
        except Exception:
            continue
    return tuple(urls)


def _alt_emails(cert: asn1_x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.subject_alt_name_value
    except Exception:
        return ()
    if san is None:
        return ()
    return tuple(str(g.native) for g in san if g.name == "rfc822_name")


def identity_of(cert: asn1_x509.Certificate) -> CertIdentity:
    tbs = cert["tbs_certificate"]
    validity = tbs["validity"]
    return CertIdentity(
        display_name=simple_display_name(tbs["subject"], _alt_emails(cert)),
        subject=rfc4514(tbs["subject"]),
        issuer_display_name=simple_display_name(tbs["issuer"]),
        issuer=rfc4514(tbs["issuer"]),
        sha1=hashlib.sha1(cert.dump()).hexdigest(),
        serial_number=format(tbs["serial_number"].native, "x"),
        not_before=validity["not_before"].native,
        not_after=validity["not_after"].native,
        crl_urls=_crl_urls(cert),
    )


# The identity memo is bounded by entries and, through the size limit on what it keeps, by
# bytes: at most 1,024 x 16 KiB of keys. Real signer certificates are 1-2 KiB; a larger one
# is parsed every time rather than held.
MEMO_ENTRIES = 1024
MEMO_MAX_DER = 16 * 1024


def parse_certificate(der: bytes) -> CertIdentity:
    """Identity of a DER certificate (memoised: a fleet has few signer certificates).
    Raises ValueError on bytes that are not a certificate."""
    if len(der) <= MEMO_MAX_DER:
        return _parse_certificate_memo(der)
    return _parse_certificate(der)


@functools.lru_cache(maxsize=MEMO_ENTRIES)
def _parse_certificate_memo(der: bytes) -> CertIdentity:
    return _parse_certificate(der)


def _parse_certificate(der: bytes) -> CertIdentity:
    try:
        cert = asn1_x509.Certificate.load(der)
        return identity_of(cert)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a DER X.509 certificate: {exc}") from exc
