"""Shared by the fault-injection tests (test_faults.py, test_faults_files.py): run `adapt` in a subprocess through
faults_inject.py, wait for a step, compare runs, and the fault table.

Every test adds a row (fault, outcome, data lost) to its module's table, printed when the module ends (`pytest -n 0 -s
tests/test_faults.py`) and written to <pytest's basetemp>/fault-table-<module>.md. A row says "data lost: none" only
after the test has checked it (weights bit-identical, previous checkpoint intact, files whole); a failing test leaves
its row as FAILED. The fixtures (`fault`, and `fault_table`, `no_process_left` that a module names in its
`pytestmark`) are in conftest.py, where pytest finds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

INJECT = Path(__file__).with_name("faults_inject.py")
LORA = "pytorch_lora_weights.safetensors"
STEPS = 40
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROWS: dict[str, list[dict]] = {}  # test module -> its rows
PROCS: list[subprocess.Popen] = []


def lora_args(concept_dir, model, out, *extra):
    return ["adapt", "lora", "--images", str(concept_dir), "--token", "<sks>", "--model", str(model), "--output", str(out),
            "--steps", str(STEPS), "--batch-size", "2", "--lr", "1e-2", "--random-flip", "--caption-dropout", "0.2", *extra]


def start(args, *faults, **kw):
    """`adapt ARGS` in a subprocess, through faults_inject.py with the given faults."""
    proc = subprocess.Popen([sys.executable, str(INJECT), *faults, "--", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    PROCS.append(proc)
    return proc


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(folder, step, proc, timeout=900):
    deadline = time.time() + timeout
    while not (folder / "metrics.jsonl").is_file() or len((folder / "metrics.jsonl").read_text().splitlines()) < step:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)


def same_weights(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".adapt.lock")
