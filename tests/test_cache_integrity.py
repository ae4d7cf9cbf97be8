"""The latent/text cache is verified before it is trained on: a damaged shard is re-encoded, never a crash or
silent garbage; a signal while caching stops the run cleanly with the finished shards kept."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import FAST, run_trainer, start_trainer, unet_weights
from test_resume import finish

CACHED = [*FAST, "--cache_latents", "--cache_text_embeddings", "--report_to", "none"]
SMALL_SHARDS = {"COLOSSAL_SD_CACHE_SHARD_SIZE": "8"}  # 48 samples: 6 shards


def shards_of(cache: Path) -> list:
    return sorted(cache.glob("colossal_sd_latents/*/shard-*"))


def damage(shards: list):
    """The ways a shard goes bad, one per shard: truncated, emptied by a power cut, corrupted in place (same
    size), a file lost, written before checksums existed; the last one stays intact."""
    truncated, emptied, flipped, lost, old = (s / "latents.npy" for s in shards[:5])
    truncated.write_bytes(truncated.read_bytes()[:100])
    emptied.write_bytes(b"")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 16])
    flipped.write_bytes(bytes(data))
    lost.unlink()
    (old.parent / "manifest.json").unlink()


@pytest.fixture(scope="module")
def damaged_cache_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    cache = tmp / "cache"
    first = run_trainer(*CACHED, "--cache_dir", cache, "--output_dir", tmp / "first", env=SMALL_SHARDS)
    shards = shards_of(cache)
    damage(shards)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shards[0].parent / f".tmp-shard-00003-pid{dead.pid}@{socket.gethostname()}-k1lled00"
    stale.mkdir()
    (stale / "latents.npy").write_bytes(b"half")
    second = run_trainer(*CACHED, "--cache_dir", cache, "--output_dir", tmp / "second", env=SMALL_SHARDS)
    return SimpleNamespace(tmp=tmp, shards=shards, stale=stale, first=first.stdout + first.stderr,
                           second=second.stdout + second.stderr)


def test_damaged_shards_are_re_encoded_and_the_log_counts_them(damaged_cache_runs):
    log = damaged_cache_runs.second
    assert "Traceback" not in log
    assert ("cache: 4 shards failed their checksum and 1 shard had no checksum manifest (an older cache), and are "
            "re-encoded") in log
    assert "cache: encoded 40 of 48 samples" in log
    assert "cache: removed 1 stale temporary shard folder left by interrupted runs" in log
    assert not damaged_cache_runs.stale.exists()
    assert not list(damaged_cache_runs.shards[0].parent.glob(".tmp-*"))


def test_a_repaired_cache_trains_to_the_same_weights_as_the_intact_one(damaged_cache_runs):
    expected, actual = unet_weights(damaged_cache_runs.tmp / "first"), unet_weights(damaged_cache_runs.tmp / "second")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_shard_is_checked_against_its_manifest(tmp_path):
    from colossal_sd import caching
    target = caching.shard_dir(tmp_path, 0)
    caching.write_shard_atomically(target, {"latents": np.arange(1000.0), "skipped": np.zeros(3)})
    assert json.loads((target / "manifest.json").read_text())["files"].keys() == {"latents.npy", "skipped.npy"}
    assert caching.shard_problem(target, ["latents", "skipped"]) == 0
    assert caching.shard_problem(target, ["latents", "text"]) == caching.CORRUPT  # an array this run needs
    assert caching.shard_problem(caching.shard_dir(tmp_path, 1), []) == caching.MISSING
    # a bad shard is replaced in one rename, and the replacement verifies
    (target / "skipped.npy").write_bytes(b"\0" * (target / "skipped.npy").stat().st_size)
    assert caching.shard_problem(target, ["latents"]) == caching.CORRUPT
    caching.write_shard_atomically(target, {"latents": np.arange(1000.0), "skipped": np.zeros(3)}, replace=True)
    assert caching.shard_problem(target, ["latents", "skipped"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000"]


def test_only_the_temp_folders_of_gone_writers_are_removed(tmp_path):
    from colossal_sd import caching
    host = socket.gethostname()
    live = tmp_path / f".tmp-shard-00000-pid{os.getpid()}@{host}-abcd1234"
    elsewhere = tmp_path / ".tmp-shard-00001-pid1@another-node-abcd1234"
    for folder in (live, elsewhere):
        folder.mkdir()
    assert caching.remove_stale_temps(tmp_path) == 0
    assert caching.remove_stale_temps(tmp_path, now=time.time() + caching.STALE_TEMP_S + 1) == 2


# ---------------------------------------------------------------- a signal while caching


@pytest.mark.parametrize("signum, nproc", [(signal.SIGINT, 2), (signal.SIGTERM, None)],
                         ids=["SIGINT-2-processes", "SIGTERM-plain-python"])
def test_a_signal_while_caching_keeps_the_finished_shards_and_exits_0(tmp_path, monkeypatch, signum, nproc):
    # 31 shards of 16: under 2 processes one rank has a shard more than the other, and both still agree to stop
    monkeypatch.setenv("COLOSSAL_SD_CACHE_SHARD_SIZE", "16")
    args = [*CACHED, "--max_train_samples", 496, "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "out"]
    proc = start_trainer(*args, nproc=nproc, launcher="colossal_sd.launch")
    deadline = time.time() + 300
    while not shards_of(tmp_path / "cache") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    log = finish(proc, [])
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log
    stops = re.findall(rf"stopped by {signum.name} while caching: (\d+) of 31 shards are cached and kept; rerun "
                       r"the same command to continue", log)
    assert len(stops) == 1, log[-4000:]
    kept = int(stops[0])
    assert 1 <= kept < 31 and len(shards_of(tmp_path / "cache")) == kept
    assert not (tmp_path / "out" / "unet").exists()

    rerun = run_trainer(*args, "--max_train_steps", 1)
    assert f"cache: encoded {496 - 16 * kept} of 496 samples" in rerun.stdout + rerun.stderr
