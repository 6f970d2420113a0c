"""Supervise Stormline's own services as child processes: start, restart on crash, stop.

``stormline up --all`` runs this module detached (pid file ``run/supervisor.pid``); the demo
runs it in the foreground. Each child is a ``stormline <command>``; a child that exits is
restarted with exponential backoff (1 s doubling to 30 s). On SIGTERM the supervisor sends
SIGTERM to every child (they shut down gracefully), waits, then SIGKILLs stragglers.
The current children are written to ``run/services.json`` for ``stormline status``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stormline.settings import Settings

MARKER = "deploy.supervisor"


@dataclass
class ServiceSpec:
    name: str
    args: list[str]  # arguments after `stormline`

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "stormline.cli", *self.args]


@dataclass
class _Child:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    started_at: float = 0.0


def default_services(
    settings: Settings, workers: int = 2, simulator: bool = True, trainer: bool = True
) -> list[ServiceSpec]:
    specs = []
    if simulator:
        specs.append(ServiceSpec("simulate-llm", ["simulate-llm"]))
    specs.append(ServiceSpec("router", ["router"]))
    specs += [
        ServiceSpec(f"worker-{i + 1}", ["worker", "--worker-id", f"worker-{i + 1}"])
        for i in range(workers)
    ]
    specs.append(ServiceSpec("evaluator", ["evaluator"]))
    specs.append(ServiceSpec("sink", ["sink"]))
    if trainer:
        specs.append(ServiceSpec("trainer", ["trainer"]))
    return specs


@dataclass
class Supervisor:
    specs: list[ServiceSpec]
    logs: Path
    state_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    _children: list[_Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._children = [_Child(s) for s in self.specs]
        for child in self._children:
            self._spawn(child)
        self._write_state()

    def _spawn(self, child: _Child) -> None:
        log = open(self.logs / f"{child.spec.name}.log", "ab")  # noqa: SIM115 - owned by child
        child.proc = subprocess.Popen(
            child.spec.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
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
                    child.backoff = 1.0  # it ran long enough: forget past crashes
                continue
            if child.next_start == 0.0:
                child.next_start = now + child.backoff
                child.backoff = min(child.backoff * 2, 30.0)
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
            }
            for c in self._children
        ]
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m deploy.supervisor")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-simulator", action="store_true")
    ap.add_argument("--no-trainer", action="store_true")
    ap.add_argument("--data-dir", type=Path, required=True)
    args = ap.parse_args()
    settings = Settings(data_dir=args.data_dir)
    run = settings.data_dir.resolve() / "run"
    run.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(
        default_services(settings, args.workers, not args.no_simulator, not args.no_trainer),
        logs=settings.data_dir.resolve() / "logs",
        state_file=run / "services.json",
        env={"STORMLINE_DATA_DIR": str(settings.data_dir.resolve())},
    )
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    sup.run()


if __name__ == "__main__":
    main()
