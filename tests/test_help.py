"""Every command's --help stays as it was (options, defaults, texts): the snapshots in
tests/data/help were taken before the package was reorganised (issue 14). A deliberate change of
a help text updates them: ADAPT_UPDATE_HELP=1 pytest tests/test_help.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapt.cli import app

SNAPSHOTS = Path(__file__).parent / "data" / "help"
COMMANDS = ["", "lora", "dreambooth", "textual-inversion", "generate", "eval", "merge", "convert", "extract", "resize",
            "schedulers"]


def help_text(command: str) -> str:
    argv = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_unchanged(command):
    snapshot = SNAPSHOTS / f"{command or 'adapt'}.txt"
    text = help_text(command)
    if os.environ.get("ADAPT_UPDATE_HELP"):
        snapshot.write_text(text)
    assert text == snapshot.read_text(), f"`adapt {command} --help` changed; see {snapshot}"
