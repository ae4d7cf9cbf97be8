"""Speed in the loop: the UNet's FLOPs per sample, achieved TFLOP/s and MFU, channels_last and torch.compile."""

import torch

# Dense bf16 tensor-core peaks, TFLOP/s per device (vendor datasheets, no sparsity). Unknown devices get no MFU.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def unet_flops_per_sample(parts, latent_size: int) -> int:
    """FLOPs of one training sample (forward and backward), counted once on a batch of one.

    Counted on a copy of the UNet on the meta device: shapes only, no memory and no time on the real device,
    wherever (and however large) the UNet being trained is."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel.from_config(parts.unet.config)
    latents = torch.randn(1, unet.config.in_channels, latent_size, latent_size, device=meta)
    conditioning = parts.family.random_conditioning(unet.config, 1, latent_size * parts.vae_scale_factor, meta)
    timesteps = torch.zeros(1, dtype=torch.long, device=meta)
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, **conditioning, return_dict=False)[0].float().pow(2).mean().backward()
    return counter.get_total_flops()


def bf16_peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def with_tflops(values: dict, flops_per_sample: int, peak_tflops, world_size: int) -> dict:
    """Add achieved TFLOP/s (all processes) and, with a known peak, MFU to a log line's values."""
    values["tflops"] = flops_per_sample * values["images_per_s"] / 1e12
    if peak_tflops:
        values["mfu"] = values["tflops"] / (peak_tflops * world_size)
    return values


def speed_up_unet(unet, device, compile_unet: bool):
    """channels_last helps convolutions on CUDA tensor cores only (on CPU it measured slower); compile on request."""
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()  # in place: parameter names, and so saving, stay unchanged
