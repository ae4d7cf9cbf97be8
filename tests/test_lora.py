"""LoRA: train adapters only, and load the result where users go: diffusers, kohya (A1111/ComfyUI), merged."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from colossal_sd import lora
from conftest import FAST, load_pipeline, run_script, run_trainer, sample
from test_bad_input import assert_one_line_error

# A high learning rate so three steps move the images visibly; alpha != rank to prove the scale survives export.
LORA = ["--use_lora", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    # plain DDP here; the 03 script test below covers the Colossal-AI booster with two processes
    proc = run_trainer(*FAST, *LORA, "--plugin", "none", "--lora_export_format", "kohya", "--merge_lora",
                       "--output_dir", out)
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def base(tiny_sd):
    return load_pipeline(tiny_sd)


def with_lora(tiny_sd, out, weight_name=lora.WEIGHT_NAME):
    pipeline = load_pipeline(tiny_sd)
    pipeline.load_lora_weights(out, weight_name=weight_name)
    return pipeline


def lora_parameters(pipeline):
    return {k: v for k, v in pipeline.unet.state_dict().items() if "lora_" in k}


def test_only_the_adapters_train_and_the_file_is_small(trained, tiny_sd):
    out, log = trained
    trainable = int(re.search(r"([\d,]+) trainable parameters", log).group(1).replace(",", ""))
    weights = load_file(out / lora.WEIGHT_NAME)
    assert sum(w.numel() for w in weights.values()) == trainable
    assert weights and all(k.startswith("unet.") and ".lora." in k for k in weights)
    unet_file = tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"
    assert (out / lora.WEIGHT_NAME).stat().st_size < unet_file.stat().st_size / 10
    assert not (out / "unet").exists()  # a LoRA run writes no full pipeline


def test_diffusers_file_loads_and_changes_the_images(trained, base, tiny_sd):
    out, _ = trained
    before, after = sample(base), sample(with_lora(tiny_sd, out))
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-2


def test_kohya_file_has_a1111_keys_and_loads_to_the_same_weights(trained, tiny_sd):
    out, _ = trained
    kohya = load_file(out / lora.KOHYA_WEIGHT_NAME)
    assert all(k.startswith("lora_unet_") for k in kohya)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.replace(".lora_down.weight", ".alpha") in kohya for k in downs)
    from_kohya = lora_parameters(with_lora(tiny_sd, out, lora.KOHYA_WEIGHT_NAME))
    from_diffusers = lora_parameters(with_lora(tiny_sd, out))
    assert from_kohya.keys() == from_diffusers.keys() and from_kohya
    for key in from_kohya:
        torch.testing.assert_close(from_kohya[key], from_diffusers[key], rtol=0, atol=0)


def test_merged_pipeline_matches_base_plus_lora(trained, tiny_sd):
    out, _ = trained
    merged = load_pipeline(out / lora.MERGED_DIR)
    assert not any("lora" in k for k in merged.unet.state_dict())
    # fused weights round differently from base + adapter; the adapter itself moves pixels by more than 1e-2
    np.testing.assert_allclose(sample(merged), sample(with_lora(tiny_sd, out)), atol=1e-3)


def test_model_card_says_what_was_trained(trained):
    out, _ = trained
    card = (out / "README.md").read_text()
    for fact in ("base_model: embedded:tiny-sd", "embedded:emoji", "rank: 4", "lora_alpha: 8.0",
                 "to_q,to_k,to_v,to_out.0", "steps: 3", lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME, "load_lora_weights"):
        assert fact in card, fact


def test_03_script_two_processes_trains_lora(tmp_path, tiny_sd):
    out = tmp_path / "out"
    proc = run_script("03_run_trainer_with_colossalai_lora.sh", *FAST, "--train_text_encoder_lora",
                      "--lora_export_format", "kohya", env={"NPROC": "2", "OUTPUT_DIR": str(out), "LORA_RANK": "2"})
    log = proc.stdout + proc.stderr
    assert "plugin=torch_ddp" in log and "processes=2" in log and "LoRA rank=2" in log
    weights = load_file(out / lora.WEIGHT_NAME)
    assert {w.shape[0] for k, w in weights.items() if k.endswith("lora.down.weight")} == {2}
    assert any(k.startswith("text_encoder.") for k in weights)  # --train_text_encoder_lora
    assert any(k.startswith("lora_te_") for k in load_file(out / lora.KOHYA_WEIGHT_NAME))
    pipeline = with_lora(tiny_sd, out)
    assert any("lora_A" in k for k in pipeline.text_encoder.state_dict())
    assert np.isfinite(sample(pipeline)).all()


def test_gemini_is_refused_in_one_line_naming_the_plugins_that_work(tmp_path):
    proc = run_trainer(*FAST, "--use_lora", "--plugin", "gemini", "--output_dir", tmp_path / "out", check=False)
    assert_one_line_error(proc, "use --plugin torch_ddp, torch_ddp_fp16, low_level_zero or none")
    assert not (tmp_path / "out" / lora.WEIGHT_NAME).exists()


@pytest.mark.parametrize("flags,expected", [
    (["--merge_lora"], "--merge_lora only applies to LoRA training; add --use_lora"),
    (["--lora_export_format", "kohya"], "add --use_lora"),
    (["--train_text_encoder_lora"], "add --use_lora"),
    (["--use_lora", "--rank", "0"], "--rank must be at least 1"),
    (["--use_lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--use_lora", "--save_single_file"], "--lora_export_format kohya")])
def test_lora_flags_that_would_do_nothing_or_break_are_refused(flags, expected):
    from parse_arguments import parse_args
    with pytest.raises(lora.UserError, match=re.escape(expected)):
        parse_args(flags)


def test_the_plugins_offered_for_lora_are_the_ones_colossalai_supports():
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin
    assert TorchDDPPlugin.support_lora(None) and LowLevelZeroPlugin.support_lora(None)
    assert not GeminiPlugin.support_lora(None)
    assert set(lora.LORA_PLUGINS) == {"torch_ddp", "torch_ddp_fp16", "low_level_zero", "none"}


def test_auto_plugin_for_lora_on_a_gpu_avoids_gemini():
    from colossal_sd.plugins import resolve_plugin
    assert resolve_plugin("auto", cuda=True, lora=True) == "torch_ddp_fp16"
    assert resolve_plugin("auto", cuda=False, lora=True) == "torch_ddp"


def lora_args(*flags):
    from parse_arguments import parse_args
    return parse_args(["--use_lora", *flags])


def tiny_parts(args):
    from colossal_sd import models
    return models.load_parts(args)


def cpu_engine(precision):
    from colossal_sd.distributed import DistInfo
    from colossal_sd.plugins import Engine
    return Engine("none", precision, DistInfo(0, 0, 1, torch.device("cpu")), 1.0)


def test_only_fp32_adapters_train_over_a_base_frozen_in_the_compute_dtype():
    args = lora_args("--lora_target_modules", "to_q,to_v")
    model = lora.add_lora(cpu_engine("bf16"), tiny_parts(args), args)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(".lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"to_q", "to_v"}


def test_unknown_target_module_is_a_user_error():
    args = lora_args("--lora_target_modules", "no_such_layer")
    with pytest.raises(lora.UserError, match="--lora_target_modules no_such_layer"):
        lora.add_lora(cpu_engine("no"), tiny_parts(args), args)


def test_text_encoder_adapters_train_with_the_unet_in_one_model():
    args = lora_args("--train_text_encoder_lora")
    parts = tiny_parts(args)
    model = lora.add_lora(cpu_engine("no"), parts, args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".unet." in n for n in trainable) and any(".text_encoder." in n and "q_proj" in n for n in trainable)
    ids = parts.tokenizers["tokenizer"](["an emoji of a cat"], padding="max_length", return_tensors="pt").input_ids
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([10]), ids)[0]
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_weights_read_the_same_through_every_wrapper_the_booster_returns():
    from colossalai.interface.model import PeftUnwrapMixin
    args = lora_args()
    model = lora.add_lora(cpu_engine("no"), tiny_parts(args), args)
    expected = lora.lora_state_dict(model)
    for wrapped in (model.get_base_model(), PeftUnwrapMixin(model)):  # torch_ddp_fp16 returns the latter
        got = lora.lora_state_dict(wrapped)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_lora_checkpoints_load_as_lora_and_resume_exactly(tmp_path, tiny_sd):
    steps = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_trainer(*FAST, *LORA, *steps, "--output_dir", whole)
    run_trainer(*FAST, *LORA, *steps, "--stop_after_steps", "2", "--output_dir", split)
    checkpoint = split / "checkpoint-2"
    assert not (checkpoint / "unet").exists()
    with_lora(tiny_sd, checkpoint)  # any checkpoint of a LoRA run loads as a LoRA
    run_trainer(*FAST, *LORA, *steps, "--resume_from_checkpoint", "latest", "--output_dir", split)
    expected, resumed = load_file(whole / lora.WEIGHT_NAME), load_file(split / lora.WEIGHT_NAME)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)


def test_sd2_kohya_file_gives_the_images_of_the_diffusers_file(tmp_path, tiny_sd):
    """SD 2.x: linear attention projections in the UNet (LoRA on proj_in/proj_out too) and an OpenCLIP-shaped
    text encoder; diffusers' kohya reader turns our kohya file into the very adapters of the diffusers file."""
    from test_single_file import build_tiny_sd2

    sd2 = build_tiny_sd2(tiny_sd, tmp_path / "tiny-sd2")
    out = tmp_path / "out"
    run_trainer(*FAST, *LORA, "--resolution", "64", "--pretrained_model_name_or_path", sd2, "--plugin", "none",
                "--lora_target_modules", "to_q,to_k,to_v,to_out.0,proj_in,proj_out", "--train_text_encoder_lora",
                "--lora_export_format", "kohya", "--output_dir", out)
    kohya = load_file(out / lora.KOHYA_WEIGHT_NAME)
    assert any("_proj_in." in k for k in kohya) and any(k.startswith("lora_te_") for k in kohya)
    from_diffusers, from_kohya = with_lora(sd2, out), with_lora(sd2, out, lora.KOHYA_WEIGHT_NAME)
    for name in ("unet", "text_encoder"):
        left = {k: v for k, v in getattr(from_diffusers, name).state_dict().items() if "lora_" in k}
        right = {k: v for k, v in getattr(from_kohya, name).state_dict().items() if "lora_" in k}
        assert left and left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), name
    images = sample(from_diffusers, size=64)
    assert np.isfinite(images).all() and np.abs(images - sample(load_pipeline(sd2), size=64)).max() > 1e-3
    np.testing.assert_array_equal(sample(from_kohya, size=64), images)
