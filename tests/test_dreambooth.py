"""DreamBooth with prior preservation and regularisation images: class images drawn once (sharded, atomically)
and reused, batches of instance + class samples, the two losses logged, min-SNR per half, exact resume; SDXL LoRA
through the 03 script; kohya's --reg_data_dir. Through the trainer, and as units."""

import argparse
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from colossal_sd import dataset_config, lora, loss, prior_preservation
from colossal_sd.errors import UserError
from conftest import load_pipeline, run_script, run_trainer, sample, unet_weights
from parse_arguments import parse_args
from test_datasets import write_images

CLASS_IMAGES = 6
# 3 photos of the subject; 2 processes x 2 instance samples (+ 2 class samples) a step: the UNet sees 8 a step.
DREAMBOOTH = ["--resolution", 32, "--train_batch_size", 2, "--max_train_steps", 4, "--logging_steps", 1,
              "--seed", 7, "--report_to", "none", "--instance_prompt", "a photo of sks emoji",
              "--with_prior_preservation", "--class_prompt", "an emoji", "--num_class_images", CLASS_IMAGES,
              "--sample_batch_size", 2, "--snr_gamma", 5, "--cache_latents", "--cache_text_embeddings"]
STEP = re.compile(r"step (\d+): loss=(\S+) .*instance_loss=(\S+)\s+prior_loss=(\S+)")


def logged_losses(log: str) -> dict:
    """{step: (loss, instance_loss, prior_loss)} of the log's step lines."""
    return {int(m.group(1)): tuple(float(v) for v in m.groups()[1:]) for m in STEP.finditer(log)}


# ---------------------------------------------------------------- units


def test_min_snr_weights_each_half_by_its_own_timesteps():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900, 50, 600])  # instance half 10, 900; class half 50, 600
    total, instance, prior = loss.prior_preservation_loss(prediction, target, timesteps, scheduler, 5.0, 0.5)

    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=5.0) / snr
    torch.testing.assert_close(instance, (per_sample[:2] * weights[:2]).mean())
    torch.testing.assert_close(prior, (per_sample[2:] * weights[2:]).mean())
    torch.testing.assert_close(total, instance + 0.5 * prior)
    # diffusers #5791: the instance half's losses times the whole batch's weights do not even line up
    with pytest.raises(RuntimeError):
        (per_sample[:2] * weights).mean()
    one = loss.prior_preservation_loss(prediction[[0, 2]], target[[0, 2]], timesteps[[0, 2]], scheduler, 5.0, 1.0)[1]
    unsplit = (per_sample[:1] * weights[[0, 2]]).mean()  # a half of one sample broadcasts: silently wrong
    torch.testing.assert_close(one, per_sample[0] * weights[0])
    assert not torch.isclose(one, unsplit)


class _Numbered(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        return {"index": torch.tensor(index), "skipped": 0}


def test_pairs_take_every_class_sample_in_turn_and_batches_are_instance_then_class():
    paired = prior_preservation.PairedDataset(_Numbered(7), np.array([0, 1, 2]), np.array([3, 4, 5, 6]))
    partners = []
    for epoch in range(4):
        paired.set_epoch(epoch)
        partners += [int(paired[i][1]["index"]) for i in range(len(paired))]
    assert len(paired) == 3 and sorted(set(partners)) == [3, 4, 5, 6]
    assert [partners.count(r) for r in (3, 4, 5, 6)] == [3, 3, 3, 3]  # each used as often over the epochs
    batch = prior_preservation.collate_pairs([paired[0], paired[2]])
    assert batch["index"].tolist()[:2] == [0, 2] and all(i >= 3 for i in batch["index"].tolist()[2:])


def test_is_reg_subsets_and_class_tokens(tmp_path):
    subject = write_images(tmp_path / "subject", ["0.png", "1.png"])
    (subject / "0.txt").write_text("sks cat, sitting")
    write_images(tmp_path / "reg" / "2_cat", ["0.png"], seed=1)
    config = tmp_path / "db.toml"
    config.write_text(f'[[subsets]]\ntrain_data_dir = "{subject}"\nclass_tokens = "sks cat"\n\n'
                      f'[[subsets]]\ntrain_data_dir = "{tmp_path / "reg"}"\nis_reg = true\n')
    args = argparse.Namespace(dataset_config=str(config), max_train_samples=None, cache_dir=None,
                              with_prior_preservation=False, reg_data_dir=None)
    assert prior_preservation.pairs(args)
    ds, _ = dataset_config.load(args, seed=0, say=lambda message: None)
    rows = {(tuple(caption), is_reg, repeats) for caption, is_reg, repeats in
            zip(ds[dataset_config.CAPTION], ds[dataset_config.IS_REG], ds["__repeats__"])}
    assert rows == {(("sks cat, sitting",), False, 1), (("sks cat",), False, 1), (("cat",), True, 2)}
    args.max_train_samples = 1  # of the training images: the regularisation images are all kept
    ds, _ = dataset_config.load(args, seed=0, say=lambda message: None)
    assert ds[dataset_config.IS_REG] == [False, True]
    config.write_text(f'[[subsets]]\ntrain_data_dir = "{subject}"\nis_reg = 1\n')
    with pytest.raises(UserError, match="key 'is_reg' must be true or false"):
        dataset_config.read_subsets(config)


def test_the_command_line_becomes_subsets_with_the_class_images_last(tmp_path):
    subject = write_images(tmp_path / "subject", ["0.png"])
    made = prior_preservation.subsets(parse_args(["--instance_data_dir", str(subject), "--instance_prompt", "sks",
                                                  "--with_prior_preservation", "--class_data_dir", "class",
                                                  "--class_prompt", "a cat"]))
    assert [(s.train_data_dir, s.class_tokens, s.is_reg) for s in made] == [(str(subject), "sks", False),
                                                                            ("class", "a cat", True)]
    config = tmp_path / "mix.toml"
    config.write_text(f'[[subsets]]\ntrain_data_dir = "{subject}"\n')
    made = prior_preservation.subsets(parse_args(["--dataset_config", str(config), "--with_prior_preservation",
                                                  "--class_data_dir", "class", "--class_prompt", "a cat"]))
    assert [s.is_reg for s in made] == [False, True]
    assert prior_preservation.subsets(parse_args([])) is None  # plain data: colossal_sd.data reads it as before


@pytest.mark.parametrize("flags,expected", [
    (["--with_prior_preservation", "--class_prompt", "a dog"], "--with_prior_preservation needs --class_data_dir"),
    (["--class_data_dir", "x"], "--class_data_dir goes with --with_prior_preservation"),
    (["--with_prior_preservation", "--class_data_dir", "x", "--class_prompt", "a dog", "--aspect_ratio_bucketing"],
     "--aspect_ratio_bucketing cannot pair training and class images"),
    (["--reg_data_dir", "missing"], "--reg_data_dir 'missing' is not a directory"),
    (["--instance_data_dir", ".", "--train_data_dir", "."], "--instance_data_dir names the training data"),
    (["--prior_loss_weight", "0"], "--prior_loss_weight must be a finite number > 0"),
    (["--num_class_images", "0"], "--num_class_images must be at least 1"),
])
def test_dreambooth_flags_are_checked(flags, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        parse_args(flags)


# ---------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory):
    """2 processes: a run of 4 steps that draws the class images, then a run stopped at step 2 that finds them,
    resumed to step 4."""
    tmp = tmp_path_factory.mktemp("dreambooth")
    run = [*DREAMBOOTH, "--instance_data_dir", write_images(tmp / "subject", [f"{i}.png" for i in range(3)]),
           "--class_data_dir", tmp / "class", "--cache_dir", tmp / "cache"]
    reference = run_trainer(*run, "--output_dir", tmp / "reference", nproc=2)
    drawn = {p.name: p.read_bytes() for p in (tmp / "class").iterdir()}
    stopped = run_trainer(*run, "--output_dir", tmp / "chain", "--stop_after_steps", 2, nproc=2)
    resumed = run_trainer(*run, "--output_dir", tmp / "chain", "--resume_from_checkpoint", "latest", nproc=2)
    return tmp, drawn, *(p.stdout + p.stderr for p in (reference, stopped, resumed))


def test_class_images_are_drawn_once_across_ranks_and_reused(dreambooth):
    tmp, drawn, reference, stopped, _ = dreambooth
    assert f"generating {CLASS_IMAGES} class images of 'an emoji'" in reference
    assert sorted(drawn) == [f"class-{i:05d}.png" for i in range(CLASS_IMAGES)]  # no temp file left behind
    for name, png in drawn.items():  # image i from seed + i, whichever rank drew it
        with Image.open(tmp / "class" / name) as image:
            assert image.size == (32, 32) and f"Seed: {7 + int(name[6:11])}," in image.info["parameters"]
    assert {p.name: p.read_bytes() for p in (tmp / "class").iterdir()} == drawn
    assert f"holds at least --num_class_images {CLASS_IMAGES} images: reusing them, generating none" in stopped
    assert "generating" not in stopped.replace("generating none", "")
    assert sample(load_pipeline(tmp / "reference")).shape == (1, 32, 32, 3)


def test_instance_and_prior_losses_are_logged_and_weighted(dreambooth):
    _, _, reference, _, _ = dreambooth
    assert "each of the 3 training samples an epoch is paired with one of 6 class/regularisation samples" in reference
    losses = logged_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4]
    for total, instance, prior in losses.values():
        assert total == pytest.approx(instance + prior, rel=1e-3) and instance != prior


def test_resume_is_exact_with_prior_preservation(dreambooth):
    tmp, _, reference, stopped, resumed = dreambooth
    assert "stopped after --stop_after_steps 2" in stopped and "at step 2" in resumed
    assert logged_losses(resumed)[4] == logged_losses(reference)[4]
    expected, actual = unet_weights(tmp / "reference"), unet_weights(tmp / "chain")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_sdxl_dreambooth_lora_through_the_03_script(tmp_path):
    subject = write_images(tmp_path / "subject", [f"{i}.png" for i in range(2)])
    out = tmp_path / "out"
    proc = run_script("03_run_trainer_with_colossalai_lora.sh", "--pretrained_model_name_or_path",
                      "embedded:tiny-sdxl", "--instance_data_dir", subject, "--instance_prompt", "a photo of sks emoji",
                      "--with_prior_preservation", "--class_data_dir", tmp_path / "class", "--class_prompt",
                      "an emoji", "--num_class_images", 2, "--resolution", 32, "--train_batch_size", 1,
                      "--max_train_steps", 2, "--logging_steps", 1, "--output_dir", out, "--report_to", "none",
                      "--cache_latents", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache")
    log = proc.stdout + proc.stderr
    assert "generating 2 class images" in log and sorted(logged_losses(log)) == [1, 2]
    # none of the subject's photos is held out for a validation loss, as the script does for other data
    assert "samples=2 " in log and "validation_split = 0.0" in (out / "training_config.toml").read_text()
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 2
    assert any(key.startswith("unet.") for key in load_file(out / lora.WEIGHT_NAME))


def test_reg_data_dir_pairs_kohya_folders_and_weights_them(tmp_path):
    write_images(tmp_path / "train" / "3_sks emoji", ["0.png", "1.png"])
    write_images(tmp_path / "reg" / "1_emoji", ["0.png", "1.png", "2.png"], seed=1)
    out = tmp_path / "out"
    proc = run_trainer("--resolution", 32, "--train_batch_size", 2, "--max_train_steps", 3, "--logging_steps", 1,
                       "--seed", 7, "--report_to", "none", "--plugin", "none", "--train_data_dir",
                       tmp_path / "train", "--reg_data_dir", tmp_path / "reg", "--prior_loss_weight", 0.25,
                       "--output_dir", out)
    log = proc.stdout + proc.stderr
    assert "samples=6 " in log  # the training samples: 3 x 2; the regularisation images come on top
    assert "3 regularisation images" in log and "paired with one of 3 class/regularisation samples" in log
    for total, instance, prior in logged_losses(log).values():
        assert total == pytest.approx(instance + 0.25 * prior, rel=1e-3)
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)


def test_the_log_window_averages_the_two_losses_and_leaves_out_skipped_steps(single_rank):
    from colossal_sd.train import _Window
    window = _Window(torch.device("cpu"), loss_scaled=True)
    for total, instance, prior in ((3.0, 1.0, 2.0), (math.inf, math.inf, 1.0), (5.0, 2.0, 3.0)):
        window.add(torch.tensor(total), 8, {"instance_loss": torch.tensor(instance), "prior_loss": torch.tensor(prior)})
    logged = window.flush(1e-4, None)
    assert (logged["loss"], logged["instance_loss"], logged["prior_loss"]) == (4.0, 1.5, 2.5)
    assert "instance_loss" not in window.flush(1e-4, None)  # a window starts empty
