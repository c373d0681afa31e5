"""Run an adapt command (or a class-image request) with faults injected, for the fault-injection tests
(tests/test_faults.py, tests/test_faults_files.py).

    python tests/faults_inject.py [--slow-step K SECONDS] [--die-writing GLOB N] -- adapt ARGS...
    python tests/faults_inject.py [...] -- class-images MODEL CACHE_ROOT COUNT [BARRIER_DIR]

--slow-step K SECONDS   training step K takes SECONDS longer (a window to signal a step in flight)
--die-writing GLOB N    the N-th atomic write of a file named GLOB is cut off halfway and the
                        process SIGKILLs itself before the rename (power cut, OOM killer)
class-images            ensure_class_images(MODEL, "a photo of cat", COUNT, 16 px), each render
                        0.3 s slower; with BARRIER_DIR it starts only when BARRIER_DIR/go exists
                        (after writing BARRIER_DIR/ready-PID). Prints {"rendered": n, "files": [...]}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path


def slow_step(step: int, seconds: float) -> None:
    import adapt.train

    real, calls = adapt.train.diffusion_loss, [0]

    def slow(*a, **k):
        calls[0] += 1
        if calls[0] == step:
            time.sleep(seconds)
        return real(*a, **k)

    adapt.train.diffusion_loss = slow


def die_writing(pattern: str, nth: int) -> None:
    import adapt.fileio as fileio  # patched before any module that imports atomic_path by name

    real, seen = fileio.atomic_path, [0]

    @contextmanager
    def dying(path):
        with real(path) as tmp:
            yield tmp
            if fnmatch(Path(path).name, pattern):
                seen[0] += 1
                if seen[0] == nth:
                    tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                    os.kill(os.getpid(), signal.SIGKILL)

    fileio.atomic_path = dying


def class_images(model: str, root: str, count: str, barrier: str | None = None) -> None:
    import adapt.infer

    real, rendered = adapt.infer.generate, [0]

    def counting(pipe, prompts, seeds, **kw):
        rendered[0] += len(seeds)
        time.sleep(0.3)
        return real(pipe, prompts, seeds, **kw)

    adapt.infer.generate = counting
    from adapt.classimages import ensure_class_images

    if barrier:
        (Path(barrier) / f"ready-{os.getpid()}").touch()
        while not (Path(barrier) / "go").exists():
            time.sleep(0.01)
    _, files = ensure_class_images(model, "a photo of cat", int(count), 16, scheduler="euler", steps=2, cache_root=root,
                                   batch_size=1, progress=False)
    print(json.dumps({"rendered": rendered[0], "files": [f.name for f in files]}), flush=True)


def main(argv: list[str]) -> None:
    split = argv.index("--")
    faults, command = argv[:split], argv[split + 1:]
    while faults:
        name, a, b, *faults = faults
        {"--slow-step": lambda: slow_step(int(a), float(b)), "--die-writing": lambda: die_writing(a, int(b))}[name]()
    if command[0] == "class-images":
        class_images(*command[1:])
        return
    from adapt.cli import main as adapt_main

    sys.argv = command
    adapt_main()


if __name__ == "__main__":
    main(sys.argv[1:])
