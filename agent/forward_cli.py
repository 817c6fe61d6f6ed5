"""``rmmhunt forward [--once]``: enrol with the collector once and drain the outbox."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

EXIT_CLEAN, EXIT_ERROR = 0, 2


def add_parser(sub: Any) -> None:
    from agent.cli import _global_options

    p = sub.add_parser(
        "forward", help="send the outbox to the collector", description="send the outbox to the collector"
    )
    _global_options(p, suppress=True)
    p.add_argument("--once", action="store_true", help="drain the outbox now and exit (exit 2 on a failure)")
    p.add_argument("--max-backoff", type=float, default=300.0, metavar="S", help="longest wait between retries")
    p.add_argument("--poll", type=float, default=30.0, metavar="S", help="wait between polls of an empty outbox")


def run(args: argparse.Namespace) -> int:
    from agent.cli import _device, _open_store, _settings
    from agent.transport.sender import ForwardError, Sender, forward_config

    settings = _settings(args)
    try:
        config = forward_config(settings)
        if not config.url:
            raise ForwardError("collector url: not set (RMMHUNT_COLLECTOR_URL or the config file)")
        device = _device(settings)
        sender = Sender(config, settings.state_dir, device.device_id, device.device_name)
    except ForwardError as exc:
        print(f"rmmhunt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    try:
        with _open_store(settings) as store:
            if store.set_outbox_policy(config.forward, config.max_outbox_bytes):
                queued = store.outbox_backfill()
                print(f"forwarding set up ({config.forward}): {queued} stored rows queued", file=sys.stderr)
            try:
                sent = sender.drain(
                    store,
                    once=args.once,
                    max_backoff=args.max_backoff,
                    poll=args.poll,
                    sleep=stopping.wait,
                    stop=stopping.is_set,
                )
            except ForwardError as exc:
                print(f"rmmhunt: error: {exc}", file=sys.stderr)
                return EXIT_ERROR
            stats = store.outbox_stats()
    finally:
        sender.close()
    print(
        f"forwarded {sent} rows; outbox {stats['queued']} rows ({stats['bytes']} bytes), dropped {stats['dropped']}",
        file=sys.stderr,
    )
    return EXIT_CLEAN
