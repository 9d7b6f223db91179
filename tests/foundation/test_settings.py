"""Settings from the environment: defaults, bad values named, secrets never logged."""

from __future__ import annotations

import pytest

from sair.settings import Settings, SettingsError


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.qdrant_url is None and s.openai_base_url is None
    assert s.metrics_port == 0


def test_values_are_read() -> None:
    s = Settings.from_env(
        {
            "SAIR_NATS_URL": "nats://n:4222",
            "SAIR_REDIS_URL": "redis://r:6379/1",
            "SAIR_QDRANT_PATH": "/data/q",
            "OPENAI_BASE_URL": "http://llm:8000/v1",
            "OPENAI_API_KEY": "sk-secret",
            "SAIR_LLM_MODEL": "qwen",
            "SAIR_METRICS_PORT": "off",
        }
    )
    assert (s.nats_url, s.redis_url, s.qdrant_path, s.llm_model) == (
        "nats://n:4222",
        "redis://r:6379/1",
        "/data/q",
        "qwen",
    )
    assert s.metrics_port == -1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SAIR_NATS_URL": "http://x:4222"}, "SAIR_NATS_URL='http://x:4222'"),
        ({"SAIR_REDIS_URL": "localhost:6379"}, "SAIR_REDIS_URL='localhost:6379'"),
        ({"SAIR_QDRANT_URL": "qdrant:6333"}, "SAIR_QDRANT_URL='qdrant:6333'"),
        ({"SAIR_METRICS_PORT": "ninety"}, "SAIR_METRICS_PORT='ninety'"),
        ({"SAIR_METRICS_PORT": "-5"}, "SAIR_METRICS_PORT='-5'"),
        ({"SAIR_REQUEST_TIMEOUT_S": "nan"}, "SAIR_REQUEST_TIMEOUT_S='nan'"),
    ],
)
def test_bad_values_name_the_variable_and_value(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace("?", r"\?")):
        Settings.from_env(env)


def test_redacted_hides_credentials() -> None:
    s = Settings.from_env(
        {"SAIR_NATS_URL": "nats://user:pw@n:4222", "OPENAI_API_KEY": "sk-secret"}
    )
    shown = str(s.redacted())
    assert "pw" not in shown and "sk-secret" not in shown
    assert "nats://***@n:4222" in shown
