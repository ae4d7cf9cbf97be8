"""Bad input: exit non-zero with one line that says what to fix, never a traceback."""

import pytest

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
