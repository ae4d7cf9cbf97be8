"""SDXL's conditioning (text states, pooled embedding, time ids) through the GPU plugins' wrappers, on CPU.

Gemini, low_level_zero and torch_ddp_fp16 train on CUDA only; what they do to the model's inputs is tested here:
Gemini casts floating inputs to its dtype with colossalai.utils._cast_float (GeminiDDP.forward), LowLevelZeroModel
with a tree_map (it builds on CPU too), torch_ddp_fp16's TorchAMPModule calls the model under autocast. SDXL's
nested `added_cond_kwargs` must reach the UNet, in a dtype its layers accept, and must change its output.
benchmarks/gpu_check.sh measures them on a GPU; its CPU dry run is tested last.
"""

import argparse
import json
import subprocess
import sys

import pytest
import torch

from colossal_sd import families, lora, models
from conftest import ROOT, _env, run_trainer
from test_bad_input import assert_one_line_error

BATCH, LATENT = 2, 8


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    args = argparse.Namespace(pretrained_model_name_or_path=str(tiny_sdxl), revision=None, variant=None,
                              cache_dir=None, prediction_type=None, pretrained_vae_model_name_or_path=None)
    return models.load_parts(args)


def sdxl_conditioning(parts, size=64, dtype=torch.float32):
    """What models.BatchEncoder hands the UNet for a batch of cached SDXL samples of one original size."""
    torch.manual_seed(0)
    text = {"encoder_hidden_states": torch.randn(BATCH, 77, parts.unet.config.cross_attention_dim, dtype=dtype),
            "text_embeds": torch.randn(BATCH, 64, dtype=dtype)}
    time_ids = torch.tensor([[size, size, 0, 0, 64, 64]] * BATCH, dtype=torch.float32)
    return parts.family.conditioning(text, time_ids)


def inputs():
    torch.manual_seed(1)
    return torch.randn(BATCH, 4, LATENT, LATENT), torch.tensor([10, 700])


def fresh_unet(parts, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_config(parts.unet.config).to(dtype)


def test_gemini_casts_the_nested_sdxl_conditioning_to_its_dtype_and_the_unet_takes_it(parts):
    from colossalai.utils import _cast_float  # what GeminiDDP.forward applies to args and kwargs
    unet = fresh_unet(parts, torch.bfloat16)
    conditioning = sdxl_conditioning(parts)
    cast = _cast_float(conditioning, torch.bfloat16)
    assert set(cast) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert {k: v.dtype for k, v in cast["added_cond_kwargs"].items()} == \
        {"text_embeds": torch.bfloat16, "time_ids": torch.bfloat16}
    latents, timesteps = _cast_float(inputs(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):  # uncast, a bf16 UNet refuses it: the cast is what makes it run
        unet(latents, timesteps, **conditioning)
    with torch.no_grad():
        out = unet(latents, timesteps, **cast, return_dict=False)[0]
        other = unet(latents, timesteps, **_cast_float(sdxl_conditioning(parts, size=128), torch.bfloat16),
                     return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, other)  # the time ids (original size) reach the model


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_level_zero_model_feeds_the_sdxl_conditioning_to_the_unet(parts, precision, dtype):
    from colossalai.booster.plugin.low_level_zero_plugin import LowLevelZeroModel
    model = LowLevelZeroModel(fresh_unet(parts), precision)
    latents, timesteps = inputs()
    seen = {}
    hook = model.module.add_embedding.register_forward_pre_hook(lambda m, args: seen.update(dtype=args[0].dtype))
    with torch.no_grad():
        out = model(latents, timesteps, **sdxl_conditioning(parts), return_dict=False)[0]
        other = model(latents, timesteps, **sdxl_conditioning(parts, size=128), return_dict=False)[0]
    hook.remove()
    assert seen["dtype"] == dtype  # pooled text + time-id embedding, in the plugin's dtype
    assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, other)


def test_text_encoder_lora_wrapper_keeps_token_ids_whole_under_low_level_zero(parts):
    """--train_text_encoder_lora: the booster wraps lora.TextConditionedUNet; its token ids must not be cast,
    its time ids must be."""
    from colossalai.booster.plugin.low_level_zero_plugin import LowLevelZeroModel
    from colossal_sd import data
    model = LowLevelZeroModel(lora.TextConditionedUNet(parts), "bf16")
    ids = torch.stack([data.tokenize(parts.caption_tokenizer, "an emoji of a cat")] * BATCH)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * BATCH, dtype=torch.float32)
    seen = {}
    hooks = [model.module.text_encoder.register_forward_pre_hook(lambda m, a: seen.update(ids=a[0].dtype)),
             model.module.unet.add_embedding.register_forward_pre_hook(lambda m, a: seen.update(added=a[0].dtype))]
    latents, timesteps = inputs()
    with torch.no_grad():
        out = model(latents, timesteps, input_ids=ids, time_ids=time_ids)[0]
    for hook in hooks:
        hook.remove()
    assert seen == {"ids": torch.long, "added": torch.bfloat16}
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_torch_ddp_fp16_autocast_trains_the_fp32_unet_on_half_precision_cached_conditioning(parts, monkeypatch):
    """TorchAMPModule runs the fp32 model under autocast; the cache holds text states in the compute dtype and
    family.conditioning casts the time ids to it. Autocast to bf16 stands in on CPU for CUDA's fp16."""
    from colossalai.booster.mixed_precision import fp16_torch
    monkeypatch.setattr(fp16_torch, "get_accelerator", lambda: argparse.Namespace(
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    unet = fresh_unet(parts)
    model = fp16_torch.TorchAMPModule(unet)
    conditioning = sdxl_conditioning(parts, dtype=torch.bfloat16)
    assert conditioning["added_cond_kwargs"]["time_ids"].dtype == torch.bfloat16
    latents, timesteps = inputs()
    out = model(latents, timesteps, **conditioning, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    grad = unet.add_embedding.linear_1.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gemini_with_an_sdxl_model_on_cpu_refuses_in_one_line(tmp_path):
    proc = run_trainer("--pretrained_model_name_or_path", "embedded:tiny-sdxl", "--plugin", "gemini",
                       "--max_train_steps", "1", "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, "--plugin gemini needs a CUDA GPU")


@pytest.mark.parametrize("plugin", ["gemini", "low_level_zero", "torch_ddp_fp16"])
def test_every_gpu_plugin_refuses_cpu_before_any_model_is_loaded(plugin):
    """The check the CLI test above goes through, for each GPU plugin: build_engine, the loop's first call."""
    from colossal_sd import plugins
    from colossal_sd.errors import UserError
    with pytest.raises(UserError, match=f"--plugin {plugin} needs a CUDA GPU"):
        plugins.check_device(plugin, cuda=False, xformers=False)


# -- the GPU benchmark's model and its CPU dry run -----------------------------------------------------------------

def test_the_gpu_benchmark_builds_sdxl_base_exactly():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from diffusers import UNet2DConditionModel
    from sdxl import SDXL_UNET_CONFIG, SDXL_UNET_PARAMETERS
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS == 2_567_463_684
    conditioning = families.StableDiffusionXL({}).random_conditioning(unet.config, 1, 1024, "meta")
    assert conditioning["encoder_hidden_states"].shape == (1, 77, 2048)
    assert conditioning["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)


def test_plugin_memory_dry_run_trains_the_tiny_sdxl_unet_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "benchmarks/plugin_memory.py", "--unet_shape", "tiny-sdxl", "--plugin", "torch_ddp",
           "--gradient_checkpointing", "--train_batch_size", "2", "--warmup_steps", "1", "--timed_steps", "2"]
    # one thread: two spin-wait for each other on a shared CPU
    proc = subprocess.run(cmd, cwd=ROOT, env=_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = tmp_path / "results.txt"
    results.write_text(proc.stdout)
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    assert (row["unet"], row["plugin"], row["batch"], row["grad_ckpt"], row["loss_ok"]) == \
        ("tiny-sdxl", "torch_ddp", 2, True, True)
    table = subprocess.run([sys.executable, "benchmarks/results_table.py", results], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert "| tiny-sdxl | 64 | torch_ddp |" in table
