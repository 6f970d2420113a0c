"""Doctor group ``agents``: every agent endpoint (``base_url``) of the agent registry answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from stormline.deploy.doctor.base import Check
from stormline.settings import Settings

ENDPOINT_TIMEOUT_S = 2.0


def check_agents(settings: Settings, timeout: float = ENDPOINT_TIMEOUT_S) -> list[Check]:
    """Every agent endpoint of the registry answers (any HTTP answer to GET base_url/models)."""
    from stormline.consumers.llm.agents import AgentConfigError, load_registry

    path = Path(settings.agents_file).expanduser()
    shown = path if path.is_absolute() else f"{path} (in {Path.cwd()})"
    if not path.exists():
        return [
            Check(
                "agents",
                True,
                f"no agent registry at {shown}: agent endpoints not checked (set "
                "STORMLINE_AGENTS_FILE to check them)",
                skipped=True,
            )
        ]
    try:
        # ${STORMLINE_*} in the file resolves from these settings (flags included).
        registry = load_registry(path, settings)
    except AgentConfigError as exc:
        return [
            Check(
                "agents",
                False,
                str(exc),
                f"fix the agent registry {path} (the format is in agents.yaml at the "
                "repository root); workers refuse it as it is",
            )
        ]
    endpoints: dict[str, list[str]] = {}
    for agent in registry.agents.values():
        for cfg, label in ((agent, agent.id), (agent.fallback, f"{agent.id} (fallback)")):
            if cfg is not None and cfg.base_url and cfg.provider != "simulated":
                endpoints.setdefault(cfg.base_url, []).append(label)
    out = [
        Check(
            "agents",
            True,
            f"{len(registry)} agents in {shown}; endpoints to check: {len(endpoints)}",
        )
    ]
    if not endpoints:
        return out

    def probe(item: tuple[str, list[str]]) -> Check:
        return check_endpoint(item[0], item[1], settings, str(path), timeout)

    with ThreadPoolExecutor(max_workers=min(8, len(endpoints))) as pool:
        out += list(pool.map(probe, endpoints.items()))
    return out


def check_endpoint(
    base_url: str,
    agents: list[str],
    settings: Settings,
    registry_path: str = "agents.yaml",
    timeout: float = ENDPOINT_TIMEOUT_S,
) -> Check:
    import httpx

    shown = _without_credentials(base_url)
    name = f"agent-endpoint:{shown}"
    who = ", ".join(agents)
    url = base_url.rstrip("/") + "/models"
    try:
        resp = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        parts = urlsplit(base_url)
        host, port = parts.hostname or "", parts.port
        fix = f"start the server it names, or correct base_url of {who} in {registry_path}"
        if host in ("127.0.0.1", "localhost", "::1") and port is not None:
            fix = (
                f"start the LLM server on port {port} (the simulated one: `stormline "
                f"simulate-llm --port {port}`, or `stormline up --all`), or correct base_url "
                f"of {who} in {registry_path}"
            )
            if port != settings.simulator_port:
                fix += (
                    f"; note STORMLINE_SIMULATOR_PORT is {settings.simulator_port}: the "
                    "simulator `up --all` starts listens there, and base_url "
                    "http://127.0.0.1:${STORMLINE_SIMULATOR_PORT}/v1 follows it"
                )
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Check(name, False, f"GET {shown}/models does not answer ({why}); used by {who}", fix)
    return Check(name, True, f"GET {shown}/models answers (HTTP {resp.status_code}); used by {who}")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.rstrip("/")
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
    return parts._replace(netloc=netloc).geturl().rstrip("/")
