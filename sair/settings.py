"""Settings of a SAIR process, read from the environment (nothing is hard-coded in services)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: not a number") from exc
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise SettingsError(f"{name}={raw!r}: must be a finite number >= 0")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: not an integer") from exc
    if value < 0:
        raise SettingsError(f"{name}={raw!r}: must be >= 0")
    return value


def _url(
    env: Mapping[str, str], name: str, default: str | None, schemes: tuple[str, ...]
) -> str | None:
    raw = env.get(name) or default
    if raw is None:
        return None
    if not raw.startswith(tuple(s + "://" for s in schemes)):
        raise SettingsError(f"{name}={raw!r}: must start with one of {', '.join(schemes)}://")
    return raw


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    qdrant_url: str | None = None
    qdrant_path: str | None = None
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    llm_model: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    """0 = any free port (several services may share a host); -1 disables /metrics."""
    request_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        metrics_raw = e.get("SAIR_METRICS_PORT", "")
        metrics_port = -1 if metrics_raw == "off" else _int(e, "SAIR_METRICS_PORT", 0)
        return cls(
            nats_url=_url(e, "SAIR_NATS_URL", cls.nats_url, ("nats", "tls", "ws", "wss")) or "",
            redis_url=_url(e, "SAIR_REDIS_URL", cls.redis_url, ("redis", "rediss", "unix")) or "",
            qdrant_url=_url(e, "SAIR_QDRANT_URL", None, ("http", "https")),
            qdrant_path=e.get("SAIR_QDRANT_PATH") or None,
            openai_base_url=_url(e, "OPENAI_BASE_URL", None, ("http", "https")),
            openai_api_key=e.get("OPENAI_API_KEY") or None,
            llm_model=e.get("SAIR_LLM_MODEL") or None,
            metrics_host=e.get("SAIR_METRICS_HOST", cls.metrics_host),
            metrics_port=metrics_port,
            request_timeout_s=_float(e, "SAIR_REQUEST_TIMEOUT_S", cls.request_timeout_s),
        )

    def redacted(self) -> dict[str, str | int | float | None]:
        """Settings safe to log: credentials in URLs and the API key are hidden."""
        return {
            "nats_url": _redact_url(self.nats_url),
            "redis_url": _redact_url(self.redis_url),
            "qdrant_url": _redact_url(self.qdrant_url) if self.qdrant_url else None,
            "qdrant_path": self.qdrant_path,
            "openai_base_url": self.openai_base_url,
            "openai_api_key": "***" if self.openai_api_key else None,
            "llm_model": self.llm_model,
            "metrics_port": self.metrics_port,
        }


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
