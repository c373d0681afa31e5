"""Fault injection, part 1: a run stopped by a signal or killed mid-write, and one writer per folder (the run
folder's lock, the shared class-image cache). Each ends in a clear message with nothing lost; faults_kit.py
has the fault table and the subprocess helpers, test_faults_files.py the checkpoints and hostile files.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
from typer.testing import CliRunner

from adapt.checkpoint import damage, list_checkpoints
from adapt.cli import app
from adapt.errors import AdaptError
from adapt.signals import REPEAT_SECONDS
from faults_kit import LORA, STEPS, finish, leftovers, lora_args, losses, same_weights, start, wait_for_step

pytestmark = pytest.mark.usefixtures("fault_table", "no_process_left")


@pytest.fixture(scope="module")
def reference(tiny_model, concept_dir, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must equal, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out), cwd=out.parent))
    assert code == 0, err[-2000:]
    return out


# --- 1. graceful stop ------------------------------------------------------------------------------

def test_sigterm_at_a_random_step_checkpoints_and_resumes_bit_identical(tiny_model, concept_dir, reference, tmp_path, fault):
    target = random.Random(19).randint(5, STEPS - 10)
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out))  # no --checkpoint-every: the stop writes the only one
    wait_for_step(out, target, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    took = time.monotonic() - sent
    [ckpt] = list_checkpoints(out / "checkpoints")
    stopped = int(ckpt.name.split("-")[1])
    assert code == 143, err[-2000:]
    assert f"stopped by SIGTERM after step {stopped} of {STEPS}; checkpoint {ckpt}. Continue with --resume latest" in err
    assert target <= stopped < STEPS and len(losses(out)) == stopped and damage(ckpt) is None

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert losses(out) == losses(reference) and same_weights(out / LORA, reference / LORA)
    fault(f"SIGTERM at step {target} (seeded)", f"checkpoint of step {stopped} written, exit 143 {took:.1f} s after "
          "the signal; resumed losses and weights bit-identical")


def test_a_second_sigint_stops_at_once_and_keeps_what_was_written(tiny_model, concept_dir, reference, tmp_path, fault):
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out, "--checkpoint-every", "10"), "--slow-step", "25", "600")
    wait_for_step(out, 24, proc)  # step 25 takes 10 minutes
    proc.send_signal(signal.SIGINT)
    time.sleep(REPEAT_SECONDS + 0.5)
    assert proc.poll() is None  # the first one waits for the step to end
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    took = time.monotonic() - sent
    assert code == 130 and "SIGINT: stopping after this step" in err and "interrupted; files already written" in err
    assert took < 300  # not the 10 minutes the step would have taken
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-000010", "step-000020"] and all(damage(p) is None for p in kept)
    assert len(losses(out)) == 24 and leftovers(out) == []

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert losses(out) == losses(reference) and same_weights(out / LORA, reference / LORA)
    fault("second SIGINT during a step", f"exit 130 {took:.1f} s after it (the step had 10 minutes to go); checkpoints "
          "10, 20 intact; resumed run bit-identical")


def test_kill_during_the_final_save(tiny_model, concept_dir, reference, tmp_path, fault):
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out, "--checkpoint-every", "20"), "--die-writing", LORA, "1")
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err[-2000:]
    assert not (out / LORA).exists() and not (out / "recipe.json").exists()  # no half file under the real name
    [last] = list_checkpoints(out / "checkpoints")
    assert len(leftovers(out)) == 1 and damage(last) is None

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert "removed 1 partial file(s)" in err and leftovers(out) == []
    assert same_weights(out / LORA, reference / LORA)
    fault("SIGKILL halfway through writing the final LoRA", f"no file under the real name; --resume latest from {last.name} "
          "removes the partial file and writes the bit-identical LoRA")


# --- 2. one writer per folder ----------------------------------------------------------------------

def test_a_live_run_holds_its_folder_and_a_killed_runs_lock_is_taken_over(tiny_model, concept_dir, tmp_path, fault,
                                                                         monkeypatch, caplog):
    import adapt.launch  # imported now, so the patch below meets the name the run calls, alone or in a suite

    out = tmp_path / "run"
    holder = start(lora_args(concept_dir, tiny_model, out, "--steps", "100000", "--checkpoint-every", "10"))
    wait_for_step(out, 12, holder)

    def never(*a, **k):
        raise AssertionError("the refused run loaded a model")

    monkeypatch.setattr(adapt.launch, "load_components", never)
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, out, "--steps", "100000", "--resume", "latest")[1:])
    assert result.exit_code == 2 and f"is in use by PID {holder.pid}, a training run" in result.output
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, out, "--steps", "100000")[1:])
    assert result.exit_code == 2 and "holds the checkpoints of an unfinished run; pass --resume latest" in result.output
    monkeypatch.undo()

    holder.kill()
    holder.wait()
    assert (out / ".adapt.lock").is_file()  # the killed run's, stale
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, out, "--steps", "20", "--checkpoint-every", "10",
                                               "--resume", "latest")[1:])
    assert result.exit_code == 0, result.output
    assert f"took over the lock of PID {holder.pid}, which is no longer running" in caplog.text
    assert (out / LORA).is_file() and not (out / ".adapt.lock").exists()
    fault("second run into a folder a live run holds; then the holder SIGKILLed",
          f"refused at once naming PID {holder.pid}; the stale lock taken over, run resumed and finished")


def test_a_run_that_fails_at_set_up_leaves_no_empty_folder_and_keeps_a_users(tiny_model, concept_dir, tmp_path, fault):
    from adapt.locks import FolderLock

    new = tmp_path / "new" / "run"  # neither folder exists yet
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, new, "--resume", "latest")[1:])
    assert result.exit_code == 2 and "no checkpoint in" in result.output, result.output
    assert not (tmp_path / "new").exists()  # the run made both folders and removed both

    mine = tmp_path / "mine"
    mine.mkdir()
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, mine, "--resume", "latest")[1:])
    assert result.exit_code == 2 and mine.is_dir() and list(mine.iterdir()) == []  # the user's own folder stays

    with pytest.raises(AdaptError):
        with FolderLock(tmp_path / "a" / "b", "a training run"):
            (tmp_path / "a" / "b" / "kept.txt").write_text("written before the failure")
            raise AdaptError("set-up failed")
    assert (tmp_path / "a" / "b" / "kept.txt").read_text() == "written before the failure"
    fault("a run fails at set-up (--resume latest with no checkpoint) in a folder it created",
          "exit 2 with the reason; the folders it created are gone, a folder the user made or one with a file in it stays")


def test_two_dreambooth_runs_share_the_class_image_cache(tiny_model, tmp_path, fault):
    barrier, root = tmp_path / "barrier", tmp_path / "cache"
    barrier.mkdir()
    procs = [start(["class-images", str(tiny_model), str(root), "4", str(barrier)]) for _ in range(2)]
    deadline = time.time() + 900
    while len(list(barrier.glob("ready-*"))) < 2:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.01)
    (barrier / "go").touch()  # both ask for the same 4 images at the same moment
    results = []
    for p in procs:
        code, stdout, err = finish(p)
        assert code == 0, err[-2000:]
        results.append(json.loads(stdout.splitlines()[-1]))
    assert sorted(r["rendered"] for r in results) == [0, 4]  # each image rendered once
    assert results[0]["files"] == results[1]["files"] == [f"class-{i:05d}.png" for i in range(4)]
    [folder] = root.iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(i["file"] for i in manifest["images"]) == results[0]["files"]
    fault("two DreamBooth processes start on one class-image cache", "one renders 4 images, the other waits and reuses "
          "them; manifest lists each image once")


def test_kill_during_class_image_generation(tiny_model, tmp_path, fault, caplog):
    from adapt.classimages import ensure_class_images
    from adapt.images import load_rgb

    root = tmp_path / "cache"
    code, _, err = finish(start(["class-images", str(tiny_model), str(root), "5"], "--die-writing", "class-*.png", "3"))
    assert code == -signal.SIGKILL, err[-2000:]
    [folder] = root.iterdir()
    assert sorted(p.name for p in folder.glob("class-*.png")) == ["class-00000.png", "class-00001.png"]
    assert len(json.loads((folder / "manifest.json").read_text())["images"]) == 2

    kw = dict(scheduler="euler", steps=2, batch_size=1, progress=False)
    again, files = ensure_class_images(str(tiny_model), "a photo of cat", 5, 16, cache_root=root, **kw)
    assert again == folder and "took over the lock of PID" in caplog.text and leftovers(folder) == []
    _, fresh = ensure_class_images(str(tiny_model), "a photo of cat", 5, 16, cache_root=tmp_path / "fresh", **kw)
    assert [list(load_rgb(a).getdata()) == list(load_rgb(b).getdata()) for a, b in zip(files, fresh)] == [True] * 5
    assert [i["file"] for i in json.loads((folder / "manifest.json").read_text())["images"]] == [f.name for f in files]
    fault("SIGKILL halfway through writing class image 3 of 5", "2 whole images kept; the next run takes the stale lock, "
          "drops the partial file, renders 3 more, equal to a fresh set")
