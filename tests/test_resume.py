"""Checkpoints and exact resume: a run stopped in any way and resumed ends with the weights of a run that never
stopped. One reference run and one chain of interrupted runs per process count serve all the assertions."""

import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_trainer, start_trainer, unet_weights
from test_bad_input import assert_one_line_error

STEPS = 8
RUN = [*FAST, "--max_train_steps", STEPS, "--report_to", "none"]
# 2 processes x batch 4 over 24 samples: 3 batches an epoch, so the chain also stops at an epoch boundary.
PROCESS_CASES = {1: [], 2: ["--max_train_samples", "24"]}


def read_until(proc, text, log):
    """Collect the trainer's log lines until one contains `text`."""
    for line in proc.stdout:
        log.append(line)
        if text in line:
            return
    raise AssertionError(f"the trainer ended before printing {text!r}:\n{''.join(log)[-4000:]}")


def kill_with_workers(pid):
    """SIGKILL to the trainer and every process under it at once, as when the machine disappears (torchrun
    puts each worker in a session of its own, so a process-group kill would miss them)."""
    import psutil
    launcher = psutil.Process(pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.kill()


def finish(proc, log, timeout=300):
    log.append(proc.communicate(timeout=timeout)[0])
    return "".join(log)


def interrupted_chain(out, nproc, extra):
    """Train to STEPS in four invocations, each ended differently: --stop_after_steps, SIGKILL of every process
    right after a checkpoint, SIGTERM mid-run, and the end. Returns what the test needs to look at."""
    args = [*RUN, *extra, "--output_dir", out]
    torchrun = nproc if nproc > 1 else None
    result = {"stop": run_trainer(*args, "--stop_after_steps", 2, nproc=torchrun)}
    result["after_stop"] = sorted(p.name for p in out.iterdir())
    (out / "checkpoint-999" / "unet").mkdir(parents=True)  # a write killed before its completion marker

    log = []
    killed = start_trainer(*args, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 3, nproc=torchrun)
    read_until(killed, f"saved {out / 'checkpoint-3'}", log)
    kill_with_workers(killed.pid)
    result["killed"] = finish(killed, log)

    # Under 2 processes, the signal goes to the launcher only, as Kubernetes sends it; torchrun forwards it.
    log = []
    termed = start_trainer(*args, "--resume_from_checkpoint", "latest", nproc=torchrun, launcher="colossal_sd.launch")
    read_until(termed, "step 4:", log)
    termed.send_signal(signal.SIGTERM)
    result["termed"], result["termed_rc"] = finish(termed, log), termed.returncode

    resume_from = re.search(r"stopped by SIGTERM at step \d+; to continue, rerun with --resume_from_checkpoint (\S+)",
                            result["termed"])
    assert resume_from, result["termed"][-4000:]
    result["termed_checkpoint"] = Path(resume_from.group(1))
    result["end"] = run_trainer(*args, "--resume_from_checkpoint", resume_from.group(1), nproc=torchrun)
    return result


@pytest.fixture(scope="module", params=sorted(PROCESS_CASES), ids=lambda n: f"{n}-process")
def runs(request, tmp_path_factory):
    nproc, extra = request.param, PROCESS_CASES[request.param]
    reference = tmp_path_factory.mktemp(f"reference-{nproc}")
    run_trainer(*RUN, *extra, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--output_dir", reference,
                nproc=nproc if nproc > 1 else None)
    chain = tmp_path_factory.mktemp(f"chain-{nproc}")
    return reference, chain, interrupted_chain(chain, nproc, extra)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(runs):
    reference, chain, _ = runs
    expected, actual = unet_weights(reference), unet_weights(chain)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_stop_after_steps_exits_0_with_a_checkpoint_and_no_pipeline(runs):
    _, chain, result = runs
    assert "stopped after --stop_after_steps 2 at step 2" in result["stop"].stdout
    assert result["after_stop"] == ["checkpoint-2", "training_config.toml"]  # no pipeline; the settings that rerun it


def test_latest_skips_a_partial_checkpoint_and_a_killed_run_loses_nothing(runs):
    _, chain, result = runs
    assert f"skipping {chain / 'checkpoint-999'}: incomplete" in result["killed"]
    assert f"resumed from {chain / 'checkpoint-2'} at step 2" in result["killed"]
    assert f"resumed from {chain / 'checkpoint-3'} at step 3" in result["termed"]


def test_sigterm_writes_a_checkpoint_and_exits_0(runs):
    _, chain, result = runs
    assert result["termed_rc"] == 0, result["termed"][-4000:]
    assert (result["termed_checkpoint"] / "checkpoint_complete.json").is_file()
    assert "saved the pipeline" not in result["termed"]


def test_rotation_keeps_the_newest_checkpoints(runs):
    reference, _, _ = runs
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]
    assert not list(reference.glob(".tmp-*"))


def test_a_checkpoint_unet_loads_with_diffusers(runs):
    from diffusers import UNet2DConditionModel
    reference, _, _ = runs
    unet = UNet2DConditionModel.from_pretrained(reference, subfolder=f"checkpoint-{STEPS}/unet")
    final = unet_weights(reference)
    assert all(torch.equal(unet.state_dict()[k], final[k]) for k in final)


# ---------------------------------------------------------------- fast checks of the pure parts


def test_latest_with_no_checkpoint_starts_fresh_and_says_so(tmp_path):
    from colossal_sd.checkpoint import resolve_resume
    said = []
    assert resolve_resume("latest", tmp_path, said.append) is None
    assert said == [f"--resume_from_checkpoint latest: no complete checkpoint in {tmp_path}, starting fresh"]


def test_a_checkpoint_with_a_truncated_file_is_skipped(tmp_path):
    from colossal_sd.checkpoint import _seal, find_latest
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        torch.save({"state": {}}, tmp_path / f"checkpoint-{step}" / "optimizer.bin")
        _seal(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-2" / "optimizer.bin").write_bytes(b"x" * 3)
    said = []
    assert find_latest(tmp_path, said.append) == tmp_path / "checkpoint-1"
    assert said == [f"skipping {tmp_path / 'checkpoint-2'}: corrupt: optimizer.bin is missing or has the wrong size"]


def test_the_sampler_resumes_with_the_next_indices_of_the_same_epoch():
    from colossal_sd.data_position import ResumableSampler
    full = ResumableSampler(range(20), num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    resumed = ResumableSampler(range(20), num_replicas=2, rank=1, seed=3)
    resumed.set_epoch(4)
    resumed.skip(6)
    assert list(resumed) == list(full)[6:] and len(resumed) == 4
    resumed.set_epoch(5)
    assert len(list(resumed)) == 10


def test_an_explicit_bad_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    proc = run_trainer("--output_dir", tmp_path, "--resume_from_checkpoint", "checkpoint-5", check=False)
    assert_one_line_error(proc, "--resume_from_checkpoint checkpoint-5: incomplete")
    assert proc.returncode == 2
