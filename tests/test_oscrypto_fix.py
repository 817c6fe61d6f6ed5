"""The oscrypto version-regex hook: signify imports and fully verifies on OpenSSL 3.0.10+."""

from __future__ import annotations

import re
import subprocess
import sys

from agent.compat import oscrypto_fix
from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA


def test_old_regex_fails_and_new_regex_reads_two_digit_patch_versions():
    old = re.search(r"\b(\d\.\d\.\d[a-z]*)\b", "OpenSSL 3.0.19 27 Jan 2026")
    new = re.search(r"\b(\d+\.\d+\.\d+[a-z]*)\b", "OpenSSL 3.0.19 27 Jan 2026")
    assert old is None  # the bug: this is why oscrypto 1.3.0 dies here
    assert new is not None and new.group(1) == "3.0.19"
    assert re.search(r"\b(\d+\.\d+\.\d+[a-z]*)\b", "OpenSSL 1.1.1w  11 Sep 2023").group(1) == "1.1.1w"


def test_patch_source_rewrites_exactly_the_version_regex():
    source = "x = 1\nversion_match = re.search('\\\\b(\\\\d\\\\.\\\\d\\\\.\\\\d[a-z]*)\\\\b', version_string)\n"
    fixed = oscrypto_fix.patch_source(source)
    assert fixed is not None
    assert "\\\\d+\\\\.\\\\d+\\\\.\\\\d+" in fixed
    assert fixed.replace(oscrypto_fix.NEW_PATTERN, oscrypto_fix.OLD_PATTERN) == source
    assert oscrypto_fix.patch_source("nothing to see") is None  # a fixed oscrypto loads unchanged


def test_windows_and_macos_are_left_alone():
    assert oscrypto_fix.needs_hook("win32") is False
    assert oscrypto_fix.needs_hook("darwin") is False
    assert oscrypto_fix.needs_hook("linux") is True
    before = list(sys.meta_path)
    assert oscrypto_fix.install("win32") is False
    assert sys.meta_path == before


def test_fresh_interpreter_imports_signify_and_runs_a_full_verification():
    """A new process, so no earlier import in this test session can hide a failure."""
    code = f"""
import agent.extract
from agent.compat import oscrypto_fix
import signify.authenticode
from signify.authenticode import AuthenticodeFile, TRUSTED_CERTIFICATE_STORE
from signify.x509 import Certificate, CertificateStore
import oscrypto._openssl._libcrypto_ctypes as lc
roots = CertificateStore(list(Certificate.from_pems(open({str(TEST_ROOT_CA)!r}, 'rb').read())), trusted=True)
with open({str(FIXTURES / "files" / "pulseway.exe")!r}, 'rb') as f:
    store = TRUSTED_CERTIFICATE_STORE | roots
    result, exc = AuthenticodeFile.from_stream(f).explain_verify(trusted_certificate_store=store)
print(result.name, lc.version_info[0] >= 1, oscrypto_fix.patched)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    status, version_ok, patched = out.stdout.split(maxsplit=2)
    assert status == "OK"
    assert version_ok == "True"
    assert "_libcrypto_ctypes" in patched


def test_signify_signer_infos_is_memoised_and_unchanged():
    import io

    from signify.authenticode.signed_file.pe import SignedPEFile

    import agent.extract.authenticode  # noqa: F401  (installs the speed-up)
    from agent.compat import signify_speedups

    assert signify_speedups.install() is True  # idempotent
    data = (FIXTURES / "files" / "dual_signed.exe").read_bytes()
    sig = next(SignedPEFile(io.BytesIO(data)).iter_embedded_signatures())
    first = sig.signer_infos
    assert sig.signer_infos is first  # parsed once per SignedData
    assert len(first) == 1 and first[0].program_name == "rmmhunt fixture dual_signed.exe"
