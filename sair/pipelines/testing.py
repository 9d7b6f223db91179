"""Tiny handlers for tests and benchmarks: pass-through, fixed sleep, failure on demand."""

from __future__ import annotations

import time
from typing import Any


def noop(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Return the payload unchanged."""
    return payload


noop.sair_inline = True  # type: ignore[attr-defined]  # too cheap to be worth a thread hop


def sleep(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Sleep `options['sleep_ms']` (default 1 ms), then pass the payload on."""
    time.sleep(float(options.get("sleep_ms", 1.0)) / 1000.0)
    return payload


def fail_when_poisoned(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Raise for payloads with `poison` true; pass the others on after `sleep_ms`."""
    if payload.get("poison"):
        raise RuntimeError(f"poisoned payload seq={payload.get('seq')!r}")
    return sleep(payload, options)
