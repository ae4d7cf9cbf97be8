"""sample.py and prompt files: prompts in, PNGs out, from every kind of trained model; the training grids read the
same prompt files."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, ROOT, _env, load_pipeline, run_trainer
from test_bad_input import assert_one_line_error

from colossal_sd import lora, prompt_file, sampling
from colossal_sd.errors import UserError
from colossal_sd.prompt_file import Prompt

# Two lines that differ in everything a line can set; sizes differ so that the grids' and PNGs' sizes tell.
PROMPTS = ("# kohya's format: options after ' --'\n"
           "an emoji of red heart --n blurry, text --w 64 --h 32 --d 5 --s 2 --l 4\n"
           "\n"
           "an emoji of a cat --W 32 --H 48 --D 11 --S 3\n")
SAMPLE = ["--steps", "2", "--width", "32", "--height", "32", "--num_images", "2"]


def run_sample(*args, nproc=None, check=True, timeout=300):
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, *launcher, "sample.py", *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sample.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def pngs(folder):
    """File name -> (pixels, parameters text) of every sample, grid.png left out."""
    found = {}
    for path in sorted(folder.glob("0*.png")):
        with Image.open(path) as image:
            found[path.name] = (np.asarray(image.convert("RGB")), image.info.get("parameters"))
    return found


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, prompts):
    """A full fine-tune with a mid-run checkpoint, the single file, and a final grid from the prompt file."""
    out = tmp_path_factory.mktemp("full") / "my-model"
    run_trainer(*FAST, "--checkpointing_steps", "2", "--save_single_file", "--validation_prompts_file", prompts,
                "--num_validation_images", "1", "--learning_rate", "1e-3", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "my-lora"
    run_trainer(*FAST, "--use_lora", "--rank", "4", "--learning_rate", "5e-2", "--plugin", "none",
                "--lora_export_format", "kohya", "--checkpointing_steps", "2", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def from_pipeline_folder(full_run, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "folder"
    log = run_sample("--model", full_run, "--prompt_file", prompts, *SAMPLE, "--output_dir", out).stdout
    return out, log


def draw(pipeline, prompt: Prompt, seeds):
    """What sample.py should have drawn for `prompt`, here in the test process."""
    pipeline.set_progress_bar_config(disable=True)
    images, _ = sampling.generate(pipeline, prompt, seeds)
    return [np.asarray(image) for image in images]


# ---------------------------------------------------------------- prompt files (pure)


def test_prompt_lines_follow_kohyas_format():
    line = "a cat, sitting --n ugly, blurry --W 64 --h 128 --d 42 --l 5.5 --s 30 --ss k_euler_a"
    assert prompt_file.parse_line(line, "p.txt line 1") == Prompt(
        "a cat, sitting", negative_prompt="ugly, blurry", width=64, height=128, seed=42, guidance_scale=5.5,
        steps=30, sampler="euler_a")
    assert prompt_file.parse_line("  just a prompt  ", "x") == Prompt("just a prompt")


@pytest.mark.parametrize("line, expected", [
    ("a cat --w abc", "p.txt line 3: --w abc: expected the width in pixels, a whole number"),
    ("a cat --w 60", "p.txt line 3: --w must be a multiple of 8 pixels, at least 8 (got 60); try 56"),
    ("a cat --s 0", "p.txt line 3: --s must be in [1, 1000] (got 0)"),
    ("a cat --l x", "--l x: expected the guidance scale, a number"),
    ("a cat --d", "--d needs a value (the seed)"),
    ("a cat --x 3", "unknown option '--x' (prompt-file options: --n --w --h --d --l --s --ss)"),
    ("a cat --ss nope", "--ss nope: unknown sampler; choose one of ddim"),
    ("--w 64", "the line has options but no prompt"),
])
def test_a_malformed_line_is_refused_naming_file_and_line(line, expected, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(UserError, match="^" if expected.startswith("p.txt") else "") as e:
        prompt_file.read_prompt_file(path)
    assert expected in str(e.value)
    assert str(e.value).startswith(f"{path} line 3: ")


def test_infotext_is_a1111s_format():
    prompt = Prompt("a cat", negative_prompt="blurry", width=512, height=768, seed=1234, guidance_scale=7.5,
                    steps=20)
    assert sampling.infotext(prompt, 1235, "Euler a", "my-model") == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1235, Size: 512x768, Model: my-model")
    no_negative = sampling.infotext(Prompt("a dog", negative_prompt="", width=8, height=8, seed=0,
                                           guidance_scale=1, steps=1), 0, "DDIM", "a, b")
    assert no_negative == 'a dog\nSteps: 1, Sampler: DDIM, CFG scale: 1, Seed: 0, Size: 8x8, Model: "a, b"'


def test_shards_cover_every_image_once_in_order():
    jobs = sampling.plan([Prompt("a", seed=5), Prompt("b", seed=0)], 3)
    assert [(i, s) for i, _, s in jobs] == [(0, 5), (1, 6), (2, 7), (3, 0), (4, 1), (5, 2)]
    for world in (1, 2, 4, 7):
        assert sum((sampling.share(jobs, r, world) for r in range(world)), []) == jobs


def test_grid_rows_keep_each_prompts_size():
    rows = [[Image.new("RGB", (64, 32), "red")] * 2, [Image.new("RGB", (32, 48), "blue")]]
    grid = sampling.label_grid(rows, ["a", "b"])
    # 64x32 images double to 128x64, the 32x48 one to 64x96; the narrower row is padded
    assert grid.size == (256, 2 * sampling.LABEL_HEIGHT + 64 + 96)
    assert tuple(np.asarray(grid)[sampling.LABEL_HEIGHT + 70 + sampling.LABEL_HEIGHT + 5, 5]) == (0, 0, 255)


# ---------------------------------------------------------------- the trainer reads the same file


def test_validation_prompts_file_drives_the_training_grid(full_run):
    """Each line its own size: rows of 64x32 (drawn 128x64) and 32x48 (drawn 64x96), one image each."""
    with Image.open(full_run / "samples" / "final.png") as grid:
        assert grid.height == 2 * sampling.LABEL_HEIGHT + 64 + 96
        assert grid.width >= 128
        pixels = np.asarray(grid.convert("RGB"))
    top = sampling.LABEL_HEIGHT
    assert (pixels[top:top + 64, 128:] == 255).all()  # nothing beyond the first row's one 128-px image
    assert (pixels[top:top + 64, :128] != 255).any()


def test_training_grid_matches_sample_py_with_the_same_file_and_sampler(full_run, prompts, tmp_path):
    """One definition: sample.py with the trainer's validation sampler draws the final grid's very images."""
    run_sample("--model", full_run, "--prompt_file", prompts, "--scheduler", "dpmpp_2m", "--width", "32",
               "--height", "32", "--output_dir", tmp_path)
    with Image.open(tmp_path / "grid.png") as ours, Image.open(full_run / "samples" / "final.png") as training:
        assert ours.size == training.size
        assert np.abs(np.asarray(ours, dtype=int) - np.asarray(training.convert("RGB"), dtype=int)).max() <= 2


def test_a_bad_validation_prompts_file_stops_the_trainer_in_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat --w abc\n")
    proc = run_trainer("--validation_prompts_file", bad, "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, f"{bad} line 1: --w abc: expected the width in pixels")
    proc = run_trainer("--validation_prompts_file", bad, "--validation_prompts", "x", "--output_dir",
                       tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, "not both")


# ---------------------------------------------------------------- sample.py


def test_each_png_has_its_lines_size_seed_and_a1111_parameters(from_pipeline_folder):
    out, _ = from_pipeline_folder
    images = pngs(out)
    assert list(images) == ["00000-5.png", "00001-6.png", "00002-11.png", "00003-12.png"]
    assert [pixels.shape[:2] for pixels, _ in images.values()] == [(32, 64), (32, 64), (48, 32), (48, 32)]
    assert images["00001-6.png"][1] == ("an emoji of red heart\nNegative prompt: blurry, text\n"
                                         "Steps: 2, Sampler: PLMS, CFG scale: 4.0, Seed: 6, Size: 64x32, "
                                         "Model: my-model")
    assert images["00002-11.png"][1] == ("an emoji of a cat\n"
                                          "Steps: 3, Sampler: PLMS, CFG scale: 7.5, Seed: 11, Size: 32x48, "
                                          "Model: my-model")
    assert not np.array_equal(images["00000-5.png"][0], images["00001-6.png"][0])  # one seed per image
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (256, 2 * sampling.LABEL_HEIGHT + 64 + 96)


def test_the_same_prompt_file_and_seeds_give_identical_images(from_pipeline_folder, full_run, prompts, tmp_path):
    first, _ = from_pipeline_folder
    run_sample("--model", full_run, "--prompt_file", prompts, *SAMPLE, "--output_dir", tmp_path)
    expected, got = pngs(first), pngs(tmp_path)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[name][0], expected[name][0]) for name in expected)
    assert (tmp_path / "grid.png").read_bytes() == (first / "grid.png").read_bytes()


def test_sharded_across_two_processes_each_image_once(from_pipeline_folder, full_run, prompts, tmp_path):
    """Under torchrun each image is drawn once, by one rank, from its own seed: the same files as one process
    writes (torchrun's one thread per process sums in another order: equal to a grey level)."""
    single, _ = from_pipeline_folder
    proc = run_sample("--model", full_run, "--prompt_file", prompts, *SAMPLE, "--output_dir", tmp_path, nproc=2)
    assert "prompt 1/2" in proc.stdout and "prompt 2/2" not in proc.stdout  # rank 0 drew only its half
    expected, got = pngs(single), pngs(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert np.abs(got[name][0].astype(int) - expected[name][0]).max() <= 2, name
        assert got[name][1] == expected[name][1]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (256, 2 * sampling.LABEL_HEIGHT + 64 + 96)


def test_sample_from_a_mid_run_checkpoint_uses_its_unet(full_run, from_pipeline_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    run_sample("--model", full_run / "checkpoint-2", "--prompt", "an emoji of red heart", *SAMPLE,
               "--output_dir", tmp_path)
    images = pngs(tmp_path)
    assert images["00000-0.png"][1].endswith("Model: my-model-checkpoint-2")
    pipeline = load_pipeline(full_run)
    prompt = Prompt("an emoji of red heart", width=32, height=32, seed=0, guidance_scale=7.5, steps=2)
    final = draw(pipeline, prompt, [0])[0]
    pipeline.unet = UNet2DConditionModel.from_pretrained(full_run / "checkpoint-2", subfolder="unet")
    assert np.abs(images["00000-0.png"][0].astype(int) - draw(pipeline, prompt, [0])[0]).max() <= 1
    assert np.abs(images["00000-0.png"][0].astype(int) - final).max() > 1  # step 2, not the final step 3


def test_sample_from_the_single_file_matches_the_pipeline_folder(full_run, from_pipeline_folder, prompts, tmp_path):
    folder, _ = from_pipeline_folder
    run_sample("--model", full_run / "my-model.safetensors", "--single_file_config", "embedded:tiny-sd",
               "--prompt_file", prompts, *SAMPLE, "--output_dir", tmp_path)
    expected, got = pngs(folder), pngs(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        assert np.abs(got[name][0].astype(int) - expected[name][0]).max() <= 1, name
        assert got[name][1].endswith("Model: my-model")


@pytest.fixture(scope="module")
def base_and_lora_images(lora_run, tiny_sd):
    prompt = Prompt("an emoji of red heart", width=32, height=32, seed=0, guidance_scale=7.5, steps=2)
    base = draw(load_pipeline(tiny_sd), prompt, [0, 1])
    pipeline = load_pipeline(tiny_sd)
    pipeline.load_lora_weights(lora_run, weight_name=lora.WEIGHT_NAME)
    return base, draw(pipeline, prompt, [0, 1])


@pytest.mark.parametrize("which", ["diffusers folder", "kohya file", "LoRA checkpoint"])
def test_sample_with_a_lora(which, lora_run, base_and_lora_images, tmp_path):
    args = {"diffusers folder": ["--model", "embedded:tiny-sd", "--lora", lora_run],
            "kohya file": ["--model", "embedded:tiny-sd", "--lora", lora_run / lora.KOHYA_WEIGHT_NAME],
            "LoRA checkpoint": ["--model", lora_run / "checkpoint-2"]}[which]
    run_sample(*args, "--prompt", "an emoji of red heart", *SAMPLE, "--output_dir", tmp_path)
    got = [pixels.astype(int) for pixels, _ in pngs(tmp_path).values()]
    base, with_lora = base_and_lora_images
    assert all(np.abs(g - b).max() > 8 for g, b in zip(got, base))  # the LoRA changes what is drawn
    if which != "LoRA checkpoint":  # the final LoRA; the checkpoint's is step 2's
        assert all(np.abs(g - w).max() <= 2 for g, w in zip(got, with_lora))


def test_a_lora_folder_given_as_model_says_to_pass_it_as_lora(lora_run, tmp_path):
    proc = run_sample("--model", lora_run, "--prompt", "x", "--output_dir", tmp_path, check=False)
    assert_one_line_error(proc, "holds a LoRA (pytorch_lora_weights.safetensors), not a model")


def test_a_lora_for_another_model_is_one_line(tmp_path, tiny_sd):
    from safetensors.torch import save_file

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 320), f"{key}.lora_B.weight": torch.zeros(320, 4)},
              tmp_path / "sd15-lora.safetensors")
    proc = run_sample("--model", "embedded:tiny-sd", "--lora", tmp_path / "sd15-lora.safetensors", "--prompt", "x",
                      *SAMPLE, "--output_dir", tmp_path / "out", check=False)
    assert_one_line_error(proc, "--lora")
    assert "does not fit this model" in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--model", "/no/such/model"], "--model '/no/such/model' does not exist"),
    (["--model", "/no/such/model.safetensors"], "does not exist"),
    (["--model", "embedded:tiny-sd", "--prompt_file", "/no/such/prompts.txt"], "does not exist"),
    (["--model", "embedded:tiny-sd", "--width", "30"], "--width must be a multiple of 8"),
    (["--model", "embedded:tiny-sd", "--prompt", "a", "--prompt_file", "p.txt"], "not both"),
])
def test_bad_sample_input_is_one_clear_line(args, expected, tmp_path):
    prompt = [] if "--prompt" in args or "--prompt_file" in args else ["--prompt", "x"]
    proc = run_sample(*args, *prompt, "--output_dir", tmp_path, check=False, timeout=120)
    assert_one_line_error(proc, expected)
