"""SDXL through the same trainer, scripts and outputs: the tiny SDXL pipeline (two text encoders of different
widths, a 3-level UNet with text_time conditioning) trains, resumes exactly, caches, and saves pipelines and LoRA
files that diffusers' StableDiffusionXLPipeline loads."""

import argparse
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from colossal_sd import data, families, lora, models
from conftest import FAST, run_script, run_trainer, unet_weights, write_imagefolder
from test_resume import interrupted_chain

XL = ["--pretrained_model_name_or_path", "embedded:tiny-sdxl"]
ONE_GRID = ["--validation_prompts", "an emoji of red heart", "--num_validation_images", "1",
            "--validation_inference_steps", "2"]


def xl_pipeline(path, **kwargs):
    from diffusers import StableDiffusionXLPipeline
    pipeline = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def xl_sample(pipeline, seed=0):
    return pipeline("an emoji of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    args = argparse.Namespace(pretrained_model_name_or_path=str(tiny_sdxl), revision=None, variant=None,
                              cache_dir=None, prediction_type=None, pretrained_vae_model_name_or_path=None)
    return models.load_parts(args)


# ---------------------------------------------------------------- the family, unit by unit


def test_the_family_is_recognised_from_the_pipeline(tiny_sd, tiny_sdxl, parts):
    assert isinstance(families.of_folder(tiny_sdxl), families.StableDiffusionXL)
    assert isinstance(families.of_folder(tiny_sd), families.StableDiffusion)
    assert list(parts.text_encoders) == ["text_encoder", "text_encoder_2"]


def test_prompt_conditioning_is_what_the_sdxl_pipeline_samples_with(tiny_sdxl, parts):
    pipeline = xl_pipeline(tiny_sdxl)
    prompts = ["an emoji of red heart", "an emoji of rocket"]
    ids = torch.stack([data.tokenize(parts.caption_tokenizer, p) for p in prompts])
    with torch.no_grad():
        ours = parts.encode_prompt(ids)
        hidden, _, pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape[-1] == 32 + 64  # both encoders' penultimate states
    torch.testing.assert_close(ours["encoder_hidden_states"], hidden)
    torch.testing.assert_close(ours["text_embeds"], pooled)


def test_an_empty_caption_is_zeros_as_the_pipeline_unconditional_is(parts):
    ids = torch.stack([parts.empty_ids, data.tokenize(parts.caption_tokenizer, "an emoji of rocket")])
    with torch.no_grad():
        text = parts.encode_prompt(ids)
    assert all(v[0].abs().max() == 0 and v[1].abs().max() > 0 for v in text.values())


def test_time_ids_describe_the_real_size_crop_and_flip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
    for seed in range(20):
        pixels, time_ids = data.transform(image, 32, False, True, random.Random(seed))
        original_h, original_w, top, left, target_h, target_w = time_ids.tolist()
        assert (original_h, original_w, target_h, target_w) == (60, 100, 32, 32)
        resized = image.resize((53, 32), Image.BILINEAR)  # torchvision's short-side resize: 100 * 32 / 60
        for flipped in (resized.transpose(Image.FLIP_LEFT_RIGHT), resized):
            crop = flipped.crop((int(left), int(top), int(left) + 32, int(top) + 32))
            if np.abs(np.asarray(crop, np.float32) / 127.5 - 1 - pixels.permute(1, 2, 0).numpy()).max() < 0.05:
                break
        else:
            raise AssertionError(f"seed {seed}: time ids {time_ids.tolist()} do not locate the pixels")


def test_random_conditioning_has_the_shapes_the_unet_takes(parts):
    latents = torch.randn(2, 4, 4, 4)
    conditioning = parts.family.random_conditioning(parts.unet.config, 2, 32, "cpu")
    assert parts.unet(latents, torch.tensor([1, 2]), **conditioning).sample.shape == latents.shape


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """The 02 script as a user runs it on SDXL: MODEL_NAME, 2 processes, cached latents and text (its default)."""
    out = tmp_path_factory.mktemp("sdxl-02")
    env = {"MODEL_NAME": "embedded:tiny-sdxl", "NPROC": "2", "BATCH_SIZE": "2", "MAX_TRAIN_STEPS": "2",
           "RESOLUTION": "32", "OUTPUT_DIR": str(out), "VALIDATION_SPLIT": "0.2", "VALIDATION_STEPS": "2"}
    proc = run_script("02_run_trainer_with_colossalai.sh", "--max_train_samples", "20", "--use_ema",
                      "--cache_dir", out / "cache", *ONE_GRID, env=env)
    return out, proc.stdout + proc.stderr


def test_02_script_trains_sdxl_and_the_saved_pipeline_samples(script_run, tiny_sdxl):
    out, log = script_run
    assert "model=SDXL" in log and "processes=2" in log and "resolution=32" in log and "val_loss=" in log
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (out / "samples" / "final.png").is_file()
    trained = unet_weights(out)
    assert any(not torch.equal(trained[k], v) for k, v in unet_weights(tiny_sdxl).items())
    images = xl_sample(xl_pipeline(out))  # a fresh process would do the same: the folder is all it needs
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_cached_sdxl_run_stores_both_encoders_and_time_ids(script_run):
    out, log = script_run
    shards = list((out / "cache").rglob("shard-00000"))
    assert shards, log
    shard = shards[0]
    text, pooled, time_ids = (np.load(shard / f"{n}.npy") for n in ("text", "text_pooled", "time_ids"))
    assert text.shape[-1] == 96 and pooled.shape[-1] == 64
    assert (time_ids[..., [0, 1]] == 72).all() and (time_ids[..., [4, 5]] == 32).all()  # 72 px emoji at 32 px


def test_sdxl_resume_is_exact_through_kill_sigterm_and_rotation(tmp_path):
    extra = [*XL, "--max_train_samples", "24", "--use_ema", "--random_flip", "--caption_dropout", "0.3",
             "--cache_latents", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache"]
    reference = tmp_path / "reference"
    from test_resume import RUN
    run_trainer(*RUN, *extra, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--output_dir", reference)
    chain = tmp_path / "chain"
    result = interrupted_chain(chain, 1, extra)
    assert "cache: freed text_encoder, text_encoder_2, vae until saving" in result["end"].stdout
    for name, expected in unet_weights(reference).items():
        assert torch.equal(unet_weights(chain)[name], expected), name
    assert len([p for p in reference.iterdir() if p.name.startswith("checkpoint-")]) == 2


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-03")
    env = {"MODEL_NAME": "embedded:tiny-sdxl", "BATCH_SIZE": "2", "MAX_TRAIN_STEPS": "2", "RESOLUTION": "32",
           "OUTPUT_DIR": str(out), "VALIDATION_SPLIT": "0", "LORA_ALPHA": "8"}
    proc = run_script("03_run_trainer_with_colossalai_lora.sh", "--max_train_samples", "8",
                      "--train_text_encoder_lora", "--lora_export_format", "kohya", "--merge_lora",
                      "--learning_rate", "1e-2", "--checkpointing_steps", "1", "--cache_dir", out / "cache",
                      *ONE_GRID, env=env)
    return out, proc.stdout + proc.stderr


def test_sdxl_lora_adapts_the_unet_and_both_text_encoders(lora_run):
    out, _ = lora_run
    for folder in (out, out / "checkpoint-1"):  # the final LoRA file and a checkpoint's
        keys = load_file(folder / lora.WEIGHT_NAME).keys()
        for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
            assert any(k.startswith(prefix) for k in keys), (folder, prefix)


def test_sdxl_kohya_file_uses_sgm_names_and_loads_to_the_same_images(lora_run, tiny_sdxl):
    out, _ = lora_run
    kohya = load_file(out / lora.KOHYA_WEIGHT_NAME)
    unet_keys = [k for k in kohya if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for k in unet_keys)
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    images = {}
    for weight_name in (lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME):
        pipeline = xl_pipeline(tiny_sdxl)
        pipeline.load_lora_weights(str(out), weight_name=weight_name)
        images[weight_name] = xl_sample(pipeline)
    base = xl_sample(xl_pipeline(tiny_sdxl))
    assert np.abs(images[lora.WEIGHT_NAME] - base).max() > 1e-3  # the LoRA changes the images...
    np.testing.assert_allclose(images[lora.KOHYA_WEIGHT_NAME], images[lora.WEIGHT_NAME], atol=1e-4)  # ...alike


def test_sdxl_merged_lora_and_model_card(lora_run, tiny_sdxl):
    out, _ = lora_run
    merged = xl_pipeline(out / lora.MERGED_DIR)
    with_lora = xl_pipeline(tiny_sdxl)
    with_lora.load_lora_weights(str(out), weight_name=lora.WEIGHT_NAME)
    np.testing.assert_allclose(xl_sample(merged), xl_sample(with_lora), atol=1e-4)
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()


def test_sample_py_samples_sdxl_with_and_without_lora(lora_run, tiny_sdxl, tmp_path):
    out, _ = lora_run
    common = ["--prompt", "an emoji of red heart", "--width", "32", "--height", "32", "--steps", "2"]
    plain = run_script_python("sample.py", "--model", tiny_sdxl, *common, "--output_dir", tmp_path / "plain")
    adapted = run_script_python("sample.py", "--model", tiny_sdxl, "--lora", out, *common,
                                "--output_dir", tmp_path / "lora")
    first = [np.asarray(Image.open(sorted((tmp_path / d).glob("*.png"))[0])) for d in ("plain", "lora")]
    assert plain.returncode == adapted.returncode == 0 and not np.array_equal(*first)


def run_script_python(script, *args):
    import subprocess
    import sys
    from conftest import ROOT, _env
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bucketed_streaming_and_another_vae(tmp_path, tiny_sdxl):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.1  # an "fp16-fix"-style VAE: other weights, no upcasting
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "other-vae")
    rng = np.random.default_rng(0)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (96 + 64 * (i % 2), 160 - 64 * (i % 2), 3),
                                                       dtype=np.uint8)) for i in range(8)}
    folder = write_imagefolder(tmp_path / "data", images, {name: f"shape {name}" for name in images})
    common = [*FAST, *XL, "--train_data_dir", folder, "--max_train_steps", "2", "--train_batch_size", "2"]
    bucketed = run_trainer(*common, "--resolution", "128", "--aspect_ratio_bucketing", "--cache_latents",
                           "--cache_dir", tmp_path / "c", "--pretrained_vae_model_name_or_path", tmp_path / "other-vae",
                           "--output_dir", tmp_path / "bucketed")
    histogram = re.search(r"buckets \(width x height: images\): (.*)", bucketed.stdout).group(1)
    assert len(histogram.split(", ")) == 2, histogram  # landscape and portrait images in buckets of their own
    saved = load_file(tmp_path / "bucketed" / "vae" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(saved["decoder.conv_out.bias"], vae.decoder.conv_out.bias.detach())
    run_trainer(*common, "--streaming", "--plugin", "none", "--output_dir", tmp_path / "streamed")
    assert xl_sample(xl_pipeline(tmp_path / "streamed")).shape == (1, 32, 32, 3)
