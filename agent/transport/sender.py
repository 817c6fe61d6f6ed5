"""Forwarding: enrol once, then send the outbox in gzip JSON batches with httpx.

- HTTPS with certificate verification (a custom CA file is allowed); plain http:// only to a
  loopback address.
- The node key is kept in the state directory (``collector.json``, mode 0600).
- A batch is deleted from the outbox only after the collector acknowledged it. Ingest is
  idempotent on (DeviceId, ReportId), so a batch resent after a crash is never counted twice.
- Failures back off exponentially with full jitter.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent.transport.outbox import FORWARD_MODES

log = logging.getLogger(__name__)

NODE_KEY_FILE = "collector.json"
BATCH_ROWS = 1000
BATCH_BYTES = 2 * 1024 * 1024  # uncompressed JSON; the collector accepts 64 MiB


class ForwardError(Exception):
    """A forwarding problem to report in one line (bad setting, collector refusal, network)."""


@dataclass(frozen=True)
class ForwardConfig:
    url: str
    enroll_secret: str
    ca_file: str | None
    forward: str
    max_outbox_bytes: int


def forward_config(settings: Any, env: Mapping[str, str] | None = None) -> ForwardConfig:
    """The [collector] settings. The ONE place that reads them: Settings.collector_* once the
    config branch declares them (getattr defaults until then), else the environment
    (RMMHUNT_COLLECTOR_URL, RMMHUNT_ENROLL_SECRET, RMMHUNT_COLLECTOR_CA_FILE,
    RMMHUNT_COLLECTOR_FORWARD, RMMHUNT_COLLECTOR_MAX_OUTBOX_BYTES)."""
    env = os.environ if env is None else env
    url = getattr(settings, "collector_url", "") or env.get("RMMHUNT_COLLECTOR_URL", "")
    secret = getattr(settings, "collector_enroll_secret", "") or env.get("RMMHUNT_ENROLL_SECRET", "")
    ca_file = getattr(settings, "collector_ca_file", None) or env.get("RMMHUNT_COLLECTOR_CA_FILE") or None
    forward = getattr(settings, "collector_forward", "") or env.get("RMMHUNT_COLLECTOR_FORWARD", "") or "hits"
    max_bytes_raw = getattr(settings, "collector_max_outbox_bytes", None) or env.get(
        "RMMHUNT_COLLECTOR_MAX_OUTBOX_BYTES", str(256 * 1024 * 1024)
    )
    if forward not in FORWARD_MODES:
        raise ForwardError(f"collector forward: expected one of {', '.join(FORWARD_MODES)}, got {forward!r}")
    try:
        max_bytes = int(max_bytes_raw)
    except ValueError as exc:
        raise ForwardError(f"collector max_outbox_bytes: not an integer: {max_bytes_raw!r}") from exc
    return ForwardConfig(str(url), str(secret), str(ca_file) if ca_file else None, forward, max_bytes)


def check_url(url: str) -> str:
    """The collector base URL, refused unless https, or http to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ForwardError(f"collector url: expected https://HOST[:PORT], got {url!r}")
    if parts.scheme == "http":
        host = parts.hostname
        loopback = host == "localhost"
        try:
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        if not loopback:
            raise ForwardError(f"collector url: plain http is only allowed to a loopback address, not {host}")
    return url.rstrip("/")


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 300.0, rnd: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rnd or random).uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Sender:
    def __init__(
        self,
        config: ForwardConfig,
        state_dir: Path,
        device_id: str,
        device_name: str,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.url = check_url(config.url)
        self.state_dir = Path(state_dir)
        self.device_id = device_id
        self.device_name = device_name
        verify: Any = True
        if config.ca_file:
            if not Path(config.ca_file).is_file():
                raise ForwardError(f"collector ca_file: no such file: {config.ca_file}")
            import ssl

            verify = ssl.create_default_context(cafile=config.ca_file)
        self.client = httpx.Client(verify=verify, timeout=timeout, headers={"User-Agent": "rmmhunt-agent"})
        self.batch_rows = BATCH_ROWS  # halved while the collector refuses a batch as too large or malformed

    def close(self) -> None:
        self.client.close()

    # --- enrolment
    @property
    def key_path(self) -> Path:
        return self.state_dir / NODE_KEY_FILE

    def node_key(self, *, renew: bool = False) -> str:
        if not renew:
            try:
                saved = json.loads(self.key_path.read_text(encoding="utf-8"))
                if saved.get("url") == self.url and saved.get("device_id") == self.device_id:
                    return str(saved["node_key"])
            except (OSError, ValueError, KeyError, AttributeError):
                pass
        if not self.config.enroll_secret:
            raise ForwardError("collector enroll_secret: not set (RMMHUNT_ENROLL_SECRET or the config file)")
        response = self._post_json(
            "/api/v1/enroll",
            {"enroll_secret": self.config.enroll_secret, "device_id": self.device_id, "device_name": self.device_name},
        )
        if response.status_code != 200:
            raise ForwardError(f"{self.url}: enrolment refused: {response.status_code} {_reason(response)}")
        key = str(response.json()["node_key"])
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self.key_path, json.dumps({"url": self.url, "device_id": self.device_id, "node_key": key}))
        log.info("enrolled with %s as %s", self.url, self.device_id)
        return key

    def _post_json(self, path: str, body: Any, *, gzipped: bool = False) -> httpx.Response:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if gzipped:
            data = gzip.compress(data, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        try:
            return self.client.post(self.url + path, content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise ForwardError(f"{self.url}: {exc}") from exc

    # --- sending
    def send_batch(self, store: Any) -> int:
        """Send the oldest outbox batch; returns the rows acknowledged (0: the outbox is empty)."""
        entries = store.outbox_batch(self.batch_rows, BATCH_BYTES)
        if not entries:
            return 0
        key = self.node_key()
        seqs = [seq for seq, _ in entries]
        batch_id = f"{self.device_id}:{seqs[0]}-{seqs[-1]}"
        body = {
            "node_key": key,
            "batch_id": batch_id,
            "dropped_total": store.outbox_stats()["dropped"],
            "rows": [json.loads(payload) for _, payload in entries],
        }
        response = self._post_json("/api/v1/rows", body, gzipped=True)
        if response.status_code == 401:  # revoked or the collector lost us: enrol again, once
            body["node_key"] = self.node_key(renew=True)
            response = self._post_json("/api/v1/rows", body, gzipped=True)
        if response.status_code == 200:
            store.outbox_ack(seqs)
            self.batch_rows = min(BATCH_ROWS, self.batch_rows * 2)
            return len(seqs)
        if response.status_code in (413, 422):
            if len(entries) == 1:
                # one row the collector will never take: count it as dropped, never silently
                log.warning("collector refused row %s: %s", entries[0][1][:200], _reason(response))
                store.outbox_ack(seqs, dropped=1)
                return 1
            self.batch_rows = max(1, len(entries) // 2)  # find the row it refuses, in halves
            return self.send_batch(store)
        raise ForwardError(f"{self.url}: batch {batch_id} refused: {response.status_code} {_reason(response)}")

    def drain(
        self,
        store: Any,
        *,
        once: bool,
        max_backoff: float = 300.0,
        poll: float = 30.0,
        sleep: Callable[[float], object] = time.sleep,
        stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Send until the outbox is empty (``once``), or for ever, backing off on failures.
        Returns the rows acknowledged. With ``once``, a failure raises ForwardError."""
        sent = 0
        attempt = 0
        while not stop():
            try:
                n = self.send_batch(store)
            except ForwardError as exc:
                if once:
                    raise
                delay = backoff_delay(attempt, cap=max_backoff)
                attempt += 1
                log.warning("forwarding failed (%s); retry in %.1fs", exc, delay)
                sleep(delay)
                continue
            attempt = 0
            sent += n
            if n == 0:
                if once:
                    break
                sleep(poll)
        return sent


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.json().get("detail") or "")[:200]
    except (ValueError, AttributeError):
        return response.text[:200]
