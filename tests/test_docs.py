"""The README stays true: every setting and every CLI command is documented there."""

from __future__ import annotations

from pathlib import Path

import typer.main

from stormline.cli import app
from stormline.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"STORMLINE_{n.upper()}"
        for n in Settings.model_fields
        if f"`STORMLINE_{n.upper()}`" not in README
    ]
    assert not missing, f"document these in README.md (python -m stormline.settings): {missing}"


def test_every_command_is_in_the_readme() -> None:
    group = typer.main.get_command(app)
    missing = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        subs = getattr(cmd, "commands", None)
        names = [f"stormline {name} {sub}" for sub in subs] if subs else [f"stormline {name}"]
        missing += [n for n in names if f"`{n}" not in README]
    assert not missing, f"document these commands in README.md: {missing}"


def test_exit_codes_are_in_the_readme() -> None:
    from stormline.cli import ExitCode

    missing = [f"| {int(c)} |" for c in ExitCode if f"| {int(c)} |" not in README]
    assert not missing, f"document the exit codes (stormline.cli.ExitCode) in README.md: {missing}"
