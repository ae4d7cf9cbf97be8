"""What a run leaves in output_dir when it ends: its own final outputs, marked as its own, or nothing of its own;
never a non-finite checkpoint or pipeline, never an earlier run's pipeline passing for this run's, never a
temporary folder. Each run starts from a copy of one finished earlier run's output_dir."""

import json
import math
import shutil
import signal

import pytest
import torch

from conftest import FAST, run_trainer, start_trainer, unet_weights
from test_bad_input import assert_one_line_error
from test_resume import finish, read_until

RUN = [*FAST, "--report_to", "none"]
MARKER = "training_complete.json"
# Adam moves each weight by about the learning rate: lr 0 at step 1, 5e5 at step 2, so step 3's loss is nan.
DIVERGING = ["--max_train_steps", 6, "--learning_rate", 1e6, "--lr_scheduler", "constant_with_warmup",
             "--lr_warmup_steps", 2, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """An output_dir holding a finished 3-step run's pipeline."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    run_trainer(*RUN, "--output_dir", out)
    return out


def earlier_run_copy(earlier_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(earlier_run, out)
    return out


def assert_set_aside_untouched(out, earlier_run):
    """The earlier run's pipeline is whole, marked as the earlier run's, in previous_runs/; the top holds none."""
    assert not (out / "model_index.json").exists() and not (out / MARKER).exists()
    [previous] = list((out / "previous_runs").iterdir())
    assert json.loads((previous / MARKER).read_text())["step"] == 3
    for name in ("unet/diffusion_pytorch_model.safetensors", "model_index.json", MARKER):
        assert (previous / name).read_bytes() == (earlier_run / name).read_bytes(), name
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize("caught_by, logging, expected", [
    ("the logged loss", 1, "the loss became nan at step 3"),
    ("the weights before saving", 100, "the trained weights became nan or inf by step 4"),
], ids=["loss", "weights"])
def test_a_diverging_run_stops_naming_the_last_good_checkpoint_and_writes_nothing_non_finite(
        earlier_run, tmp_path, caught_by, logging, expected):
    out = earlier_run_copy(earlier_run, tmp_path)
    proc = run_trainer(*RUN, *DIVERGING, "--logging_steps", logging, "--output_dir", out, check=False)
    assert_one_line_error(proc, f"{expected}; nothing was saved after step 2: rerun with "
                                f"--resume_from_checkpoint {out / 'checkpoint-2'} and a lower --learning_rate")
    assert proc.returncode == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # not rotated away
    assert all(w.isfinite().all() for w in unet_weights(out / "checkpoint-2").values())
    assert_set_aside_untouched(out, earlier_run)


def test_a_run_stopped_early_leaves_the_earlier_pipeline_marked_as_the_earlier_runs(earlier_run, tmp_path):
    out = earlier_run_copy(earlier_run, tmp_path)
    (out / ".tmp-k1ll3d").mkdir()  # what a SIGKILL during a save leaves
    (out / ".tmp-k1ll3d" / "model_index.json").write_text("{}")
    proc = run_trainer(*RUN, "--stop_after_steps", 1, "--output_dir", out)
    assert f"removed 1 temporary folder(s) left by a run that died while writing: {out / '.tmp-k1ll3d'}" in proc.stdout
    assert "moved the outputs of an earlier run (step 3, finished " in proc.stdout
    assert_set_aside_untouched(out, earlier_run)
    assert (out / "checkpoint-1" / "checkpoint_complete.json").is_file()


@pytest.mark.parametrize("signum, nproc", [(signal.SIGTERM, None), (signal.SIGINT, None), (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-to-torchrun"])
def test_a_signal_during_the_final_save_lets_it_complete_then_exits_0(tmp_path, signum, nproc):
    out = tmp_path / "out"
    proc, log = start_trainer(*RUN, "--output_dir", out, nproc=nproc, launcher="colossal_sd.launch"), []
    read_until(proc, f"saving the pipeline to {out}", log)
    proc.send_signal(signum)
    text = finish(proc, log)
    assert proc.returncode == 0, text[-4000:]
    assert f"got {signum.name} while saving the final outputs: the save completed first, everything is in {out}" in text
    assert "Traceback" not in text
    assert json.loads((out / MARKER).read_text())["step"] == 3
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.glob(".tmp-*"))


# ---------------------------------------------------------------- fast checks of the pure parts


def test_only_the_loss_and_an_unscaled_gradient_norm_count_as_divergence():
    from colossal_sd.divergence import why_diverged
    assert why_diverged(math.nan, 1.0, loss_scaled=True) == "the loss became nan"
    assert why_diverged(math.inf, None, loss_scaled=False) == "the loss became inf"
    assert why_diverged(0.1, math.inf, loss_scaled=True) is None  # fp16: a step the loss scaler skipped
    assert why_diverged(0.1, math.nan, loss_scaled=False) == "the gradient norm became nan"
    assert why_diverged(0.1, None, loss_scaled=False) is None


def test_the_weights_check_sees_one_non_finite_element_anywhere():
    from colossal_sd.divergence import all_finite
    cpu = torch.device("cpu")
    weights = [torch.ones(3, 3), torch.zeros(0), torch.ones(5)]
    assert all_finite(weights, cpu)
    weights[2][4] = math.inf
    assert not all_finite(weights, cpu)


def test_an_unmarked_earlier_pipeline_is_set_aside_as_such(tmp_path):
    from colossal_sd.final_outputs import set_aside_earlier_outputs
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    said = []
    set_aside_earlier_outputs(tmp_path, said.append)
    [previous] = list((tmp_path / "previous_runs").iterdir())
    assert previous.name.endswith("-unmarked")
    assert sorted(p.name for p in previous.iterdir()) == ["model_index.json", "unet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "previous_runs"]
    assert "an older version wrote it, or its save was interrupted" in said[0]


@pytest.mark.parametrize("loss_scaled, losses, expected", [
    (True, [1.0, math.inf, 3.0], {"loss": 2.0, "skipped_losses": 1.0}),  # fp16: the scaler skipped one step
    (True, [math.nan, math.inf], {"loss": math.nan, "skipped_losses": 2.0}),  # nothing but skips: diverged
    (False, [1.0, math.inf, 3.0], {"loss": math.inf}),
], ids=["fp16-one-skip", "fp16-all-skipped", "fp32"])
def test_a_loss_scaler_skip_is_counted_not_averaged_into_the_loss(single_rank, loss_scaled, losses, expected):
    from colossal_sd.train import _Window
    window = _Window(torch.device("cpu"), loss_scaled)
    for loss in losses:
        window.add(torch.tensor(loss), 4)
    logged = window.flush(1e-4, None)
    assert {k: logged[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    assert ("skipped_losses" in logged) == ("skipped_losses" in expected)
