"""Doctor group ``ports``: every loopback port of the embedded services is free, or held by the
running stack of this data directory (its pid files and supervisor, seen through /proc)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from stormline.deploy.doctor.base import Check
from stormline.settings import Settings


@dataclass(frozen=True)
class PortUse:
    service: str
    port: int
    host: str
    setting: str
    external: str | None  # the setting that points the service elsewhere, when it is set
    pidfile: str  # <data_dir>/run/<pidfile>.pid of the process that would hold it


def embedded_ports(settings: Settings) -> list[PortUse]:
    kafka_ext = "STORMLINE_KAFKA_BOOTSTRAP_SERVERS" if settings.kafka_bootstrap_servers else None
    reg_ext = "STORMLINE_SCHEMA_REGISTRY_URL" if settings.schema_registry_url else None
    redis_ext = "STORMLINE_REDIS_URL" if settings.redis_url else None
    lo = "127.0.0.1"
    # Apicurio's management interface takes an ephemeral loopback port (deploy/stack.py): none
    # to check here.
    return [
        PortUse("kafka", settings.kafka_port, lo, "STORMLINE_KAFKA_PORT", kafka_ext, "kafka"),
        PortUse(
            "kafka-controller",
            settings.kafka_controller_port,
            lo,
            "STORMLINE_KAFKA_CONTROLLER_PORT",
            kafka_ext,
            "kafka",
        ),
        PortUse(
            "registry", settings.registry_port, lo, "STORMLINE_REGISTRY_PORT", reg_ext, "registry"
        ),
        PortUse("redis", settings.redis_port, lo, "STORMLINE_REDIS_PORT", redis_ext, "redis"),
        PortUse(
            "simulator", settings.simulator_port, lo, "STORMLINE_SIMULATOR_PORT", None, "supervisor"
        ),
        PortUse(
            "router-web",
            settings.router_web_port,
            settings.router_web_host,
            "STORMLINE_ROUTER_WEB_PORT",
            None,
            "supervisor",
        ),
    ]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    from stormline.deploy.process import port_is_free as free

    return free(port, host)


def check_ports(settings: Settings) -> list[Check]:
    stack = _stack_pids(settings.data_dir)
    out = []
    for use in embedded_ports(settings):
        name = f"port:{use.service}"
        where = f"{use.host}:{use.port}"
        if use.external:
            out.append(
                Check(
                    name,
                    True,
                    f"{use.service} is external ({use.external} is set); {where} is not needed",
                    skipped=True,
                )
            )
            continue
        if port_is_free(use.port, use.host):
            out.append(Check(name, True, f"{where} is free ({use.setting})"))
            continue
        holders = listener_pids(use.port)
        owned = [p for p in holders if _in_tree(p, set(stack.values()))]
        if owned or (not holders and stack.get(use.pidfile) is not None):
            pid = owned[0] if owned else stack[use.pidfile]
            out.append(
                Check(
                    name,
                    True,
                    f"{where} is in use by the running stack (pid {pid}) of this "
                    f"data directory ({settings.data_dir})",
                )
            )
            continue
        who = ", ".join(f"pid {p} ({_cmd(p)})" for p in holders) or "another program"
        out.append(
            Check(
                name,
                False,
                f"{where} ({use.service}, {use.setting}) is taken by {who}",
                f"stop that program, or set {use.setting} to a free port (e.g. "
                f"{use.setting}={_a_free_port(use.host)})",
            )
        )
    return out


def _a_free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listener_pids(port: int) -> list[int]:
    """Processes with a listening TCP socket on ``port`` (any address), from /proc; empty when
    they cannot be seen (another user's processes without root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    if not inodes:
        return []
    targets = {f"socket:[{i}]" for i in inodes}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        pids.append(int(proc.name))
                        break
        except OSError:
            continue
    return sorted(pids)


def _stack_pids(data_dir: Path) -> dict[str, int]:
    """Live processes of the stack of ``data_dir``: its pid files, and the services its
    supervisor last wrote down. Reads only; a stale pid file counts for nothing."""
    run = data_dir.expanduser().resolve() / "run"
    pids: dict[str, int] = {}
    try:
        files = sorted(run.glob("*.pid"))
    except OSError:
        return pids
    for f in files:
        with contextlib.suppress(OSError, ValueError):
            pid = int(f.read_text().strip())
            if _alive(pid):
                pids[f.stem] = pid
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        for row in json.loads((run / "services.json").read_text()):
            pid = row.get("pid")
            if isinstance(pid, int) and _alive(pid):
                pids[f"service:{row.get('name', pid)}"] = pid
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _in_tree(pid: int, roots: set[int]) -> bool:
    """``pid`` is one of ``roots`` or a descendant of one."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid in roots:
            return True
        pid, seen = _parent(pid), seen + 1
    return False


def _cmd(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return "?"
    raw = " ".join(raw.split())
    return raw if len(raw) <= 80 else raw[:77] + "..."
