"""The CLI scripts well: --version, completion, choices that fail early, one meaning per exit
code, JSON that parses, ids that survive a pipe, and read-only commands that create nothing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from stormline.cli import ExitCode
from stormline.settings import Settings
from tests.conftest import free_port, settings_env

STORMLINE = [str(Path(sys.executable).parent / "stormline")]


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real CLI with stdout and stderr piped (not a terminal), as a script sees it."""
    return subprocess.run(
        [*STORMLINE, *args],
        env=env if env is not None else _clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _clean_env(**settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    env.pop("COLUMNS", None)
    for k, v in settings.items():
        env[f"STORMLINE_{k.upper()}"] = str(v)
    return env


def test_exit_codes_are_fixed() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3]


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"stormline {importlib.metadata.version('stormline')}"


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in run("--help").stdout
    out = run("--show-completion", "bash")
    assert out.returncode == 0, out.stderr
    assert "_stormline_completion" in out.stdout


@pytest.mark.parametrize(
    ("args", "choices"),
    [
        (["router", "--strategy", "thompsn"], "thompson"),
        (["router", "--store", "rockdb"], "rocksdb"),
        (["router", "--log-level", "verbose"], "warning"),
        (["router", "--loglevel", "verbose"], "warning"),  # the old spelling, hidden
        (["analytics", "per_agent", "--format", "tabel"], "csv"),
        (["doctor", "--only", "javaa"], "packages"),
        (["reward", "t1", "0.5", "--source", "humn"], "verifier"),
    ],
)
def test_a_typo_in_a_choice_fails_early_with_exit_2(args: list[str], choices: str) -> None:
    out = run(*args, timeout=60)
    assert out.returncode == ExitCode.USAGE, out.stdout + out.stderr
    assert choices in out.stderr  # the message lists what is allowed


def test_help_lists_the_choices() -> None:
    router = run("router", "--help").stdout
    for word in ("epsilon_greedy", "round_robin", "rocksdb", "--log-level", "--web-port"):
        assert word in router
    assert "--loglevel" not in router
    assert "csv" in run("analytics", "--help").stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("publish", str(tmp_path / "missing.jsonl")).returncode == ExitCode.USAGE
    assert run("reward", "t1", "1.5").returncode == ExitCode.USAGE  # VALUE is in [0, 1]
    assert run("status", "--no-such-option").returncode == ExitCode.USAGE
    bad = run("status", env=_clean_env(topic_prefix="no spaces"))
    assert bad.returncode == ExitCode.USAGE and "invalid settings" in bad.stderr


def test_infrastructure_that_does_not_answer_exits_3(tmp_path: Path) -> None:
    env = _clean_env(
        data_dir=tmp_path / "data",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        schema_registry_url=f"http://127.0.0.1:{free_port()}",
    )
    task = run("task", "some-task", env=env)
    assert task.returncode == ExitCode.UNREACHABLE, task.stderr
    assert "did not answer" in task.stderr and "STORMLINE_REDIS_URL" in task.stderr
    schemas = run("schemas", "register", env=env)
    assert schemas.returncode == ExitCode.UNREACHABLE, schemas.stderr
    assert "did not answer" in schemas.stderr


def test_an_id_is_not_truncated_when_piped(tmp_path: Path) -> None:
    task_id = str(uuid.uuid4())
    long_text = "x" * 150
    out = run(
        "analytics",
        "--sql",
        f"SELECT '{task_id}' AS task_id, '{long_text}' AS note, (SELECT count() FROM tasks) AS n",
        env=_clean_env(data_dir=tmp_path / "absent"),
    )
    assert out.returncode == 0, out.stderr
    assert task_id in out.stdout and long_text in out.stdout
    assert "…" not in out.stdout
    assert not (tmp_path / "absent").exists()


def test_analytics_lists_its_queries_as_json(tmp_path: Path) -> None:
    out = run("analytics", "--format", "json", env=_clean_env(data_dir=tmp_path / "absent"))
    assert out.returncode == 0, out.stderr
    names = {row["name"] for row in json.loads(out.stdout)}
    assert {"per_agent", "reward_over_time", "throughput"} <= names


def test_topics_list_json_and_table_keep_full_names_when_piped(settings: Settings) -> None:
    from stormline.schemas.kafka import ensure_topics

    # A long prefix: full names are far wider than the 80 columns of a pipe.
    s = settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex}{uuid.uuid4().hex}."})
    ensure_topics(s)
    env = settings_env(s)
    out = run("topics", "list", "--json", env=env)
    assert out.returncode == ExitCode.OK, out.stderr
    rows = json.loads(out.stdout)
    names = {r["topic"] for r in rows}
    assert f"{s.topic_prefix}tasks" in names and f"{s.topic_prefix}dead-letters" in names
    assert {r["state"] for r in rows} == {"ok"}
    assert all(r["drift"] == [] for r in rows)

    table = run("topics", "list", env=env)
    assert table.returncode == ExitCode.OK, table.stderr
    for name in names:
        assert name in table.stdout, f"{name} cut short in:\n{table.stdout}"


def test_topics_list_exits_1_on_missing_topics(settings: Settings) -> None:
    out = run("topics", "list", "--json", env=settings_env(settings))
    assert out.returncode == ExitCode.FINDING, out.stderr
    assert {r["state"] for r in json.loads(out.stdout)} == {"missing"}


def test_schemas_check_json_offline() -> None:
    out = run("schemas", "check", "--offline", "--json")
    assert out.returncode == ExitCode.OK, out.stderr
    rows = json.loads(out.stdout)
    assert rows and all(r["compatible"] for r in rows)


def test_read_only_commands_create_nothing(settings: Settings, tmp_path: Path) -> None:
    """Run from an empty folder with a data dir that does not exist: neither appears."""
    data_dir = tmp_path / "never-created"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = settings_env(settings.model_copy(update={"data_dir": data_dir}))
    for args, codes in (
        (["--help"], {0}),
        (["status", "--json"], {0}),
        (["status"], {0}),
        (["topics", "list", "--json"], {1}),  # nothing created under this prefix yet
        (["task", "no-such-task"], {1}),
        (["analytics"], {0}),
        (["analytics", "per_agent", "--format", "json"], {0}),
        (["doctor", "--json", "--skip", "packages"], {0, 1}),
        (["schemas", "check", "--offline"], {0}),
    ):
        out = run(*args, env=env, cwd=cwd)
        assert out.returncode in codes, f"{args}: exit {out.returncode}\n{out.stderr}"
        assert not data_dir.exists(), f"`stormline {' '.join(args)}` created {data_dir}"
        assert list(cwd.iterdir()) == [], f"`stormline {' '.join(args)}` wrote into the cwd"


def test_status_shows_agent_endpoints(settings: Settings, tmp_path: Path) -> None:
    closed = free_port()
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "agents:\n  - id: a1\n    provider: openai\n    model: m\n"
        f"    base_url: http://127.0.0.1:{closed}/v1\n"
    )
    env = settings_env(settings.model_copy(update={"agents_file": agents}))
    out = run("status", "--json", env=env)
    assert out.returncode == ExitCode.OK, out.stderr  # shown, not counted
    doc = json.loads(out.stdout)
    (endpoint,) = [c for c in doc["agent_endpoints"] if c["name"].startswith("agent-endpoint:")]
    assert not endpoint["ok"] and "simulate-llm" in endpoint["fix"]
    table = run("status", env=env)
    assert "agent endpoints" in table.stdout and f"127.0.0.1:{closed}" in table.stdout


def _commands() -> dict[str, object]:
    import typer.main

    from stormline.cli import app

    group = typer.main.get_command(app)
    out: dict[str, object] = {}
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        if subs:
            out.update({f"{name} {sub}": c for sub, c in subs.items()})
        else:
            out[name] = cmd
    return out


def test_every_command_has_help() -> None:
    from typer.testing import CliRunner

    from stormline.cli import app

    runner = CliRunner()
    for name in _commands():
        res = runner.invoke(app, [*name.split(), "--help"])
        assert res.exit_code == 0, f"{name} --help: {res.output}"


def test_every_command_that_prints_a_table_has_json() -> None:
    commands = _commands()
    for name in ("status", "doctor", "topics create", "topics list", "schemas register"):
        opts = {o for p in commands[name].params for o in p.opts}  # type: ignore[attr-defined]
        assert "--json" in opts, name
    opts = {o for p in commands["schemas check"].params for o in p.opts}  # type: ignore[attr-defined]
    assert "--json" in opts
    opts = {o for p in commands["analytics"].params for o in p.opts}  # type: ignore[attr-defined]
    assert "--format" in opts  # table, json or csv (a choice: see the typo test)
