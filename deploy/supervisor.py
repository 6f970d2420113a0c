"""Supervise Stormline's own services as child processes: start, restart on crash, stop.

``stormline up --all`` runs this module detached (pid file ``run/supervisor.pid``); the demo
runs it in the foreground. Each child is a ``stormline <command>``; a child that exits is
restarted after a backoff (the one retry policy: full jitter under a ceiling of 1 s doubling
to 30 s). On SIGTERM the supervisor sends SIGTERM to every child (they shut down
gracefully), waits, then SIGKILLs stragglers.
The current children are written to ``run/services.json`` for ``stormline status``.

Every child sees the supervisor's settings: they are passed down as ``STORMLINE_*`` variables
(:func:`settings_environ`), so a child resolves ``${STORMLINE_SIMULATOR_PORT}`` in the agent
registry, and every other setting, exactly as the supervisor did, whatever set them. The
simulator starts first, on ``settings.simulator_port``, and the others once it answers, so
that the workers' first calls find it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydantic import SecretStr

from stormline.runtime.retry import RetryPolicy
from stormline.settings import Settings

MARKER = "stormline.deploy.supervisor"
# How long an exited child waits before its restart: the one retry policy (full jitter under
# a ceiling of 1 s doubling to 30 s), so children that crash together do not restart together.
RESTART = RetryPolicy(base_s=1.0, max_s=30.0)


def settings_environ(settings: Settings) -> dict[str, str]:
    """The ``STORMLINE_*`` variables that make a child process see exactly ``settings``.

    Unset (None) settings are left out. The values include secret settings (a child needs
    them); pass them in a child's environment only, never to a log.
    """
    env = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, dict | list | tuple | set):
            text = json.dumps(value if isinstance(value, dict) else list(value), default=str)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Enum):
            text = str(value.value)
        else:
            text = str(value)
        env[f"STORMLINE_{name.upper()}"] = text
    return env


@dataclass
class ServiceSpec:
    name: str
    args: list[str]  # arguments after `stormline`
    ready_port: int | None = None  # the services after it start once this loopback port answers
    env: dict[str, str] = field(default_factory=dict)  # this child's own, over the shared ones
    metrics_port: int | None = None  # where this child serves /metrics (for `status`)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "stormline.cli", *self.args]


@dataclass
class _Child:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    crashes: int = 0  # consecutive exits without a long enough run in between
    started_at: float = 0.0


def default_services(
    settings: Settings, workers: int = 2, simulator: bool = True, trainer: bool = True
) -> list[ServiceSpec]:
    specs = []
    if simulator:
        port = settings.simulator_port
        specs.append(ServiceSpec("simulate-llm", ["simulate-llm", "--port", str(port)], port))
    specs.append(ServiceSpec("router", ["router"]))
    specs += [
        ServiceSpec(f"worker-{i + 1}", ["worker", "--worker-id", f"worker-{i + 1}"])
        for i in range(workers)
    ]
    specs.append(ServiceSpec("evaluator", ["evaluator"]))
    specs.append(ServiceSpec("sink", ["sink"]))
    specs.append(ServiceSpec("api", ["api"]))  # on STORMLINE_API_HOST:STORMLINE_API_PORT
    if trainer:
        specs.append(ServiceSpec("trainer", ["trainer"]))
    return with_metrics_ports(specs, settings.metrics_base_port)


def with_metrics_ports(specs: list[ServiceSpec], base: int) -> list[ServiceSpec]:
    """Each Stormline child its own /metrics port: base + its place (the simulator none)."""
    if base <= 0:
        return specs
    for i, spec in enumerate(s for s in specs if s.args[0] != "simulate-llm"):
        spec.metrics_port = base + i + 1
        spec.env["STORMLINE_METRICS_PORT"] = str(spec.metrics_port)
    return specs


@dataclass
class Supervisor:
    specs: list[ServiceSpec]
    logs: Path
    state_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 30.0
    _children: list[_Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._children = [_Child(s) for s in self.specs]
        for child in self._children:
            self._spawn(child)
            if child.spec.ready_port is not None:
                self._wait_ready(child, child.spec.ready_port)
        self._write_state()

    def _wait_ready(self, child: _Child, port: int) -> bool:
        """Wait until the child accepts connections on 127.0.0.1:port (or exits, or times out)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                pass
            if child.proc is None or child.proc.poll() is not None:
                break
            time.sleep(0.1)
        print(
            f"{child.spec.name} does not answer on 127.0.0.1:{port}; starting the other "
            f"services anyway (see {self.logs / (child.spec.name + '.log')})",
            file=sys.stderr,
            flush=True,
        )
        return False

    def _spawn(self, child: _Child) -> None:
        log = open(self.logs / f"{child.spec.name}.log", "ab")  # noqa: SIM115 - owned by child
        child.proc = subprocess.Popen(
            child.spec.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, **child.spec.env},
        )
        log.close()
        child.started_at = time.monotonic()

    def tick(self) -> list[str]:
        """Restart children that exited; returns the names restarted."""
        restarted = []
        now = time.monotonic()
        for child in self._children:
            if child.proc is None or child.proc.poll() is None:
                if child.proc is not None and now - child.started_at > 60:
                    child.crashes = 0  # it ran long enough: forget past crashes
                continue
            if child.next_start == 0.0:
                child.crashes += 1
                child.next_start = now + RESTART.backoff(child.crashes)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._spawn(child)
                restarted.append(child.spec.name)
        if restarted:
            self._write_state()
        return restarted

    def pids(self) -> dict[str, int]:
        return {
            c.spec.name: c.proc.pid
            for c in self._children
            if c.proc is not None and c.proc.poll() is None
        }

    def run(self) -> None:
        if not self._children:
            self.start()
        while not self._stop.wait(0.5):
            self.tick()
        self.stop()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        alive = [c.proc for c in self._children if c.proc is not None and c.proc.poll() is None]
        for p in alive:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in alive:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = [
            {
                "name": c.spec.name,
                "pid": c.proc.pid if c.proc else None,
                "restarts": c.restarts,
                "command": " ".join(c.spec.args),
                "metrics": c.spec.metrics_port,
            }
            for c in self._children
        ]
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stormline.deploy.supervisor")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-simulator", action="store_true")
    ap.add_argument("--no-trainer", action="store_true")
    ap.add_argument("--data-dir", type=Path, required=True)
    args = ap.parse_args()
    settings = Settings(data_dir=args.data_dir)
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    run = settings.data_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(
        default_services(settings, args.workers, not args.no_simulator, not args.no_trainer),
        logs=settings.data_dir / "logs",
        state_file=run / "services.json",
        env=settings_environ(settings),
    )
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    sup.start()
    _report_endpoints(settings)
    sup.run()


def _report_endpoints(settings: Settings) -> None:
    """Say in the supervisor's log when an agent's endpoint does not answer."""
    from stormline.consumers.llm.agents import AgentConfigError, endpoint_problems, load_registry

    try:
        problems = endpoint_problems(
            load_registry(settings.agents_file, settings), settings=settings
        )
    except AgentConfigError as exc:
        problems = [f"bad agent registry: {exc}"]
    for problem in problems:
        print(f"WARNING {problem}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
