"""Offline incident-response sweeps: a folder, mounted volume or disk image into one
verifiable evidence bundle. ``iter_bundle_rows`` is the collector's import entry point."""

from __future__ import annotations

from agent.sweep.bundle import BundleError, check_bundle, iter_bundle_rows

__all__ = ["BundleError", "check_bundle", "iter_bundle_rows"]
