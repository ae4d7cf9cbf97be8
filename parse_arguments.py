"""Every flag of the trainer.

Names and defaults follow diffusers' ``train_text_to_image.py`` where the two overlap, so existing command
lines keep working. Cross-flag checks live in :func:`check_arguments`; they raise ``UserError`` (one line, no
traceback).
"""

import argparse

from colossal_sd.embedded import EMBEDDED_DATASET, EMBEDDED_MODEL
from colossal_sd.errors import UserError

PLUGINS = ("auto", "torch_ddp", "torch_ddp_fp16", "gemini", "low_level_zero", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune Stable Diffusion's UNet with Colossal-AI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=EMBEDDED_MODEL,
                       help=f"Diffusers pipeline directory or hub id. '{EMBEDDED_MODEL}' is a tiny built-in model "
                            "that needs no network.")
    model.add_argument("--revision", default=None, help="Hub revision of the pretrained model.")
    model.add_argument("--variant", default=None, help="Weight variant of the pretrained model, e.g. 'fp16'.")
    model.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"),
                       help="Override the scheduler's prediction type (also written to the saved scheduler).")

    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help="Hub dataset id, or a local path that `datasets` loads: a saved dataset, "
                           "parquet/json/csv files, or an imagefolder. "
                           f"'{EMBEDDED_DATASET}' is a built-in captioned emoji set. "
                           f"Default (with no --train_data_dir): '{EMBEDDED_DATASET}'.")
    data.add_argument("--dataset_config_name", default=None, help="Config of the hub dataset.")
    data.add_argument("--train_data_dir", default=None,
                      help="An imagefolder: images plus metadata.jsonl or metadata.csv with a caption column.")
    data.add_argument("--image_column", default="image", help="Column holding the images.")
    data.add_argument("--caption_column", default="text",
                      help="Column holding the captions (a list of captions picks one at random).")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a random subset of this many samples.")
    data.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution. Default: the model's native one (512 for SD 1.5).")
    data.add_argument("--center_crop", action="store_true", help="Center crop instead of random crop.")
    data.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Processes that decode images. 0 decodes in the main process.")
    data.add_argument("--cache_latents", action="store_true",
                      help="Encode every image (both flips with --random_flip) once into a disk cache under "
                           "--cache_dir and train on the cached latents; frees the VAE.")
    data.add_argument("--cache_text_embeddings", action="store_true",
                      help="Encode every caption once into the disk cache; frees the text encoder.")
    data.add_argument("--aspect_ratio_bucketing", action="store_true",
                      help="Train each image in the bucket nearest its aspect ratio (about resolution² pixels) "
                           "instead of a square crop; every batch holds one bucket.")
    data.add_argument("--bucket_step", type=int, default=None,
                      help="Bucket sides are multiples of this. Default: the model's resolution multiple "
                           "(64 for SD 1.5).")
    data.add_argument("--max_aspect_ratio", type=float, default=2.0,
                      help="Longest bucket side over shortest side, at most.")
    data.add_argument("--streaming", action="store_true",
                      help="Stream the dataset (local parquet/json/imagefolder shards or the hub) instead of "
                           "loading it; memory stays flat. Needs --max_train_steps.")

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="sd-model-finetuned", help="Where the trained pipeline goes.")
    train.add_argument("--seed", type=int, default=None, help="Seed for a reproducible run.")
    train.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    train.add_argument("--num_train_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimizer steps to train for; overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute UNet activations in backward to save memory.")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the lr by batch size x accumulation steps x processes.")
    train.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, default=500)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-08)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip gradients to this norm; 0 disables.")
    train.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                       help="Compute precision. Default: the plugin's own (fp16 for gemini and torch_ddp_fp16, "
                            "otherwise no).")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (CUDA only). PyTorch SDPA is used otherwise.")
    train.add_argument("--compile", action="store_true", help="torch.compile the UNet.")

    log = p.add_argument_group("logging")
    log.add_argument("--logging_dir", default="logs", help="TensorBoard directory, relative to --output_dir.")
    log.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "none"))
    log.add_argument("--logging_steps", type=int, default=10, help="Log loss, lr and images/s every N steps.")

    dist = p.add_argument_group("Colossal-AI")
    dist.add_argument("--plugin", default="auto", choices=PLUGINS,
                      help="Booster plugin. 'auto': gemini with CUDA, torch_ddp otherwise. "
                           "'none': plain torch.nn.parallel.DistributedDataParallel, no Colossal-AI.")
    dist.add_argument("--placement", default="cpu", choices=("cuda", "cpu", "auto"),
                      help="Gemini placement: cuda keeps everything on the GPU, cpu offloads the optimizer "
                           "state, auto lets Gemini decide.")
    return p


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Cross-flag checks that need no model, data or device."""
    if args.dataset_name and args.train_data_dir:
        raise UserError("give either --dataset_name or --train_data_dir, not both")
    if args.dataset_name is None and args.train_data_dir is None:
        args.dataset_name = EMBEDDED_DATASET
    for flag in ("train_batch_size", "gradient_accumulation_steps", "logging_steps", "num_train_epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    for flag in ("max_train_steps", "max_train_samples", "resolution"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.dataloader_num_workers < 0:
        raise UserError("--dataloader_num_workers cannot be negative")
    check_data_pipeline(args)
    if args.plugin == "torch_ddp_fp16" and args.mixed_precision not in (None, "fp16"):
        raise UserError(f"--plugin torch_ddp_fp16 trains in fp16; drop --mixed_precision {args.mixed_precision} "
                        "or use --plugin torch_ddp")
    return args


def check_data_pipeline(args):
    """Streaming reads each row once per pass with no index: nothing to cache or bucket ahead of time."""
    if args.streaming:
        for flag in ("cache_latents", "cache_text_embeddings", "aspect_ratio_bucketing"):
            if getattr(args, flag):
                raise UserError(f"--streaming cannot be combined with --{flag} (it needs the whole dataset "
                                "indexed up front); drop one of them")
        if args.max_train_steps is None:
            raise UserError("--streaming needs --max_train_steps (a stream has no length to count epochs by)")
    if args.max_aspect_ratio < 1:
        raise UserError("--max_aspect_ratio must be at least 1")
    if args.bucket_step is not None and args.bucket_step < 1:
        raise UserError("--bucket_step must be at least 1")


def parse_args(argv=None) -> argparse.Namespace:
    return check_arguments(build_parser().parse_args(argv))
