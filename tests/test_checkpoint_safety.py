"""A resume never trusts a bad checkpoint, never loses one, and never silently continues a different run.

One base run (8 steps, a checkpoint every 2) serves every test: each works on its own copy of its output_dir.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_trainer
from test_bad_input import assert_one_line_error

RUN = [*FAST, "--max_train_steps", 8, "--checkpointing_steps", 2, "--report_to", "none"]
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    run_trainer(*RUN, "--output_dir", out)
    return out


def copy_of(base: Path, folder: Path) -> Path:
    return Path(shutil.copytree(base, folder / "out"))


def resume(out, *extra, check=True):
    return run_trainer(*RUN, "--output_dir", out, *extra, check=check)


# ---------------------------------------------------------------- verified checkpoints (issue 17, case 5)


def flip_bytes(file: Path, offset: int, count: int = 16):
    """Same-size corruption: the size check cannot see it."""
    data = bytearray(file.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    file.write_bytes(bytes(data))


def sizes_only_marker(checkpoint: Path):
    """The marker as checkpoints written before checksums have it."""
    marker = checkpoint / "checkpoint_complete.json"
    recorded = json.loads(marker.read_text())
    recorded["files"] = {name: entry["size"] if isinstance(entry, dict) else entry
                         for name, entry in recorded["files"].items()}
    marker.write_text(json.dumps(recorded))


@pytest.fixture(scope="module")
def corrupt(base, tmp_path_factory):
    """checkpoint-8: a UNet weight flipped (its checksum catches it); checkpoint-6: a garbled safetensors header
    and checkpoint-4: a garbled rng_states.pt (under markers with sizes only, so only loading finds them);
    checkpoint-2: intact, with a sizes-only marker."""
    out = copy_of(base, tmp_path_factory.mktemp("corrupt"))
    flip_bytes(out / "checkpoint-8" / UNET, (out / "checkpoint-8" / UNET).stat().st_size - 64)
    flip_bytes(out / "checkpoint-6" / UNET, 8)
    flip_bytes(out / "checkpoint-4" / "rng_states.pt", 0)
    for step in (2, 4, 6):
        sizes_only_marker(out / f"checkpoint-{step}")
    named = {step: resume(out, "--resume_from_checkpoint", f"checkpoint-{step}", check=False) for step in (6, 4)}
    latest = resume(out, "--resume_from_checkpoint", "latest", "--stop_after_steps", 1)
    return out, named, latest.stdout


def test_same_size_corruption_fails_the_checksum_and_latest_skips_it(corrupt):
    out, _, log = corrupt
    assert f"skipping {out / 'checkpoint-8'}: corrupt: {UNET} does not match its checksum" in log


def test_a_garbled_safetensors_header_or_rng_state_makes_latest_take_the_previous_checkpoint(corrupt):
    out, _, log = corrupt
    assert f"skipping {out / 'checkpoint-6'}: corrupt: {UNET} cannot be read" in log
    assert f"skipping {out / 'checkpoint-4'}: corrupt: rng_states.pt cannot be read" in log
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in log  # a sizes-only marker is still accepted
    assert (out / "checkpoint-3" / "checkpoint_complete.json").is_file()


@pytest.mark.parametrize("step,file", [(6, UNET), (4, "rng_states.pt")])
def test_a_garbled_checkpoint_named_explicitly_is_one_error_line(corrupt, step, file):
    _, named, _ = corrupt
    assert_one_line_error(named[step], f"--resume_from_checkpoint checkpoint-{step}: corrupt: {file} cannot be read")


# ---------------------------------------------------------------- rotation and resume: one timeline (case 2)


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside_and_rotation_keeps_the_new_one(base, tmp_path):
    from colossal_sd.checkpoint import find_latest
    out = copy_of(base, tmp_path)
    (out / "abandoned" / "checkpoint-8").mkdir(parents=True)  # set aside by an earlier resume
    log = resume(out, "--resume_from_checkpoint", "checkpoint-2", "--checkpoints_total_limit", 1,
                 "--stop_after_steps", 3).stdout
    told = Path(re.search(r"rerun with --resume_from_checkpoint (\S+)", log).group(1))
    assert told == out / "checkpoint-5"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]
    assert find_latest(out, print) == told
    assert sorted(p.name for p in (out / "abandoned").iterdir()) == [
        "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-8-1"]
    assert (out / "abandoned" / "checkpoint-8-1" / "checkpoint_complete.json").is_file()  # the run's, whole
    assert (f"moved them into {out / 'abandoned'} (nothing is deleted): "
            "checkpoint-4, checkpoint-6, checkpoint-8-1") in log


# ---------------------------------------------------------------- resume mismatches (case 8)


def other_base_model(tiny_sd: Path, folder: Path) -> Path:
    """The embedded model with one text-encoder tensor changed: same shapes, another model."""
    from safetensors.torch import load_file, save_file
    copy = Path(shutil.copytree(tiny_sd, folder / "other-model"))
    weights = copy / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["text_model.final_layer_norm.weight"] += 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    return copy


MISMATCHES = {
    "batch size": (["--train_batch_size", 8],
                   "checkpoint-4 was trained with 4 images per step (batch 4 x accumulation 1 x 1 process), this run "
                   "has 8 (batch 8 x accumulation 1 x 1 process); pass --train_batch_size 4 "
                   "--gradient_accumulation_steps 1, or --allow_mismatched_resume to continue anyway"),
    "resolution": (["--resolution", 64],
                   "checkpoint-4 was trained at 32 px, this run asks for 64 px; pass --resolution 32, "
                   "or --allow_mismatched_resume to continue anyway"),
    "base model": (["--pretrained_model_name_or_path", "OTHER"],
                   "checkpoint-4 was trained from another base model (its text_encoder differs; "),
    "max_train_steps": (["--max_train_steps", 4],
                        "checkpoint-4 is at step 4, and --max_train_steps 4 would train no further; "
                        "pass --max_train_steps 5 or more to continue from it"),
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_a_resume_that_does_not_match_its_checkpoint_is_one_error_line(base, tiny_sd, tmp_path, name):
    extra, expected = MISMATCHES[name]
    extra = [other_base_model(tiny_sd, tmp_path) if a == "OTHER" else a for a in extra]
    out = copy_of(base, tmp_path)
    proc = resume(out, "--resume_from_checkpoint", "checkpoint-4", *extra, check=False)
    assert_one_line_error(proc, expected)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]


def test_resuming_a_finished_run_at_its_last_step_is_a_clean_no_op(base, tmp_path):
    """A job chain's one job too many: the run is done, its pipeline is there, nothing is touched."""
    out = copy_of(base, tmp_path)
    proc = resume(out, "--resume_from_checkpoint", "latest")
    assert ("checkpoint-8 is the run's last step, and " f"{out} already holds its final outputs: nothing to do"
            in proc.stdout)
    assert "Traceback" not in proc.stderr and not (out / "previous_runs").exists()


def test_another_process_count_with_the_same_images_per_step_resumes(base, tmp_path):
    out = copy_of(base, tmp_path)
    log = run_trainer(*RUN, "--output_dir", out, "--resume_from_checkpoint", "checkpoint-4", "--train_batch_size", 2,
                      "--stop_after_steps", 1, nproc=2).stdout
    assert "the checkpoint was written by 1 processes, this run has 2" in log
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in log


@pytest.fixture(scope="module")
def changed(base, tmp_path_factory):
    """A resume that asks for another batch size (allowed) and a lower learning rate."""
    out = copy_of(base, tmp_path_factory.mktemp("changed"))
    return resume(out, "--resume_from_checkpoint", "checkpoint-4", "--train_batch_size", 8,
                  "--allow_mismatched_resume", "--learning_rate", "5e-5", "--stop_after_steps", 1).stdout


def test_allow_mismatched_resume_continues_and_logs_what_changed(changed):
    assert ("--allow_mismatched_resume: checkpoint-4 was trained with 4 images per step (batch 4 x accumulation 1 "
            "x 1 process), this run has 8 (batch 8 x accumulation 1 x 1 process); continuing anyway") in changed
    assert "resumed from" in changed and "at step 4" in changed


def test_a_new_learning_rate_on_resume_is_honoured_from_the_resumed_step(changed):
    assert "learning rate: 0.0001 in the checkpoint, 5e-05 from step 4 on" in changed
    assert re.search(r"step 5: loss=\S+\s+lr=5e-05\b", changed), changed[-3000:]


# ---------------------------------------------------------------- fast checks of the pure parts


def test_the_marker_records_a_checksum_that_a_same_size_change_fails(tmp_path):
    from colossal_sd.checkpoint import _seal, verify
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save({"a": torch.ones(64)}, folder / "lr_scheduler.pt")
    _seal(folder, 1)
    assert verify(folder) is None
    flip_bytes(folder / "lr_scheduler.pt", (folder / "lr_scheduler.pt").stat().st_size // 2, 1)
    assert verify(folder) == "corrupt: lr_scheduler.pt does not match its checksum"


def test_the_base_model_fingerprint_sees_a_changed_tensor_and_ignores_a_reload(tiny_sd):
    from transformers import CLIPTextModel
    from colossal_sd.fingerprint import module_fingerprint
    model = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    before = module_fingerprint(model)
    assert module_fingerprint(CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")) == before
    with torch.no_grad():
        model.text_model.final_layer_norm.weight += 0.01
    assert module_fingerprint(model) != before
