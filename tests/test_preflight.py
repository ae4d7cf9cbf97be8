"""Where the run writes: folders checked before any heavy work, one live run per --output_dir, a full disk in
one line with what was saved before kept."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, _run, run_trainer, start_trainer, trainer_command
from test_bad_input import assert_one_line_error
from test_resume import finish, read_until

RUN = [*FAST, "--report_to", "none"]

# A small disk of its own: a tmpfs mounted in a private user and mount namespace (no root needed, gone when the
# command ends). Inside, the user is root, for whom permission bits never block a write: a read-only mount does.
ON_SMALL_DISK = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; disk=$2; keep=$3; shift 3; "$@"; rc=$?; '
                 'cp -a "$disk/." "$keep"; exit $rc')


def _can_mount() -> bool:
    probe = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', os.getcwd()]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm and tmpfs (user namespaces)")


def run_on_small_disk(tmp_path, options, *args):
    """The trainer with tmp_path/disk a tmpfs mounted with `options`; the disk's contents end in tmp_path/kept."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "kept").mkdir()
    command = ["unshare", "-rm", "sh", "-c", ON_SMALL_DISK, "sh", options, tmp_path / "disk", tmp_path / "kept",
               *trainer_command(*args)]
    return _run([str(c) for c in command], None, 600, False)


# ---------------------------------------------------------------- pre-flight


def test_a_folder_under_a_regular_file_is_one_line_before_loading_anything(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for flag in ("--output_dir", "--cache_dir"):
        folders = {"--output_dir": tmp_path / "out", "--cache_dir": tmp_path / "cache", flag: tmp_path / "file" / "x"}
        proc = run_trainer(*RUN, "--cache_latents", *[str(a) for pair in folders.items() for a in pair], check=False)
        assert_one_line_error(proc, f"{flag} {tmp_path / 'file' / 'x'} is not writable: {tmp_path / 'file'} is a "
                                    "regular file, not a folder")
        assert "plugin=" not in proc.stdout  # nothing was loaded


@needs_mount
def test_a_read_only_output_dir_is_one_line_before_training(tmp_path):
    proc = run_on_small_disk(tmp_path, "ro,size=1m", *RUN, "--output_dir", tmp_path / "disk" / "out")
    assert_one_line_error(proc, f"--output_dir {tmp_path / 'disk' / 'out'} is not writable: the file system is "
                                "read-only")
    assert proc.returncode == 2


def test_output_dir_equal_to_the_base_model_folder_is_refused(tmp_path, tiny_sd):
    base = tmp_path / "my-model"
    shutil.copytree(tiny_sd, base)
    before = (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    proc = run_trainer(*RUN, "--pretrained_model_name_or_path", base, "--output_dir", str(base) + "/", check=False)
    assert_one_line_error(proc, "is the base model's folder (--pretrained_model_name_or_path): saving would "
                                "overwrite the base model")
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


@needs_mount
def test_a_full_disk_is_warned_of_and_fails_in_one_line_keeping_the_checkpoint(tmp_path):
    # 60 MiB: the tiny model's checkpoint (UNet + AdamW state, ~40 MiB) fits, the final pipeline (~31 MiB) not
    out = tmp_path / "disk" / "out"
    proc = run_on_small_disk(tmp_path, "size=60m", *RUN, "--checkpointing_steps", 2, "--output_dir", out)
    assert re.search(f"warning: {re.escape(str(out))} has [0-9]+ MiB free, but one checkpoint plus the final save "
                     "need about [0-9]+ MiB", proc.stdout)
    assert proc.stdout.index("warning:") < proc.stdout.index("step 1:")
    assert_one_line_error(proc, "no space left on the device while writing")
    assert "--resume_from_checkpoint latest" in proc.stderr
    from colossal_sd.checkpoint import problem
    kept = tmp_path / "kept" / "out"
    assert problem(kept / "checkpoint-2") is None  # complete, every file of the right size
    # no temp folder, no lock left behind; the run's settings, written at start, stay
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint-2", "training_config.toml"]


def test_disk_warning_says_what_is_needed_and_what_is_free():
    from types import SimpleNamespace

    from colossal_sd.storage import disk_warning, space_needed
    # SD 1.5: UNet 860M, VAE 84M and text encoder 123M parameters
    needed = space_needed(860_000_000, 207_000_000, 860_000_000, ema=False, lora=False, single_file=False)
    assert needed == (860_000_000 * 3 + 1_067_000_000) * 4  # ~14 GiB
    fake = lambda free: (lambda path: SimpleNamespace(free=free))  # noqa: E731
    assert disk_warning("out", needed, fake(20 * 2**30)) is None
    assert disk_warning("out", needed, fake(5 * 2**30)) == (
        "warning: out has 5.0 GiB free, but one checkpoint plus the final save need about 13.6 GiB: free some "
        "space, or the run may fail when it saves")


# ---------------------------------------------------------------- one live run per output_dir


def test_a_second_live_run_on_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    first, log = start_trainer(*RUN, "--max_train_steps", 6, "--output_dir", out), []
    read_until(first, "step 1:", log)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run: its heartbeat stops too, yet it lives
    try:
        second = run_trainer(*RUN, "--output_dir", out, check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, f"{out} is in use by another run (pid {first.pid} on host "
                                  f"{socket.gethostname()}, started ")
    assert "wait for it, or use another --output_dir" in second.stderr
    assert "saved the pipeline" in finish(first, log) and first.returncode == 0
    assert not (out / ".lock").exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1.7e9,
                                           "heartbeat": 1.7e9}))
    proc = run_trainer(*RUN, "--output_dir", out)
    assert f"took over the lock {out / '.lock'} of a run that is gone (pid {dead.pid} on host " in proc.stdout
    assert "saved the pipeline" in proc.stdout + proc.stderr
    assert not (out / ".lock").exists()


def test_a_lock_is_stale_when_its_pid_is_gone_or_another_host_stops_its_heartbeat(tmp_path):
    from colossal_sd import run_lock
    ours, refusal = run_lock.acquire(tmp_path, print)
    assert refusal is None and json.loads((tmp_path / ".lock").read_text()) == ours
    assert run_lock.acquire(tmp_path, print)[1].startswith(f"{tmp_path} is in use by another run (pid {os.getpid()}")
    here, now = socket.gethostname(), ours["heartbeat"]
    assert not run_lock.holder_is_gone(ours, now + 3600, here)  # alive, however late its heartbeat
    assert run_lock.holder_is_gone(dict(ours, pid_start="0"), now, here)  # the pid is another process now
    elsewhere = dict(ours, host="another-node")
    assert not run_lock.holder_is_gone(elsewhere, now + 2 * run_lock.HEARTBEAT_S, here)
    assert run_lock.holder_is_gone(elsewhere, now + 5 * run_lock.HEARTBEAT_S, here)
    run_lock.release(tmp_path / ".lock", ours)
    assert not Path(tmp_path / ".lock").exists()


def test_the_heartbeat_refreshes_the_lock_and_never_overwrites_a_run_that_took_it_over(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from colossal_sd import run_lock
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = tmp_path / ".lock"
    with run_lock.hold(tmp_path, SimpleNamespace(is_main=True, world_size=1), print):
        started = json.loads(lock.read_text())
        time.sleep(0.5)
        assert json.loads(lock.read_text())["heartbeat"] > started["heartbeat"]
        newer = dict(started, pid=started["pid"] + 1)  # this run was frozen too long: another one took over
        lock.write_text(json.dumps(newer))
        time.sleep(0.3)
        assert json.loads(lock.read_text()) == newer
    assert json.loads(lock.read_text()) == newer  # leaving, this run removes only its own lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def _race_for_the_lock(folder, start, done, results):
    from colossal_sd import run_lock
    start.wait()
    results.put(run_lock.acquire(folder, lambda message: None)[0] is not None)
    done.wait()  # alive until every racer has tried: a winner that exited would leave a stale lock


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_runs_starting_together_exactly_one_takes_the_lock(tmp_path, stale):
    import multiprocessing
    if stale:  # all of them find a dead run's lock and try to take it over at once
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    context, racers = multiprocessing.get_context("fork"), 8
    start, done, results = context.Barrier(racers), context.Barrier(racers), context.Queue()
    processes = [context.Process(target=_race_for_the_lock, args=(tmp_path, start, done, results))
                 for _ in range(racers)]
    for process in processes:
        process.start()
    won = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join()
    assert won.count(True) == 1


def test_another_hosts_lock_is_refused_while_it_beats_and_taken_once_its_heartbeat_stops(tmp_path, monkeypatch):
    import threading

    from colossal_sd import run_lock
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    lock, said = tmp_path / ".lock", []
    elsewhere = {"host": "another-node", "pid": 1, "started": time.time(), "heartbeat": time.time()}
    lock.write_text(json.dumps(elsewhere))
    stop = threading.Event()
    beat = threading.Thread(target=run_lock._heartbeat, args=(lock, elsewhere, stop))  # its run lives
    beat.start()
    try:
        assert run_lock.acquire(tmp_path, said.append)[1].startswith(f"{tmp_path} is in use by another run (pid 1 "
                                                                     "on host another-node")
    finally:
        stop.set()
        beat.join()
    ours, refusal = run_lock.acquire(tmp_path, said.append)  # its node died: no more heartbeats
    assert refusal is None and json.loads(lock.read_text()) == ours
    assert said[-1].startswith(f"took over the lock {lock} of a run that is gone (pid 1 on host another-node")
    assert "waiting up to" in said[-2]
