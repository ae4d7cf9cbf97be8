"""Bad input: exit non-zero with one line that says what to fix, never a traceback."""

import json
import shutil

import pytest
from PIL import Image

from conftest import run_script, run_trainer, write_imagefolder

CASES = {
    "missing model path": (["--pretrained_model_name_or_path", "/no/such/model"], "does not exist"),
    "unknown hub model offline": (["--pretrained_model_name_or_path", "nobody-here/no-model"], "hub is unreachable"),
    "missing dataset": (["--dataset_name", "/no/such/data"], "does not exist"),
    "unknown hub dataset offline": (["--dataset_name", "nobody-here/no-data"], "hub is unreachable"),
    "missing train_data_dir": (["--train_data_dir", "/no/such/dir"], "is not a directory"),
    "missing caption column": (["--caption_column", "caption"], "its columns are: image, text"),
    "missing image column": (["--image_column", "img"], "its columns are: image, text"),
    "resolution the VAE cannot divide": (["--resolution", "40"], "is not a multiple of 16"),
    "gemini on CPU": (["--plugin", "gemini"], "needs a CUDA GPU"),
    "low_level_zero on CPU": (["--plugin", "low_level_zero"], "needs a CUDA GPU"),
    "torch_ddp_fp16 on CPU": (["--plugin", "torch_ddp_fp16"], "needs a CUDA GPU"),
    "8-bit Adam on CPU": (["--use_8bit_adam"], "--use_8bit_adam needs a CUDA GPU"),
    "ZeRO flag for another plugin": (["--plugin", "torch_ddp", "--cpu_offload"], "applies to --plugin low_level_zero"),
    "xformers on CPU": (["--enable_xformers_memory_efficient_attention"], "needs a CUDA GPU"),
    "dataset and train_data_dir": (["--dataset_name", "a", "--train_data_dir", "b"], "not both"),
    "torch_ddp_fp16 with bf16": (["--plugin", "torch_ddp_fp16", "--mixed_precision", "bf16"], "trains in fp16"),
    "zero batch size": (["--train_batch_size", "0"], "must be at least 1"),
    # every value out of its range, refused at start-up with the range and the value given
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate must be a finite number > 0 (got -1.0)"),
    "NaN learning rate": (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0 (got nan)"),
    "Adam beta1 above 1": (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1) (got 1.5)"),
    "Adam beta2 of 1": (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1) (got 1.0)"),
    "negative weight decay": (["--adam_weight_decay", "-0.1"], "--adam_weight_decay must be a finite number >= 0"),
    "zero Adam epsilon": (["--adam_epsilon", "0"], "--adam_epsilon must be a finite number > 0"),
    "negative max_grad_norm": (["--max_grad_norm", "-1"], "--max_grad_norm must be a finite number >= 0, 0 disables"),
    "NaN max_grad_norm": (["--max_grad_norm", "nan"], "(got nan)"),
    "negative warm-up": (["--lr_warmup_steps", "-5"], "--lr_warmup_steps must be at least 0 (got -5)"),
    "NaN noise offset": (["--noise_offset", "nan"], "--noise_offset must be a finite number >= 0 (got nan)"),
    "negative input perturbation": (["--input_perturbation", "-0.1"], "--input_perturbation must be a finite"),
    "NaN snr_gamma": (["--snr_gamma", "nan"], "--snr_gamma must be a finite number > 0 (got nan)"),
    "NaN max_aspect_ratio": (["--max_aspect_ratio", "nan"], "--max_aspect_ratio must be a finite number >= 1"),
    "negative seed": (["--seed", "-1"], "--seed must be in [0, "),
    # values that only the data can refute
    "validation split that leaves nothing to train on": (
        ["--max_train_samples", "4", "--validation_split", "0.9"],
        "--validation_split 0.9 holds out all 4 samples, leaving none to train on; use at most 0.75"),
    "image column as caption column": (["--caption_column", "image"], "--caption_column 'image' holds images"),
    "text column as image column": (["--image_column", "text"], "--image_column 'text' holds text, not images; "
                                                                 "the images are in: image"),
}


def assert_one_line_error(proc, expected):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_line(name, tmp_path):
    args, expected = CASES[name]
    proc = run_trainer(*args, "--max_train_steps", "1", "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "out" / "unet").exists()


def test_folder_without_images(tmp_path):
    folder = write_imagefolder(tmp_path / "empty", {}, {})
    proc = run_trainer("--train_data_dir", folder, "--output_dir", tmp_path / "out", check=False)
    assert_one_line_error(proc, "holds no images")


def test_script_under_torchrun_reports_one_line_and_no_launcher_traceback(tmp_path):
    proc = run_script("02_run_trainer_with_colossalai.sh", "--resolution", "40",
                      env={"NPROC": "2", "OUTPUT_DIR": str(tmp_path / "out")}, check=False)
    assert_one_line_error(proc, "is not a multiple of 16")
    assert "ChildFailedError" not in proc.stderr


def test_every_float_flag_refuses_nan_and_infinity():
    """NaN compares False with everything, so a range check written `if value < low` lets it through."""
    from parse_arguments import build_parser, parse_args
    from colossal_sd.errors import UserError

    floats = [a.dest for a in build_parser()._actions if a.type is float]
    assert len(floats) > 15
    for flag in floats:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(UserError, match=rf"--{flag} must be .* \(got {value}\)"):
                parse_args([f"--{flag}={value}"])


def test_dataset_of_unreadable_images(tmp_path):
    folder = write_imagefolder(tmp_path / "broken", {f"{i}.png": b"not a png" for i in range(4)},
                               {f"{i}.png": "a cat" for i in range(4)})
    proc = run_trainer("--train_data_dir", folder, "--output_dir", tmp_path / "out", check=False)
    assert_one_line_error(proc, f"none of the 4 images in {folder} could be read: e.g. 0.png: cannot identify")


# ---------------------------------------------------------------- local files: the file and line, never the hub


def assert_names_the_file_not_the_hub(proc, expected):
    assert_one_line_error(proc, expected)
    assert "hub" not in proc.stderr


def test_local_model_with_truncated_weights(tmp_path, tiny_sd):
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    proc = run_trainer("--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out", check=False)
    assert_names_the_file_not_the_hub(proc, f"cannot load model '{model}': {weights} is corrupt or truncated")


def test_local_model_with_malformed_config(tmp_path, tiny_sd):
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    (model / "scheduler" / "scheduler_config.json").write_text('{\n  "num_train_timesteps": 1000,\n}\n')
    proc = run_trainer("--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out", check=False)
    assert_names_the_file_not_the_hub(proc, f"{model}/scheduler/scheduler_config.json line 3")


def small_folder(path):
    names = [f"{i}.png" for i in range(4)]
    return write_imagefolder(path, {n: Image.new("RGB", (32, 32), "red") for n in names},
                             {n: "a red square" for n in names})


def test_metadata_jsonl_with_a_malformed_line(tmp_path):
    folder = small_folder(tmp_path / "data")
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[2] = '{"file_name": "2.png", "text": "a red'
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_trainer("--train_data_dir", folder, "--output_dir", tmp_path / "out", check=False)
    assert_names_the_file_not_the_hub(proc, f"cannot load dataset '{folder}': {folder}/metadata.jsonl line 3")


@pytest.mark.parametrize("name,text,expected", [
    ("metadata.csv", 'file_name,text\n0.png,a\n1.png,a red, square\n',
     "metadata.csv line 3: 3 fields, the header has 2"),
    ("metadata.csv", 'file_name,text\n0.png,"a red\n1.png,a\n', "metadata.csv line 2: unexpected end of data"),
    ("metadata.jsonl", '{"file_name": "0.png", "text": "a"}\n["1.png", "a"]\n', "metadata.jsonl line 2: a JSON list"),
])
def test_broken_metadata_names_the_file_and_line(tmp_path, name, text, expected):
    from colossal_sd import data
    from colossal_sd.errors import UserError

    folder = small_folder(tmp_path / "data")
    (folder / "metadata.jsonl").unlink()
    (folder / name).write_text(text)
    with pytest.raises(UserError) as error:
        data.load_source(train_data_dir=str(folder))
    assert f"{folder}/{expected}" in str(error.value) and "hub" not in str(error.value)


def test_broken_local_data_file_names_the_file_and_line(tmp_path):
    from colossal_sd import data
    from colossal_sd.errors import UserError

    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "0.png", "text": "a"}) + "\n{oops}\n")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 cut short")
    for file, expected in (("d.jsonl", "d.jsonl line 2, column 2: not valid JSON"),
                           ("d.parquet", "d.parquet is corrupt or truncated")):
        with pytest.raises(UserError) as error:
            data.load_source(dataset_name=str(tmp_path / file))
        assert f"{tmp_path}/{expected}" in str(error.value) and "hub" not in str(error.value)
