"""Stream in, facts out. Importing this package makes signify importable on OpenSSL 3.0.10+."""

from __future__ import annotations

from agent.compat import oscrypto_fix

oscrypto_fix.install()
