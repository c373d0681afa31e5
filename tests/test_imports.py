"""The package's imports flow one way (README, Development): a module imports only modules of its
own level or below, never in a cycle, whether at module level or inside a function; and the
modules that answer `--help` and argument errors do so without importing torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapt"

# Lower levels never import higher ones. Same level: allowed, but no cycles.
LAYERS = [
    ["__init__", "errors"],
    ["fileio", "schedulers", "images", "lora_names", "logs", "signals", "locks", "untrusted", "estimate", "precision"],
    ["config", "train_config", "checks", "recipe"],
    ["data", "masks", "models", "loras", "lycoris", "lowrank", "embeddings", "formats", "diskcache"],
    ["encode", "losses", "methods", "methods.full", "methods.lora", "methods.textual_inversion", "methods.pivotal"],
    ["infer", "checkpoint", "ema", "metrics", "optim"],
    ["report", "classimages", "evaluate", "eval_io", "lora_tools", "validation", "extract"],
    ["run", "train"],
    ["launch"],
    ["plan", "dryrun"],
    ["options", "lora_commands", "cli", "__main__"],
]
LEVEL = {name: k for k, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_of(path: Path, name: str) -> list[str]:
    """The package a module's relative imports start from, as a list of names."""
    return [] if name == "__init__" else name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]


def adapt_targets(node: ast.AST, package: list[str]) -> set[str]:
    """The adapt modules one import statement imports (empty for other libraries)."""
    found = set()
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
        elif node.module and node.module.startswith("adapt"):
            target = node.module.removeprefix("adapt").lstrip(".")
        else:
            return found
        for alias in node.names:  # `from . import x` / `from .methods import lora` import modules
            sub = f"{target}.{alias.name}" if target else alias.name
            found.add(sub if sub in LEVEL else target or "__init__")
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("adapt."):
                found.add(alias.name.removeprefix("adapt."))
    return found


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """adapt modules imported anywhere in the file (module level or inside functions)."""
    name = name or module_name(path)
    package = package_of(path, name)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found |= adapt_targets(node, package)
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


@pytest.mark.parametrize("command", ["", "lora", "dreambooth", "textual-inversion", "generate", "eval", "merge", "convert",
                                     "extract", "resize"])
def test_help_does_not_import_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    code = ("import sys\nfrom adapt.cli import app\n"
            f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "NO-TORCH", f"`adapt {command} --help` imported torch"


# --- LIGHT modules: what `adapt --help`, `adapt CMD --help` and argument errors import -------------
# They import nothing heavy at module level (heavy imports stay inside their functions). Every
# other module imports what it uses at the top.
LIGHT = {
    "__init__", "errors", "logs", "signals", "schedulers",  # the CLI's own imports and its callback
    "cli", "__main__", "options", "checks", "config", "train_config", "recipe",  # options, --help, arg checks
    "lora_commands",                                         # merge, convert, extract, resize
    "methods",                                               # the METHODS table the options come from
    "plan",                                                  # make_plan: every run argument error
    "methods.full", "methods.lora", "methods.textual_inversion",  # plan loads the method class (settle)
    "methods.pivotal",                                       # ... `lora --pivotal`'s
    "embeddings",                                            # methods.textual_inversion imports it
    "models",                                                # plan resolves --model (its adapt.json)
    "fileio", "untrusted",                                   # plan (RECIPE_FILE), models (folder checks)
    "locks",                                                 # run_plan refuses a held run folder first
    "estimate",                                              # train_config: --fused-backward on's conflicts
}
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "PIL")
# In-function imports a non-LIGHT module may keep: optional, slow, and needed for one option only.
ALLOWED_LAZY = {
    ("data", "datasets"): "optional and slow; only --dataset needs it (after HF_DATASETS_OFFLINE is set)",
    ("optim", "prodigyopt"): "optional; only --optimizer prodigy needs it",
    ("optim", "schedulefree"): "optional; only --optimizer schedule-free-adamw needs it",
    ("run", "tensorboard"): "optional; only --log-with tensorboard needs it",
}
CHECKED = (*HEAVY, "datasets", "bitsandbytes", "tensorboard", "prodigyopt", "schedulefree")


def test_light_modules_and_argument_errors_import_nothing_heavy(tmp_path):
    """Argument errors of every kind load only LIGHT modules, and importing every LIGHT module
    loads none of the heavy libraries."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    errors = [["--help"], ["lora", "--help"], ["schedulers"], ["generate", "x", "--size", "30"], ["eval"], ["merge"],
              ["extract", "--model", str(tmp_path / "missing")], ["extract", "--model", str(images), "--rank", "0"],
              ["resize", str(images / "a.png"), "--energy", "2", "--output", "x.safetensors"],
              *([cmd, "--images", str(images), "--token", "<sks>", "--resume", "latest"]
                for cmd in ("lora", "dreambooth", "textual-inversion")),
              ["dreambooth", "--lora", "--images", str(images), "--token", "<sks>", "--resume", "latest"],
              ["lora", "--pivotal", "--images", str(images), "--token", "<sks>"]]  # needs --init-token
    importable = sorted(LIGHT - {"__main__"})  # importing __main__ runs the CLI; it only imports cli
    code = ("import importlib, json, sys\nfrom adapt.cli import app\n"
            f"for argv in {errors!r}:\n"
            "    try:\n        app(argv)\n    except SystemExit:\n        pass\n"
            "loaded = sorted(m.removeprefix('adapt.') for m in sys.modules if m.startswith('adapt.'))\n"
            f"for m in {importable!r}:\n"
            "    importlib.import_module('adapt' if m == '__init__' else 'adapt.' + m)\n"
            f"print(json.dumps([loaded, [h for h in {HEAVY!r} if h in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    loaded, heavy = json.loads(out.stdout.splitlines()[-1])
    assert set(loaded) <= LIGHT, f"argument errors imported non-LIGHT modules: {sorted(set(loaded) - LIGHT)}"
    assert {"plan", "models", "methods.lora", "methods.full", "methods.textual_inversion", "methods.pivotal"} <= set(loaded)
    assert heavy == [], f"importing the LIGHT modules imported {heavy}"


def lazy_imports(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, what) of every import inside a function: an adapt module by its LAYERS name, any
    other library by its top-level package."""
    name = name or module_name(path)
    package = package_of(path, name)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom):
                ours = adapt_targets(sub, package)
                out |= {(sub.lineno, t) for t in ours} if ours or sub.level else {(sub.lineno, sub.module.split(".")[0])}
            elif isinstance(sub, ast.Import):
                for alias in sub.names:
                    one = ast.Import(names=[alias])
                    out |= {(sub.lineno, t) for t in adapt_targets(one, package)} or {(sub.lineno, alias.name.split(".")[0])}
    return sorted(out)


def test_only_light_modules_import_heavy_libraries_or_adapt_modules_in_functions():
    """Everything that is not LIGHT imports torch & co. and the adapt modules it uses at the top;
    the only exceptions are ALLOWED_LAZY (and each of those is still there)."""
    assert LIGHT <= set(LEVEL)
    found, used = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name in LIGHT:
            continue
        for line, what in lazy_imports(path):
            if (name, what) in ALLOWED_LAZY:
                used.add((name, what))
            elif what in LEVEL or what in CHECKED:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {what} inside a function")
    assert not found, "import these at the top (or add the module to LIGHT / ALLOWED_LAZY with a reason):\n" + "\n".join(found)
    assert used == set(ALLOWED_LAZY), f"stale ALLOWED_LAZY entries: {sorted(set(ALLOWED_LAZY) - used)}"


def test_the_lazy_import_finder(tmp_path):
    (tmp_path / "methods").mkdir()
    f = tmp_path / "methods" / "lora.py"
    f.write_text("import torch\nfrom ..errors import AdaptError\n"
                 "def g():\n    import torch.nn\n    from ..formats import save_lora\n    from . import full\n"
                 "    from safetensors.torch import save_file\n    import adapt.infer, os\n")
    assert lazy_imports(f, "methods.lora") == [(4, "torch"), (5, "formats"), (6, "methods.full"), (7, "safetensors"),
                                               (8, "infer"), (8, "os")]


def test_a_training_run_does_not_load_bitsandbytes(tiny_model, concept_dir, tmp_path):
    """diffusers imports bitsandbytes whenever it is installed (seconds of start-up); the CLI defers
    it, and --optimizer adamw8bit still gets it."""
    code = f"""
import sys
from typer.testing import CliRunner
from adapt.cli import app
r = CliRunner().invoke(app, ["lora", "--images", "{concept_dir}", "--token", "<t>", "--model", "{tiny_model}",
                             "--steps", "1", "--resolution", "16", "--output", "{tmp_path / 'run'}"])
assert r.exit_code == 0, r.output
assert "diffusers" in sys.modules and sys.modules.get("bitsandbytes") is None, "bitsandbytes was imported"
from adapt.logs import optional_import
try:
    optional_import("bitsandbytes")
except ImportError:
    pass  # not installed here: nothing to defer either
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
