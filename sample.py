"""Prompts in, PNGs out: sample a trained model, a checkpoint mid-run, a single file or a LoRA.

    python sample.py --model sd-model-finetuned --prompt "an emoji of red heart" --num_images 4
    python sample.py --model sd-model-finetuned/checkpoint-500 --prompt_file prompts.txt
    torchrun --nproc_per_node 2 sample.py --model my-model.safetensors --lora my-lora --prompt_file prompts.txt

Writes output_dir/00000-<seed>.png, ... (each with A1111's "parameters" text) and output_dir/grid.png.
A prompt file has one prompt per line with kohya's options (--n --w --h --d --l --s --ss); see
colossal_sd/prompt_file.py.
"""

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from colossal_sd.sampling import DEFAULT_GUIDANCE, SCHEDULERS

    p = argparse.ArgumentParser(description="Sample images from a trained Stable Diffusion model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="A diffusers pipeline folder (the trainer's output_dir) or hub id, a checkpoint-N folder "
                        "(its UNet or LoRA over the run's base model), or a single .safetensors/.ckpt file.")
    p.add_argument("--single_file_config", default=None,
                   help="With a single-file --model: the diffusers pipeline folder or hub id whose configs, "
                        "tokenizer and scheduler go with it (as the trainer's flag).")
    p.add_argument("--allow_unsafe_pickle", action="store_true",
                   help="Load a .ckpt --model even if it holds more than tensors (only for files you trust).")
    p.add_argument("--lora", action="append", default=None,
                   help="A LoRA file (diffusers or kohya .safetensors) or a folder holding one; repeatable.")
    p.add_argument("--lora_scale", action="append", type=float, default=None,
                   help="LoRA strength: one for all --lora, or one per --lora in order. Default 1.")
    p.add_argument("--prompt", action="append", default=None, help="A prompt; repeatable.")
    p.add_argument("--prompt_file", default=None,
                   help="One prompt per line, # comments, kohya's per-line options: --n negative prompt, --w width, "
                        "--h height, --d seed, --l guidance scale, --s steps, --ss sampler.")
    p.add_argument("--negative_prompt", default="", help="Negative prompt (a line's --n wins).")
    p.add_argument("--width", type=int, default=None,
                   help="Image width, a multiple of 8 (--w). Default: the model's native size.")
    p.add_argument("--height", type=int, default=None,
                   help="Image height, a multiple of 8 (--h). Default: the model's native size.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of each prompt's first image; image i gets seed + i (--d).")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="Classifier-free guidance (--l).")
    p.add_argument("--steps", type=int, default=20, help="Denoising steps (--s).")
    p.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="Sampler (--ss). Default: the model's own scheduler.")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="Inference precision. auto: fp16 on a GPU, fp32 on the CPU.")
    p.add_argument("--output_dir", default="samples", help="Where the PNGs and grid.png go.")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from colossal_sd import prompt_file as pf
    from colossal_sd.errors import UserError

    args = build_parser().parse_args(argv)
    for flag, check in (("width", pf.check_size), ("height", pf.check_size), ("seed", pf.check_seed),
                        ("steps", pf.check_steps), ("guidance_scale", pf.check_guidance)):
        if getattr(args, flag) is not None:
            check(getattr(args, flag), f"--{flag}")
    if args.num_images < 1:
        raise UserError(f"--num_images must be at least 1 (got {args.num_images})")
    return args


def main(argv=None):
    from colossal_sd.hub import go_offline_if_unreachable

    args = parse_args(argv)
    go_offline_if_unreachable(args.model, args.single_file_config)  # before diffusers reads the offline flag
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from stable_diffusion_colossalai_trainer import quiet_libraries
    quiet_libraries()
    from colossal_sd.sampling import run
    run(args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from colossal_sd.errors import exit_on_user_error

    exit_on_user_error(main)
