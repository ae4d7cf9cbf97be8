"""EMA, loss options and validation through the CLI: one validated EMA run, compared with plain runs."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from colossal_sd import validation
from conftest import FAST, run_trainer, unet_weights
from test_bad_input import assert_one_line_error

PROMPTS = ["an emoji of grinning face", "an emoji of red heart"]
SPLIT = ["--validation_split", "0.1"]
LOSS_OPTIONS = ["--snr_gamma", "5", "--noise_offset", "0.05", "--input_perturbation", "0.1",
                "--min_timestep", "100", "--max_timestep", "900"]
DROPOUT = ["--caption_dropout", "0.5"]
VALIDATION = ["--validation_prompts", *PROMPTS, "--num_validation_images", "3", "--validation_steps", "1",
              "--validation_inference_steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> output dir. 'ema' validates every step; the others train the same data without validation."""
    root = tmp_path_factory.mktemp("quality")
    plans = {
        "ema": ["--max_train_steps", "2", *SPLIT, *LOSS_OPTIONS, *DROPOUT, "--use_ema", "--ema_decay", "0.1",
                *VALIDATION],
        "one_step": ["--max_train_steps", "1", *SPLIT, *LOSS_OPTIONS, *DROPOUT],
        "no_validation": ["--max_train_steps", "2", *SPLIT, *LOSS_OPTIONS, *DROPOUT],
        "no_dropout": ["--max_train_steps", "2", *SPLIT, *LOSS_OPTIONS],
        # also: final samples from a bf16 run, whose saving moves the frozen parts to fp32 on the CPU
        "plain": ["--max_train_steps", "2", *SPLIT, "--mixed_precision", "bf16", "--validation_prompts", PROMPTS[0],
                  "--num_validation_images", "1", "--validation_inference_steps", "2"],
    }
    logs = {}
    for name, extra in plans.items():
        proc = run_trainer(*FAST, *extra, "--output_dir", root / name)
        logs[name] = proc.stdout + proc.stderr
    return root, logs


def test_sample_grids_at_each_validation_and_after_training(runs):
    samples = runs[0] / "ema" / "samples"
    grids = {name: np.asarray(Image.open(samples / f"{name}.png")) for name in ("step-1", "step-2", "final")}
    for grid in grids.values():  # 2 prompts x 3 images of 64 px (32 px upscaled), a label band per row
        assert grid.shape == (2 * (64 + validation.LABEL_HEIGHT), 3 * 64, 3)
    assert not np.array_equal(grids["step-1"], grids["step-2"])
    assert not (runs[0] / "no_validation" / "samples").exists()
    only_final = sorted(p.name for p in (runs[0] / "plain" / "samples").iterdir())
    assert only_final == ["final.png"]
    assert Image.open(runs[0] / "plain" / "samples" / "final.png").size[1] == 64 + validation.LABEL_HEIGHT


def test_tensorboard_has_training_scalars_val_loss_and_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs[0] / "ema" / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "validation/val_loss"} <= set(
        tags["scalars"])
    assert [e.step for e in events.Scalars("validation/val_loss")] == [1, 2]
    assert "validation/samples" in tags["images"]
    assert len(events.Images("validation/samples")) == 3  # step 1, step 2, final
    assert "val_loss=" in runs[1]["ema"]


def test_ema_weights_are_saved_and_equal_a_hand_computed_average(runs):
    root = runs[0]
    averaged, raw, first = unet_weights(root / "ema"), raw_weights(root / "ema"), unet_weights(root / "one_step")
    # update 1 copies step 1's weights; update 2 uses decay min(0.1, 2/11) = 0.1
    for key in averaged:
        torch.testing.assert_close(averaged[key], 0.1 * first[key] + 0.9 * raw[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)


def raw_weights(output_dir):
    from safetensors.torch import load_file
    return load_file(output_dir / "unet_raw" / "diffusion_pytorch_model.safetensors")


def test_validation_does_not_change_training(runs):
    trained_with, trained_without = raw_weights(runs[0] / "ema"), unet_weights(runs[0] / "no_validation")
    for key in trained_with:
        assert torch.equal(trained_with[key], trained_without[key]), key


@pytest.mark.parametrize("with_option,without_option", [("no_validation", "no_dropout"), ("no_dropout", "plain")])
def test_loss_options_and_caption_dropout_change_training(runs, with_option, without_option):
    a, b = unet_weights(runs[0] / with_option), unet_weights(runs[0] / without_option)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_wandb_installed_is_one_line(tmp_path):
    proc = run_trainer("--report_to", "wandb", "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, "pip install wandb")


def test_ema_is_checkpointed_and_resumes_exactly(tmp_path):
    steps = [*FAST[:-6], "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1",
             "--seed", "7", "--use_ema", "--ema_decay", "0.5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_trainer(*steps, "--output_dir", whole)
    run_trainer(*steps, "--stop_after_steps", "2", "--output_dir", split)
    assert (split / "checkpoint-2" / "extra" / "ema.pt").is_file()
    run_trainer(*steps, "--resume_from_checkpoint", "latest", "--output_dir", split)
    expected, resumed = unet_weights(whole), unet_weights(split)  # the saved UNet is the EMA one
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)
