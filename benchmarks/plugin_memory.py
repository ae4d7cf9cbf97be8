"""Peak GPU memory and speed of one plugin configuration on an SD-1.5-shaped UNet at 512 px (random init).

Run under torchrun, one configuration a process so that peaks do not mix:
    torchrun --standalone --nproc_per_node 1 benchmarks/plugin_memory.py --plugin gemini --placement cpu \
        --train_batch_size 1
Any trainer flag is accepted. It prints one line `RESULT {json}`; gpu_check.sh gathers them into a table.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parse_arguments  # noqa: E402
from colossal_sd import distributed, plugins  # noqa: E402
from colossal_sd.loss import noise_prediction_loss  # noqa: E402
from sd15 import TEXT_TOKENS, sd15_unet  # noqa: E402

WARMUP, TIMED = 2, 6


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
    args = parse_arguments.parse_args(sys.argv[1:])
    info = distributed.init_distributed()
    engine = plugins.build_engine(args, info)
    torch.manual_seed(0)
    unet = sd15_unet()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = engine.make_optimizer(list(unet.parameters()), args.learning_rate, (0.9, 0.999), 1e-2, 1e-8)
    unet, optimizer, _ = engine.wrap(unet, optimizer, None)
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    batch = args.train_batch_size
    latents = torch.randn(batch, 4, 64, 64, device=info.device, dtype=engine.compute_dtype)
    text = torch.randn(batch, TEXT_TOKENS, 768, device=info.device, dtype=engine.compute_dtype)
    losses, start = [], None
    for step in range(WARMUP + TIMED):
        if step == WARMUP:
            synchronize(info.device)
            start = time.perf_counter()
        generator = torch.Generator(info.device).manual_seed(0)  # the same noise each step: the loss must fall
        with engine.autocast():
            loss = noise_prediction_loss(unet, scheduler, latents, text, generator)
        engine.backward(loss, optimizer)
        engine.step(unet, optimizer)
        losses.append(loss.item())
    synchronize(info.device)
    steps_per_s = TIMED / (time.perf_counter() - start)
    if info.is_main:
        print("RESULT " + json.dumps({
            "plugin": engine.plugin, "placement": args.placement if engine.plugin == "gemini" else "-",
            "precision": engine.precision, "batch": batch, "grad_ckpt": args.gradient_checkpointing,
            "peak_gib": peak_memory_gib(info.device), "steps_per_s": steps_per_s,
            "images_per_s": steps_per_s * batch * info.world_size, "first_loss": losses[0], "last_loss": losses[-1],
            "loss_ok": all(map(math.isfinite, losses)) and losses[-1] < losses[0]}))
    distributed.shutdown_distributed()


if __name__ == "__main__":
    main()
