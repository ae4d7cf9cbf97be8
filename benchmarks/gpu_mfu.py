"""Throughput and MFU of the SD-1.5-shaped UNet at 512 px in bf16 on cached (random) latents: what the loop
runs once latents and text embeddings are cached. Finds the largest batch that fits (doubling), then times it.

    python benchmarks/gpu_mfu.py            # one CUDA GPU; also run by gpu_check.sh
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from colossal_sd import speed  # noqa: E402
from colossal_sd.loss import noise_prediction_loss  # noqa: E402
from sd15 import SD15_UNET_CONFIG, TEXT_TOKENS, sd15_unet  # noqa: E402

LATENT = 64  # 512 px / 8


def train_steps(unet, optimizer, scheduler, batch, steps):
    latents = torch.randn(batch, 4, LATENT, LATENT, device="cuda")
    text = torch.randn(batch, TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"], device="cuda",
                       dtype=torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(0)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = noise_prediction_loss(unet, scheduler, latents, text, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def fits(unet, optimizer, scheduler, batch) -> bool:
    try:
        train_steps(unet, optimizer, scheduler, batch, 2)
        return True
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def main():
    from diffusers import DDPMScheduler
    unet = sd15_unet().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    from types import SimpleNamespace

    from colossal_sd.families import StableDiffusion
    flops = speed.unet_flops_per_sample(SimpleNamespace(unet=unet, family=StableDiffusion({}), vae_scale_factor=8),
                                        LATENT)
    batch = 8
    while batch < 1024 and fits(unet, optimizer, scheduler, batch * 2):
        batch *= 2
    steps = 10
    start = time.perf_counter()
    train_steps(unet, optimizer, scheduler, batch, steps)
    images_per_s = batch * steps / (time.perf_counter() - start)
    tflops = flops * images_per_s / 1e12
    peak = speed.bf16_peak_tflops(torch.device("cuda"))
    mfu = f"{tflops / peak:.1%}" if peak else "unknown peak"
    print(f"SD-1.5 UNet, 512 px, bf16 autocast, cached latents: batch {batch}, {images_per_s:.1f} images/s, "
          f"{flops / 1e12:.2f} TFLOP per sample (fwd+bwd), {tflops:.0f} TFLOP/s, MFU {mfu} "
          f"({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
