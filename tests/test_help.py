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


@pytest.mark.parametrize("command", ["lora", "dreambooth", "textual-inversion"])
def test_training_help_names_the_recipe_sections_read_and_the_bundled_bases_defaults(command):
    """--recipe's help names the sections this command reads (it listed [lora] [dreambooth] for textual inversion,
    which reads [textual_inversion]), and the help says which defaults the bundled base's adapt.json puts in place
    of those shown (its lr and steps for every method: a run at the shown 1e-4 x 500 is not what runs)."""
    import json
    import re

    from adapt.methods import METHODS
    from adapt.models import BUNDLED_MODEL

    text = " ".join(help_text(command).split())
    named = re.search(r"TOML recipe: ((?:\[\w+\] )+)sections", text).group(1).split()
    assert set(named) == {f"[{s}]" for s in (*METHODS[command].sections, "train")}
    suggested = json.loads((BUNDLED_MODEL / "adapt.json").read_text())[command]
    assert f"the bundled base suggests --lr {suggested['lr']}, --steps {suggested['steps']}" in text
