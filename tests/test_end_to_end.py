"""The README's promise: install, run a script, load the result with diffusers and sample from it."""

import numpy as np
import pytest
import torch

from conftest import FAST, load_pipeline, run_script, run_trainer, sample, unet_weights


def test_02_script_two_processes_trains_and_saves_a_loadable_pipeline(tmp_path):
    out = tmp_path / "out"
    proc = run_script("02_run_trainer_with_colossalai.sh", *FAST, env={"NPROC": "2", "OUTPUT_DIR": str(out)})
    assert "plugin: auto -> torch_ddp" in proc.stdout
    assert "processes=2" in proc.stdout + proc.stderr
    assert "saved the pipeline" in proc.stdout + proc.stderr
    images = sample(load_pipeline(out))
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # TensorBoard events under output_dir/logs, as diffusers' script puts them
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_training_changes_the_unet_and_lowers_the_loss(tmp_path, tiny_sd):
    out = tmp_path / "out"
    proc = run_trainer(*FAST[:-6], "--max_train_steps", "12", "--logging_steps", "4", "--seed", "1",
                       "--learning_rate", "1e-3", "--output_dir", out)
    losses = [float(line.split("loss=")[1].split()[0]) for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    before = unet_weights(tiny_sd)
    after = unet_weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_same_seed_gives_the_same_weights_and_plain_ddp_matches_colossalai(tmp_path):
    runs = {}
    for name, plugin in (("a", "torch_ddp"), ("b", "torch_ddp"), ("none", "none")):
        run_trainer(*FAST, "--plugin", plugin, "--output_dir", tmp_path / name)
        runs[name] = unet_weights(tmp_path / name)
    for key in runs["a"]:
        assert torch.equal(runs["a"][key], runs["b"][key]), key
        torch.testing.assert_close(runs["a"][key], runs["none"][key], rtol=0, atol=1e-6)


def test_01_script_trains_without_colossalai(tmp_path):
    out = tmp_path / "out"
    proc = run_script("01_trainer_no_colossalai.sh", *FAST, env={"OUTPUT_DIR": str(out)})
    assert "plugin=none" in proc.stdout + proc.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_trains(tmp_path, precision):
    out = tmp_path / "out"
    proc = run_trainer(*FAST, "--mixed_precision", precision, "--output_dir", out)
    assert f"precision={precision}" in proc.stdout + proc.stderr
    weights = unet_weights(out)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("extra,embedded_model,embedded_data", [
    ([], True, True),
    (["--pretrained_model_name_or_path", "my/sd"], False, True),
    (["--pretrained_model_name_or_path=my/sd", "--dataset_name", "my/data"], False, False),
])
def test_scripts_use_demo_defaults_only_on_the_embedded_model_and_data(extra, embedded_model, embedded_data):
    # PYTHON=echo prints the trainer command the script would run
    command = run_script("02_run_trainer_with_colossalai.sh", *extra, env={"PYTHON": "echo"}).stdout.split()
    assert (command.count("--learning_rate") == 1 and command[command.index("--learning_rate") + 1] == "1e-3") \
        == embedded_model  # a real checkpoint keeps the fine-tuning default 1e-4
    assert ("--validation_prompts" in command) == embedded_data
    # a random UNet trains as a base model does; a real checkpoint keeps its own noise schedule
    assert ("--rescale_betas_zero_snr" in command and "v_prediction" in command) == embedded_model
    assert ("embedded:emoji-colours" in command and "2500" in command) == embedded_data

