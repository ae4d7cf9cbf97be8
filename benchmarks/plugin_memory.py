"""Peak GPU memory and speed of one plugin configuration on a randomly initialised UNet of a real shape.

Run under torchrun, one configuration a process so that peaks do not mix:
    torchrun --standalone --nproc_per_node 1 benchmarks/plugin_memory.py --plugin gemini --placement cpu \
        --train_batch_size 1
    torchrun --standalone --nproc_per_node 1 benchmarks/plugin_memory.py --unet_shape sdxl --plugin gemini \
        --placement cpu --mixed_precision bf16 --gradient_checkpointing --train_batch_size 1
Shapes: sd15 (Stable Diffusion 1.5 at 512 px: 64x64 latents, 77x768 text states), sdxl (SDXL base at 1024 px:
128x128 latents, 77x2048 text states, pooled 1280, time ids), and tiny-sd / tiny-sdxl (the embedded tiny models'
UNets at their own sample size: the CPU dry run of this script). Any trainer flag is accepted. It prints one line
`RESULT {json}`; gpu_check.sh gathers them into a table. peak_gib is the whole process's peak (moving the fp32
UNet to the device and boosting it included); train_peak_gib only the training steps'.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parse_arguments  # noqa: E402
from colossal_sd import distributed, families, plugins  # noqa: E402
from colossal_sd.loss import noise_prediction_loss  # noqa: E402
from sd15 import SD15_UNET_CONFIG  # noqa: E402
from sdxl import SDXL_UNET_CONFIG  # noqa: E402

SHAPES = {  # name -> (UNet config or embedded model, pipeline class whose conditioning it takes)
    "sd15": (SD15_UNET_CONFIG, "StableDiffusionPipeline"),
    "sdxl": (SDXL_UNET_CONFIG, "StableDiffusionXLPipeline"),
    "tiny-sd": ("embedded:tiny-sd", "StableDiffusionPipeline"),
    "tiny-sdxl": ("embedded:tiny-sdxl", "StableDiffusionXLPipeline"),
}
VAE_SCALE = 8  # every SD VAE: latents are 1/8 of the image


def parse(argv):
    """This script's own flags; the rest are the trainer's."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--unet_shape", choices=SHAPES, default="sd15")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--timed_steps", type=int, default=6)
    own, rest = p.parse_known_args(argv)
    return own, parse_arguments.parse_args(rest)


def random_unet(shape: str):
    from diffusers import UNet2DConditionModel
    config, pipeline_class = SHAPES[shape]
    if isinstance(config, str):  # an embedded tiny model: its UNet's config, fresh weights
        from colossal_sd.embedded import resolve
        config = UNet2DConditionModel.load_config(resolve(config), subfolder="unet")
    return UNet2DConditionModel.from_config(config), families.for_pipeline_class(pipeline_class)


def cast_floats(value, dtype):
    """The conditioning as the trainer feeds it: text states (and SDXL's pooled embedding and time ids) in the
    compute dtype, the cache's dtype."""
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value.to(dtype) if value.is_floating_point() else value


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device):
    """Peak GPU memory allocated by tensors; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    own, args = parse(sys.argv[1:])
    info = distributed.init_distributed()
    engine = plugins.build_engine(args, info)
    torch.manual_seed(0)
    unet, family = random_unet(own.unet_shape)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = engine.make_optimizer(list(unet.parameters()), args.learning_rate, (0.9, 0.999), 1e-2, 1e-8)
    unet, optimizer, _ = engine.wrap(unet, optimizer, None)
    config = engine.unwrap(unet).config
    setup_peak = peak_memory_gib(info.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    batch, size = args.train_batch_size, config.sample_size
    latents = torch.randn(batch, config.in_channels, size, size, device=info.device, dtype=engine.compute_dtype)
    conditioning = cast_floats(family.random_conditioning(config, batch, size * VAE_SCALE, info.device),
                               engine.compute_dtype)
    losses, start = [], None
    for step in range(own.warmup_steps + own.timed_steps):
        if step == own.warmup_steps:
            synchronize(info.device)
            start = time.perf_counter()
        generator = torch.Generator(info.device).manual_seed(0)  # the same noise each step: the loss must fall
        with engine.autocast():
            loss = noise_prediction_loss(unet, scheduler, latents, conditioning, generator)
        engine.backward(loss, optimizer)
        engine.step(unet, optimizer)
        losses.append(loss.item())
    synchronize(info.device)
    steps_per_s = own.timed_steps / (time.perf_counter() - start)
    if info.is_main:
        print("RESULT " + json.dumps({
            "unet": own.unet_shape, "resolution": size * VAE_SCALE,
            "plugin": engine.plugin, "placement": placement(args, engine), "precision": engine.precision,
            "batch": batch, "grad_ckpt": args.gradient_checkpointing,
            "peak_gib": max(setup_peak, peak_memory_gib(info.device)), "train_peak_gib": peak_memory_gib(info.device),
            "steps_per_s": steps_per_s, "images_per_s": steps_per_s * batch * info.world_size,
            "first_loss": losses[0], "last_loss": losses[-1],
            "loss_ok": all(map(math.isfinite, losses)) and losses[-1] < losses[0]}))
    distributed.shutdown_distributed()


def placement(args, engine) -> str:
    """Where the optimizer state (and parameters) live, as the table says it."""
    if engine.plugin == "gemini":
        params = f" + params {args.offload_param_frac:g}" if args.offload_param_frac else ""
        return args.placement + params
    if engine.plugin == "low_level_zero" and args.cpu_offload:
        return "cpu"
    return "-"


if __name__ == "__main__":
    main()
