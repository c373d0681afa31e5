"""How long until a training command trains? (issue 16, item 4: start-up)

Each measurement is `python -m adapt lora ...` in a fresh process (the console script's path), with
its own empty disk cache (ADAPT_CACHE_DIR), as a first run:

* first step: the tiny test model (16 px, 2 steps); seconds from the process start until the
  first row of metrics.jsonl appears (the loop writes it after optimizer step 1), polled every 10 ms;
* quickstart: README's `adapt lora --images examples/cat --token "<sks>"` on the bundled base
  (the steps its adapt.json recommends), the whole wall, and its own time to the first step.

With several source trees (e.g. main before a change and after it) the runs are interleaved
(tree A, tree B, tree A, ...) so a load that changes over time hits both; it prints every run,
then the median of each. CPU seconds (user + sys of the process) are printed beside the wall,
since they move less than the wall when other jobs share the machine. Run it idle to quote it:

    python benchmarks/startup.py                                   # this checkout
    python benchmarks/startup.py --trees /work/h-before /work/h-speed --runs 5 --quickstart-runs 1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd_models import _images  # benchmarks/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_run(tree: Path, args: list[str], work: Path) -> dict:
    """`python -m adapt ARGS` from source tree `tree`: wall, CPU and time to the first metrics row."""
    out = work / "run"
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "ADAPT_CACHE_DIR": str(work / "cache")}
    metrics = out / "metrics.jsonl"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log = work / "stderr.txt"  # a file, not a pipe: 500 steps of progress bars would fill a pipe and block the run
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "adapt", *args, "--output", str(out)], cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        first = None
        while proc.poll() is None:
            if first is None and metrics.is_file() and metrics.stat().st_size > 0:
                first = time.perf_counter() - start
            time.sleep(0.01)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{tree}: adapt {' '.join(args)} failed ({proc.returncode}):\n{log.read_text()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"first_step": first if first is not None else wall, "wall": wall, "cpu": cpu}


def measure(trees: list[Path], runs: int, args_of, label: str) -> dict[Path, list[dict]]:
    """`runs` rounds, each tree once per round (interleaved); every run printed as it ends."""
    results: dict[Path, list[dict]] = {t: [] for t in trees}
    for r in range(runs):
        for tree in trees:
            with tempfile.TemporaryDirectory(prefix="adapt-startup-") as tmp:
                res = timed_run(tree, args_of(tree), Path(tmp))
            results[tree].append(res)
            print(f"{label} run {r + 1}/{runs} {tree}: first step {res['first_step']:.2f} s, wall {res['wall']:.2f} s, "
                  f"cpu {res['cpu']:.2f} s (load avg {os.getloadavg()[0]:.1f})", flush=True)
    return results


def summary(label: str, results: dict[Path, list[dict]]) -> None:
    print(f"\n{label}: median over {len(next(iter(results.values())))} run(s)")
    print(f"{'tree':<40} {'first step s':>12} {'wall s':>9} {'cpu s':>9}")
    for tree, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("first_step", "wall", "cpu")}
        print(f"{str(tree):<40} {med['first_step']:>12.2f} {med['wall']:>9.2f} {med['cpu']:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="adapt source folders to compare (PYTHONPATH)")
    ap.add_argument("--runs", type=int, default=5, help="tiny-model runs per tree (0: skip)")
    ap.add_argument("--quickstart-runs", type=int, default=1, help="quickstart runs per tree (0: skip; ~5 min each on CPU)")
    a = ap.parse_args()
    from adapt.models import BUNDLED_MODEL, build_tiny_pipeline, model_defaults

    fixed = Path(tempfile.mkdtemp(prefix="adapt-startup-inputs-"))
    tiny, images = build_tiny_pipeline(fixed / "tiny"), _images(fixed / "images", 24, n=3)  # noise: content does not matter
    trees = [t.resolve() for t in a.trees]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load avg at start {os.getloadavg()[0]:.1f}")
    tiny_args = ["lora", "--images", str(images), "--token", "<t>", "--model", str(tiny), "--steps", "2", "--resolution", "16"]
    if a.runs:
        summary("tiny model, time to first training step", measure(trees, a.runs, lambda t: tiny_args, "tiny"))
    if a.quickstart_runs:
        quick = measure(trees, a.quickstart_runs, lambda t: ["lora", "--images", str(t / "examples" / "cat"), "--token", "<sks>"],
                        "quickstart")
        steps = model_defaults(BUNDLED_MODEL)["lora"]["steps"]  # this checkout's; each tree runs its own adapt.json
        summary(f'quickstart `adapt lora --images examples/cat --token "<sks>"` (bundled base, {steps} steps)', quick)
    print(f"load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
