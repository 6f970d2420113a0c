"""The agent registry follows the settings: `${NAME}` interpolation, endpoint checks, and
the supervisor handing its settings to every child. No stack needed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from stormline.consumers.llm.agents import (
    AgentConfigError,
    endpoint_problems,
    load_registry,
    parse_registry,
)
from stormline.deploy.supervisor import default_services, settings_environ
from stormline.settings import Settings

EXAMPLE = Path(__file__).parent.parent / "agents.yaml"
AGENT = {"id": "a", "provider": "openai", "model": "m"}


def _one(base_url: str, **env: str) -> str | None:
    reg = parse_registry({"agents": [{**AGENT, "base_url": base_url}]}, environ=env)
    return reg.agents["a"].base_url


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings come only from what each test sets (no STORMLINE_* of the caller, no .env)."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("STORMLINE_")]:
        monkeypatch.delenv(name)


def test_without_references_values_are_untouched() -> None:
    entry = {**AGENT, "base_url": "http://h:1/v1", "system_prompt": "Costs $5; $$x$$ is TeX."}
    reg = parse_registry({"agents": [entry]}, environ={})
    assert reg.agents["a"].model_dump(include=set(entry)) == entry


def test_defaults_and_environment() -> None:
    assert _one("http://h:${PORT:-8123}/v1") == "http://h:8123/v1"
    assert _one("http://h:${PORT:-8123}/v1", PORT="9000") == "http://h:9000/v1"
    assert _one("http://h:${PORT:-8123}/v1", PORT="") == "http://h:8123/v1"  # empty: default
    assert _one("http://${HOST}:1/v1", HOST="llm.internal") == "http://llm.internal:1/v1"
    assert _one("http://h:1/v1?q=$${HOST}") == "http://h:1/v1?q=${HOST}"  # $${ is literal
    # Any string value, numbers included; nested mappings (fallback) too.
    reg = parse_registry(
        {
            "agents": [
                {
                    **AGENT,
                    "timeout_s": "${T:-7}",
                    "fallback": {"provider": "openai", "model": "${FB_MODEL}"},
                }
            ]
        },
        environ={"FB_MODEL": "other"},
    )
    assert reg.agents["a"].timeout_s == 7.0 and reg.agents["a"].fallback.model == "other"  # type: ignore[union-attr]


def test_stormline_names_come_from_the_effective_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    urls = lambda reg: {a.base_url for a in reg.agents.values()}  # noqa: E731
    assert urls(load_registry(EXAMPLE)) == {"http://127.0.0.1:8700/v1"}  # the default
    # A CLI flag or a programmatic override reaches the loader as Settings...
    assert urls(load_registry(EXAMPLE, Settings(simulator_port=8811))) == {
        "http://127.0.0.1:8811/v1"
    }
    # ... a .env file in the working directory ...
    (tmp_path / ".env").write_text("STORMLINE_SIMULATOR_PORT=8822\n")
    assert urls(load_registry(EXAMPLE)) == {"http://127.0.0.1:8822/v1"}
    # ... and the environment, which wins over .env; settings win over a raw environ too.
    monkeypatch.setenv("STORMLINE_SIMULATOR_PORT", "8833")
    assert urls(load_registry(EXAMPLE)) == {"http://127.0.0.1:8833/v1"}
    env = {"STORMLINE_SIMULATOR_PORT": "1"}
    reg = load_registry(EXAMPLE, Settings(simulator_port=8844), environ=env)
    assert urls(reg) == {"http://127.0.0.1:8844/v1"}


def test_unknown_variable_names_variable_agent_and_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(
        yaml.safe_dump({"agents": [{**AGENT, "id": "writer", "base_url": "http://${NOPE}/v1"}]})
    )
    with pytest.raises(AgentConfigError) as ei:
        load_registry(path, environ={})
    msg = str(ei.value)
    assert "${NOPE}" in msg and "'writer'" in msg and str(path) in msg, msg
    with pytest.raises(AgentConfigError, match="invalid reference"):
        _one("http://${not a name}/v1")
    with pytest.raises(AgentConfigError, match="unclosed"):
        _one("http://${HOST/v1", HOST="x")


def test_secrets_are_never_interpolated() -> None:
    for ref in ("${OPENAI_API_KEY}", "${HF_TOKEN:-x}", "${STORMLINE_KAFKA_SASL_PASSWORD}"):
        with pytest.raises(AgentConfigError, match="api_key_env") as ei:
            _one(f"http://u:{ref}@h/v1", OPENAI_API_KEY="sk-secret-123", HF_TOKEN="hf-456")
        assert "sk-secret-123" not in str(ei.value) and "hf-456" not in str(ei.value)


def test_endpoint_problems_name_agent_url_and_fix() -> None:
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        up, down = listening.getsockname()[1], closed.getsockname()[1]
        reg = parse_registry(
            {
                "agents": [
                    {**AGENT, "id": "ok", "base_url": f"http://127.0.0.1:{up}/v1"},
                    {**AGENT, "id": "off", "base_url": f"http://user:pw@127.0.0.1:{down}/v1"},
                    {**AGENT, "id": "hosted"},  # the provider's own API: not checked
                    {"id": "sim", "provider": "simulated", "model": "sim-math"},
                ]
            },
            "agents.yaml",
        )
        problems = endpoint_problems(reg, timeout_s=0.5, settings=Settings(simulator_port=down))
    assert len(problems) == 1, problems
    (p,) = problems
    assert p.startswith("agent 'off': nothing answers at ") and f"127.0.0.1:{down}/v1" in p
    assert "pw" not in p and "stormline simulate-llm" in p
    assert f"STORMLINE_SIMULATOR_PORT={down}" in p and "agents.yaml" in p


def test_supervisor_children_see_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(
        simulator_port=8855,
        topic_partitions={"tasks": 3},
        kafka_sasl_password="pw",  # type: ignore[arg-type]
        topic_prefix="p.",
    )
    sim = default_services(s)[0]
    assert sim.args == ["simulate-llm", "--port", "8855"] and sim.ready_port == 8855
    for name, value in settings_environ(s).items():
        monkeypatch.setenv(name, value)
    assert Settings().model_dump() == s.model_dump()
    assert {a.base_url for a in load_registry(EXAMPLE).agents.values()} == {
        "http://127.0.0.1:8855/v1"
    }
