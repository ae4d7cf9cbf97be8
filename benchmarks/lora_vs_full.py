"""LoRA against full UNet fine-tuning on the same model, data and machine: trainable parameters, output size
and peak memory (max RSS of the trainer process).

    python benchmarks/lora_vs_full.py                              # embedded tiny model, 20 steps at 64 px
    python benchmarks/lora_vs_full.py --model /models/sd15 --resolution 512 --batch_size 1 --steps 5
"""

import argparse
import re
import tempfile
from pathlib import Path

from measure import run

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny-sd")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=4)
    a = p.parse_args()
    common = ["--pretrained_model_name_or_path", a.model, "--resolution", a.resolution, "--train_batch_size",
              a.batch_size, "--max_train_steps", a.steps, "--max_train_samples", a.batch_size * a.steps,
              "--plugin", "torch_ddp", "--seed", "0", "--report_to", "none"]
    common = [str(f) for f in common]
    with tempfile.TemporaryDirectory() as tmp:
        full_log, full_rss = run(common, f"{tmp}/full")
        lora_log, lora_rss = run(common + ["--use_lora", "--rank", str(a.rank)], f"{tmp}/lora")
        unet_file = Path(tmp, "full", "unet", "diffusion_pytorch_model.safetensors")
        lora_file = Path(tmp, "lora", "pytorch_lora_weights.safetensors")
        from safetensors.torch import load_file
        unet_params = sum(t.numel() for t in load_file(unet_file).values())
        lora_params = int(re.search(r"([\d,]+) trainable parameters", lora_log).group(1).replace(",", ""))
        rows = [("full UNet", unet_params, unet_file.stat().st_size, full_rss),
                (f"LoRA rank {a.rank}", lora_params, lora_file.stat().st_size, lora_rss)]
    print(f"model {a.model}, {a.steps} steps, batch {a.batch_size}, {a.resolution} px, torch_ddp, 1 process")
    print(f"{'':<12} {'trainable params':>17} {'weights file':>14} {'peak RSS':>10}")
    for name, params, size, rss in rows:
        print(f"{name:<12} {params:>17,} {size / 2**20:>11.2f} MiB {rss:>6.0f} MiB")
    print(f"LoRA/full: params {lora_params / unet_params:.2%}, file {rows[1][2] / rows[0][2]:.2%}, "
          f"peak RSS {lora_rss / full_rss:.2%}")


if __name__ == "__main__":
    main()
