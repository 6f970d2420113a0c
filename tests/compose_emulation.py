"""Run docker-compose.kafka.yml's Stormline services as compose would, without Docker.

No Docker engine runs here, so this does what compose does for the parts that matter to
Stormline, faithfully enough that a wrong compose file shows:

* **Environment**: each process gets its service's ``environment`` (anchors merged,
  ``${VAR:?}``/``${VAR:-}`` interpolated from the given host environment, a bare key passed
  through from it) and nothing of the test's own environment but ``PATH``, ``HOME``, ``LANG``.
* **Names**: ``kafka:9092``, ``schema-registry:8080``, ``redis:6379`` become the embedded stack's
  loopback addresses; a Stormline service that listens (``ports:``) gets a free loopback port
  (``router:6066``, or a ``*_HOST: router`` with its ``*_PORT: "6066"``, become it) and
  ``0.0.0.0`` becomes ``127.0.0.1``; the same mapping rewrites the agent registry file, as the
  compose network's DNS would resolve those names.
* **Filesystems**: each process runs in its own mount namespace (``unshare -m``), where the
  container paths sit under one prefix ``C`` that every service shares: ``C/app`` is the image's
  working directory (this checkout, read-only), ``C/data`` and ``C/checkpoints`` are the
  image's own empty directories, and each ``volumes:`` entry bind-mounts its named volume (one
  host directory per volume, shared by every service that names it; ``:ro`` honoured). A path
  the trainer publishes is therefore readable by the router only where compose would make it
  so. Needs root (mount namespaces), as CI and the dev machines have.
* **Order**: ``depends_on`` between Stormline services is honoured (completed successfully,
  healthy via the service's own ``healthcheck``, started); the stack's own services (Kafka,
  registry, Redis, ClickHouse) are the embedded stack, already up.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from stormline.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.kafka.yml"
IMAGE_DIRS = ("/app", "/data", "/checkpoints")  # what deploy/Dockerfile creates
INFRA = {"kafka", "schema-registry", "kafka-ui", "redis", "clickhouse"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, host_env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` over every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, host_env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, host_env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        got = host_env.get(name)
        if op.endswith("?") and not got:
            raise ValueError(f"compose: {name} is required: {arg}")
        if op.endswith("-") and not got:
            return arg
        return got or ""

    return _VAR.sub(one, value)


def load_compose(host_env: dict[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), host_env)


def _env_of(svc: dict[str, Any], host_env: dict[str, str]) -> dict[str, str]:
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(e.split("=", 1) if "=" in e else (e, None) for e in raw)
    out = {}
    for k, v in raw.items():
        if v is None:  # passed through from the host by name; left out when unset there
            if k in host_env:
                out[k] = host_env[k]
        else:
            out[k] = str(v)
    return out


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, tuple[Path, bool]]  # container path -> (host dir or file, read-only)
    healthcheck: list[str] | None
    depends_on: dict[str, str]
    replicas: int = 1
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


@dataclass
class Deployment:
    """The compose file's Stormline services, mapped onto this machine."""

    tmp: Path
    stack: Settings
    host_env: dict[str, str]
    overrides: dict[str, str]  # test-only settings for every service (said why by the caller)
    doc: dict[str, Any] = field(init=False)
    ports: dict[tuple[str, int], str] = field(init=False)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.doc = load_compose(self.host_env)
        self.root = self.tmp / "c"  # the container paths' prefix, the same in every service
        self.root.mkdir(parents=True)
        registry = urlsplit(self.stack.registry_url).netloc
        self.ports = {
            ("kafka", 9092): self.stack.bootstrap_servers,
            ("schema-registry", 8080): registry,
            ("redis", 6379): urlsplit(self.stack.redis_address).netloc,
        }
        for name, svc in self.doc["services"].items():
            if name in INFRA:
                continue  # the embedded stack's own addresses, above
            for p in [*(svc.get("ports") or []), *(svc.get("expose") or [])]:  # own netns
                self.ports[(name, int(str(p).split(":")[-1]))] = f"127.0.0.1:{free_port()}"

    # ------------------------------------------------------------------ mapping --
    def address(self, service: str, port: int) -> str:
        return self.ports[(service, port)]

    def map_text(self, text: str, own: str | None = None) -> str:
        """Compose names to loopback addresses; the service's own ports and container paths."""
        for (svc, port), addr in self.ports.items():
            text = re.sub(rf"\b{re.escape(svc)}:{port}\b", addr, text)
            if svc == own:
                text = re.sub(rf"\blocalhost:{port}\b", addr, text)
        text = text.replace("0.0.0.0", "127.0.0.1")
        for d in IMAGE_DIRS:
            text = re.sub(rf"(?<![\w/.]){re.escape(d)}(?=/|$|\s|')", f"{self.root}{d}", text)
        return text

    def map_arg(self, arg: str, own: str) -> str:
        own_ports = {p: a for (s, p), a in self.ports.items() if s == own}
        if arg.isdigit() and int(arg) in own_ports:
            return own_ports[int(arg)].rsplit(":", 1)[1]
        return self.map_text(arg, own)

    def map_env(self, env: dict[str, str], own: str) -> dict[str, str]:
        """``map_arg`` on each value; a ``*_HOST`` naming a service, with its ``*_PORT``, is
        that service's address (e.g. the API reaching the router's web views)."""
        out = {k: self.map_arg(v, own) for k, v in env.items()}
        for k, v in env.items():
            port_key = k.removesuffix("_HOST") + "_PORT"
            if k.endswith("_HOST") and v in self.doc["services"] and env.get(port_key):
                host, port = self.address(v, int(env[port_key])).rsplit(":", 1)
                out[k], out[port_key] = host, port
        return out

    def volume_dir(self, name: str) -> Path:
        d = self.tmp / "volumes" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------- build --
    def build(self, name: str, svc: dict[str, Any] | None = None) -> Service:
        svc = copy.deepcopy(svc or self.doc["services"][name])
        entry = svc.get("entrypoint") or ["stormline"]
        command = svc.get("command") if svc.get("command") is not None else []
        argv = [self.map_arg(a, name) for a in [*entry, *command]]
        env = self.map_env(_env_of(svc, self.host_env), name)
        env.update(self.overrides)
        container = self.tmp / "containers" / name
        mounts: dict[str, tuple[Path, bool]] = {"/app": (ROOT, True)}
        for d in IMAGE_DIRS[1:]:
            own = container / d.strip("/")
            own.mkdir(parents=True, exist_ok=True)
            mounts[d] = (own, False)
        for v in svc.get("volumes") or []:
            source, target, *mode = v.split(":")
            mounts[target] = (self.volume_dir(source), mode == ["ro"])
        agents = env.get("STORMLINE_AGENTS_FILE", "")
        if agents.startswith(f"{self.root}/app/"):
            # The registry names compose hosts: a copy with them mapped, over the original.
            rel = agents.removeprefix(f"{self.root}/app/")
            copy_ = container / "agents" / Path(rel).name
            copy_.parent.mkdir(parents=True, exist_ok=True)
            copy_.write_text(self.map_text((ROOT / rel).read_text()))
            mounts[f"/app/{rel}"] = (copy_, True)
        health = svc.get("healthcheck") or {}
        check = None if health.get("disable") or not health.get("test") else health["test"][1:]
        if check and health["test"][0] == "CMD-SHELL":
            check = ["sh", "-c", check[0]]
        deps = svc.get("depends_on") or {}
        service = Service(
            name,
            argv,
            env,
            mounts,
            [self.map_arg(a, name) for a in check] if check else None,
            {d: c["condition"] for d, c in deps.items() if d not in INFRA},
            int((svc.get("deploy") or {}).get("replicas", 1)),
        )
        self.services[name] = service
        return service

    # ---------------------------------------------------------------- running --
    def command(self, service: Service, argv: list[str]) -> list[str]:
        """``argv`` inside ``service``'s own mount namespace, in its working directory."""
        script = [f"mount -t tmpfs stormline-container {shlex.quote(str(self.root))}"]
        for target, (source, ro) in sorted(service.mounts.items()):
            path = shlex.quote(f"{self.root}{target}")
            # A file mounts over one the image already has (the read-only /app).
            make = f"test -e {path}" if source.is_file() else f"mkdir -p {path}"
            script.append(f"{make} && mount --bind {shlex.quote(str(source))} {path}")
            if ro:
                script.append(f"mount -o remount,bind,ro {path}")
        script.append(f'cd {shlex.quote(str(self.root))}/app && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                " && ".join(script), "sh", *argv]  # fmt: skip

    def process_env(self, service: Service) -> dict[str, str]:
        home = self.tmp / "containers" / service.name / "home"
        home.mkdir(parents=True, exist_ok=True)
        path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
        return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", **service.env}

    def start(self, service: Service, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(service.replicas):
            with open(logs / f"{service.name}-{i + 1}.log", "ab") as log:
                service.procs.append(
                    subprocess.Popen(
                        self.command(service, service.argv),
                        env=self.process_env(service),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )

    def run(self, service: Service, argv: list[str], stdin: bytes = b"", timeout: float = 120):
        return subprocess.run(
            self.command(service, argv),
            env=self.process_env(service),
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )

    def healthy(self, service: Service) -> bool:
        assert service.healthcheck, f"{service.name} has no healthcheck"
        return self.run(service, service.healthcheck, timeout=60).returncode == 0

    def wait(self, name: str, condition: str, timeout: float) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in service.procs]
            if condition == "service_completed_successfully":
                if all(c == 0 for c in codes):
                    return
                if any(c not in (None, 0) for c in codes):
                    raise AssertionError(f"{name} exited with {codes}")
            elif condition == "service_started" and service.procs:
                return
            elif condition == "service_healthy":
                assert all(c is None for c in codes), f"{name} exited with {codes}"
                if self.healthy(service):
                    return
            time.sleep(1.0)
        raise AssertionError(f"{name}: not {condition} within {timeout:.0f}s")

    def up(self, names: list[str], logs: Path, timeout: float = 240) -> None:
        """Start ``names`` in dependency order, each once its dependencies' conditions hold."""
        started: set[str] = set()
        while len(started) < len(names):
            ready = [
                n for n in names if n not in started and set(self.services[n].depends_on) <= started
            ]
            assert ready, f"dependency cycle or missing service among {set(names) - started}"
            for n in ready:
                for dep, cond in self.services[n].depends_on.items():
                    self.wait(dep, cond, timeout)
                self.start(self.services[n], logs)
                started.add(n)

    def stop(self) -> None:
        procs = [p for s in self.services.values() for p in s.procs if p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def namespaces_available() -> str | None:
    """Why mount namespaces cannot be used here, or None when they can."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    if probe.returncode:
        return f"unshare --mount failed ({probe.stderr.decode().strip()}): run as root"
    return None
