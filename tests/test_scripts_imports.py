"""The benchmark and example scripts run only by hand (minutes to hours each), so no other test notices
when the package renames or moves a name they import; benchmarks/dreambooth_memory.py imported a helper
of adapt.cli that no longer existed. Every `from adapt... import NAME` and `import adapt...` in them (and
`from <sibling script> import NAME`), at the top or inside a function, must name something that exists."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").rglob("*.py")])


def imports(script: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each name a script imports from adapt or from a script beside it (name None: `import module`)."""
    found = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "adapt" or (script.parent / f"{node.module}.py").is_file():
                found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "adapt"]
    return found


def exists(module: str, name: str | None) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    if name is None:
        return True
    parent = importlib.import_module(module)
    return hasattr(parent, name) or (hasattr(parent, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_a_script_imports_from_the_package_exists(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # the scripts import their siblings (sd_models, pivotal_sweep)
    found = imports(script)
    missing = [f"from {m} import {n}" if n else f"import {m}" for m, n in found if not exists(m, n)]
    assert missing == [], f"{script.relative_to(ROOT)} imports what the package no longer has"


def test_the_check_sees_imports_inside_functions(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("def one():\n    from adapt.cli import no_such_helper\n    import adapt.no_such_module\n")
    assert imports(script) == [("adapt.cli", "no_such_helper"), ("adapt.no_such_module", None)]
    assert not exists("adapt.cli", "no_such_helper") and not exists("adapt.no_such_module", None)
    assert exists("adapt.train", "train") and exists("adapt.methods", "full")
