"""The package's imports flow one way (README, Development): a module imports only modules of its
own level or below, never in a cycle, whether at module level or inside a function; and the
modules that answer `--help` and argument errors do so without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapt"

# Lower levels never import higher ones. Same level: allowed, but no cycles.
LAYERS = [
    ["__init__", "errors"],
    ["fileio", "schedulers", "images", "lora_names", "logs", "signals", "locks", "untrusted"],
    ["config", "checks"],
    ["data", "models", "loras", "embeddings", "formats"],
    ["encode", "methods", "methods.full", "methods.lora", "methods.textual_inversion"],
    ["infer", "checkpoint", "metrics"],
    ["report", "classimages", "evaluate", "eval_io", "lora_tools"],
    ["run", "train"],
    ["launch"],
    ["plan"],
    ["cli", "__main__"],
]
LEVEL = {name: k for k, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """adapt modules imported anywhere in the file (module level or inside functions)."""
    name = name or module_name(path)
    is_package = path.name == "__init__.py"
    package = [] if name == "__init__" else name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("adapt"):
                target = node.module.removeprefix("adapt").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` / `from .methods import lora` import modules
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in LEVEL else target or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("adapt."):
                    found.add(alias.name.removeprefix("adapt."))
    found.discard(name)
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_level():
    assert set(GRAPH) <= set(LEVEL), f"place these in LAYERS: {sorted(set(GRAPH) - set(LEVEL))}"
    assert {t for ts in GRAPH.values() for t in ts} <= set(LEVEL)


def test_no_module_imports_a_higher_level():
    upward = [f"{m} (level {LEVEL[m]}) imports {t} (level {LEVEL[t]})" for m, ts in GRAPH.items() for t in ts if LEVEL[t] > LEVEL[m]]
    assert not upward, upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path m -> ... -> m in the graph, or None."""
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    assert find_cycle(GRAPH) is None, find_cycle(GRAPH)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """Relative, absolute, `from . import` and in-function imports are all found, and a cycle is
    found (else the tests above could pass on a tree that breaks the rules)."""
    f = tmp_path / "data.py"
    f.write_text("from .errors import AdaptError\nimport adapt.plan\nfrom . import cli\n"
                 "def g():\n    from .train import train\n    from .methods import lora\n")
    assert imports_of(f, "data") == {"errors", "plan", "cli", "train", "methods.lora"}
    g = tmp_path / "__init__.py"
    g.write_text("from .full import FullMethod\nfrom ..config import LoraConfig\n")
    assert imports_of(g, "methods") == {"methods.full", "config"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("command", ["", "lora", "dreambooth", "textual-inversion", "generate", "eval", "merge", "convert"])
def test_help_does_not_import_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    code = ("import sys\nfrom adapt.cli import app\n"
            f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "NO-TORCH", f"`adapt {command} --help` imported torch"
