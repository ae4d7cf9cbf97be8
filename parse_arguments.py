"""Every flag of the trainer.

Names and defaults follow diffusers' ``train_text_to_image.py`` where the two overlap, so existing command
lines keep working. Cross-flag checks live in :func:`check_arguments`; they raise ``UserError`` (one line, no
traceback).
"""

import argparse
import math
import os
from typing import NamedTuple, Optional

from colossal_sd.config_file import parse_with_config
from colossal_sd.embedded import EMBEDDED_DATASET, EMBEDDED_DEMO_DATASET, EMBEDDED_MODEL
from colossal_sd.errors import UserError
from colossal_sd.single_file import is_single_file
from colossal_sd.lora import DEFAULT_TARGET_MODULES, check_lora_arguments
from colossal_sd import prior_preservation
from colossal_sd.tracking import REPORT_TO

PLUGINS = ("auto", "torch_ddp", "torch_ddp_fp16", "gemini", "low_level_zero", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class Range(NamedTuple):
    """The values a numeric flag accepts. NaN and infinity lie in no range: every comparison with NaN is False,
    so a check written as `if value < low: raise` lets NaN through."""
    low: float
    high: Optional[float] = None  # None: no upper bound
    low_closed: bool = True
    high_closed: bool = False
    note: str = ""

    def __contains__(self, value) -> bool:
        return (math.isfinite(value)
                and (value >= self.low if self.low_closed else value > self.low)
                and (self.high is None or (value <= self.high if self.high_closed else value < self.high)))

    def describe(self, integer: bool) -> str:
        if self.high is not None:
            text = f"in {'[' if self.low_closed else '('}{self.low}, {self.high}{']' if self.high_closed else ')'}"
        elif integer:
            text = f"at least {self.low}"
        else:
            text = f"a finite number {'>=' if self.low_closed else '>'} {self.low}"
        return f"{text}, {self.note}" if self.note else text


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, low_closed=False)
FRACTION = Range(0, 1)  # [0, 1): a probability or share that must leave something
SHARE = Range(0, 1, high_closed=True)
SEED = Range(0, 2**64 - 1, high_closed=True)  # torch.manual_seed's range; numpy's SeedSequence refuses negatives

# Every numeric flag and what it accepts; a flag left unset (None) is not checked.
VALUE_RANGES = {
    "train_batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "num_train_epochs": AT_LEAST_1,
    "max_train_steps": AT_LEAST_1, "max_train_samples": AT_LEAST_1, "resolution": AT_LEAST_1,
    "logging_steps": AT_LEAST_1, "checkpointing_steps": AT_LEAST_1, "checkpoints_total_limit": AT_LEAST_1,
    "stop_after_steps": AT_LEAST_1, "bucket_step": AT_LEAST_1, "dataloader_num_workers": AT_LEAST_0,
    "seed": SEED, "validation_seed": SEED,
    "learning_rate": POSITIVE, "lr_warmup_steps": AT_LEAST_0,
    "adam_beta1": FRACTION, "adam_beta2": FRACTION, "adam_weight_decay": AT_LEAST_0, "adam_epsilon": POSITIVE,
    "max_grad_norm": Range(0, note="0 disables clipping"),
    "max_aspect_ratio": Range(1),
    "offload_optim_frac": SHARE, "offload_param_frac": SHARE,
    "gemini_search_range_m": AT_LEAST_1, "gemini_min_chunk_size_m": POSITIVE, "gemini_max_prefetch": AT_LEAST_0,
    "rank": AT_LEAST_1, "lora_alpha": POSITIVE, "lora_dropout": FRACTION,
    "ema_decay": Range(0, 1, low_closed=False),
    "snr_gamma": POSITIVE, "noise_offset": AT_LEAST_0, "input_perturbation": AT_LEAST_0,
    "caption_dropout": FRACTION, "min_timestep": AT_LEAST_0, "max_timestep": AT_LEAST_1,
    "keep_tokens": AT_LEAST_0, "caption_tag_dropout": FRACTION, "caption_variants": AT_LEAST_1,
    "num_validation_images": AT_LEAST_1, "validation_inference_steps": AT_LEAST_1,
    "validation_steps": AT_LEAST_1, "validation_epochs": AT_LEAST_0, "validation_split": FRACTION,
    "num_class_images": AT_LEAST_1, "sample_batch_size": AT_LEAST_1, "prior_loss_weight": POSITIVE,
}


def check_ranges(args: argparse.Namespace, ranges=VALUE_RANGES):
    for flag, accepted in ranges.items():
        value = getattr(args, flag, None)
        if value is not None and value not in accepted:
            raise UserError(f"--{flag} must be {accepted.describe(isinstance(value, int))} (got {value})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune Stable Diffusion's UNet with Colossal-AI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=EMBEDDED_MODEL,
                       help=f"Diffusers pipeline directory or hub id, or a single-file .safetensors/.ckpt "
                            f"checkpoint. '{EMBEDDED_MODEL}' is a tiny built-in model that needs no network.")
    model.add_argument("--single_file_config", default=None,
                       help="With a single-file base model (.safetensors/.ckpt): the diffusers pipeline directory "
                            "or hub id whose configs, tokenizer and scheduler go with it. Default: the one "
                            "diffusers associates with the file's generation (SD 1.5, SD 2.1 or SDXL base), "
                            "from the local cache.")
    model.add_argument("--allow_unsafe_pickle", action="store_true",
                       help="Load a .ckpt base model even if it holds more than tensors (unpickling it can run "
                            "code: only for files you trust).")
    model.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="Another VAE to encode (and save) with instead of the base model's: a VAE folder or "
                            "hub id, e.g. madebyollin/sdxl-vae-fp16-fix, whose config lets SDXL encode in fp16. "
                            "The saved pipeline holds this VAE.")
    model.add_argument("--revision", default=None, help="Hub revision of the pretrained model.")
    model.add_argument("--variant", default=None, help="Weight variant of the pretrained model, e.g. 'fp16'.")
    model.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"),
                       help="What the run trains (also written to the saved scheduler and single file). "
                            "Default: a single-file base model's metadata, else the scheduler's.")
    model.add_argument("--rescale_betas_zero_snr", action="store_true",
                       help="Zero terminal SNR (kohya's --zero_terminal_snr): rescale the betas so the last timestep "
                            "is pure noise, and sample from it (trailing timestep spacing). Needs v-prediction.")

    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help="Hub dataset id, or a local path that `datasets` loads: a saved dataset, "
                           "parquet/json/csv files, or an imagefolder. "
                           f"'{EMBEDDED_DATASET}' is a built-in captioned emoji set, '{EMBEDDED_DEMO_DATASET}' its "
                           "60 emoji named by a colour (the scripts' demo). "
                           f"Default (with no --train_data_dir): '{EMBEDDED_DATASET}'.")
    data.add_argument("--dataset_config_name", default=None, help="Config of the hub dataset.")
    data.add_argument("--train_data_dir", default=None,
                      help="A folder of images: an imagefolder (metadata.jsonl or metadata.csv with a caption "
                           "column), or images with a caption file beside each (cat.png + cat.txt), subfolders "
                           "included. kohya's concept folders `<N>_<tokens>/` repeat each of their images N times "
                           "an epoch, and <tokens> captions an image with no caption file.")
    data.add_argument("--caption_extension", default=".txt",
                      help="The caption files' extension in a --train_data_dir without a metadata file.")
    data.add_argument("--dataset_config", default=None, metavar="FILE.toml",
                      help="A TOML file of several datasets ([[subsets]]: a folder, an imagefolder or a dataset, "
                           "each with its own repeats, caption column or extension and caption options) mixed "
                           "into one run; instead of --dataset_name / --train_data_dir.")
    data.add_argument("--image_column", default="image", help="Column holding the images.")
    data.add_argument("--caption_column", default="text",
                      help="Column holding the captions (a list of captions picks one at random).")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a random subset of this many images (their concept folders' repeats come "
                           "on top); class and regularisation images are all kept.")
    data.add_argument("--shuffle_caption", action="store_true",
                      help="Shuffle a caption's comma-separated tags, anew each step.")
    data.add_argument("--keep_tokens", type=int, default=0,
                      help="With --shuffle_caption or --caption_tag_dropout: the first N tags stay in place and "
                           "are never dropped.")
    data.add_argument("--caption_tag_dropout", type=float, default=0.0,
                      help="Drop each tag of a caption (after the first --keep_tokens) with this probability.")
    data.add_argument("--caption_variants", type=int, default=None,
                      help="With --cache_text_embeddings and caption shuffling or tag dropout: cache this many "
                           "variants of each caption, drawn from the seed; each step picks one. Default: 4.")
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
    prior_preservation.add_arguments(p)

    train = p.add_argument_group("training")
    train.add_argument("--output_dir", default="sd-model-finetuned", help="Where the trained pipeline goes.")
    train.add_argument("--save_single_file", action="store_true",
                       help="Also write output_dir/<output_dir name>.safetensors: UNet, VAE and text encoder in "
                            "the original Stable Diffusion layout that AUTOMATIC1111 and ComfyUI load.")
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
    train.add_argument("--use_8bit_adam", action="store_true",
                       help="bitsandbytes' 8-bit AdamW (CUDA; torch_ddp, torch_ddp_fp16 or none).")
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

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500,
                      help="Write output_dir/checkpoint-<step>/ every N optimizer steps (resumable; its unet/ "
                           "loads with diffusers).")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None,
                      help="Keep only the newest N checkpoints; older ones are deleted once a new one is complete.")
    ckpt.add_argument("--resume_from_checkpoint", default=None,
                      help="'latest' (the newest complete checkpoint in --output_dir; none: start fresh), "
                           "a checkpoint-<step> name in --output_dir, or a checkpoint path. Resuming from an older "
                           "checkpoint moves the later ones into output_dir/abandoned/.")
    ckpt.add_argument("--stop_after_steps", type=int, default=None,
                      help="Write a checkpoint and exit 0 after N optimizer steps of this invocation, e.g. to "
                           "fit a cluster job's time limit; chain jobs with --resume_from_checkpoint latest.")
    ckpt.add_argument("--allow_mismatched_resume", action="store_true",
                      help="Resume even where the checkpoint was trained with other images per step, another "
                           "resolution or another base model (the log says what changed).")

    log = p.add_argument_group("logging")
    log.add_argument("--logging_dir", default="logs", help="TensorBoard directory, relative to --output_dir.")
    log.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                     help="Where to log: TensorBoard events in output_dir/logging_dir, wandb (pip install wandb), "
                          "all, or none.")
    log.add_argument("--logging_steps", type=int, default=10, help="Log loss, lr and images/s every N steps.")

    add_quality_arguments(p)

    dist = p.add_argument_group("Colossal-AI")
    dist.add_argument("--plugin", default="auto", choices=PLUGINS,
                      help="Booster plugin. 'auto': gemini with CUDA, torch_ddp otherwise. "
                           "'none': plain torch.nn.parallel.DistributedDataParallel, no Colossal-AI.")
    dist.add_argument("--placement", default="cpu", choices=("cuda", "cpu", "auto"),
                      help="Gemini placement: cuda keeps everything on the GPU, cpu offloads the optimizer "
                           "state, auto lets Gemini decide.")
    dist.add_argument("--offload_optim_frac", type=float, default=None,
                      help="Gemini with --placement cpu: share of the optimizer state kept on the CPU. Default 1.0.")
    dist.add_argument("--offload_param_frac", type=float, default=None,
                      help="Gemini with --placement cpu: share of the fp16 parameters kept on the CPU as well "
                           "(needs --offload_optim_frac 1.0). Default 0.0.")
    dist.add_argument("--gemini_search_range_m", type=int, default=32,
                      help="Gemini: range in MiB searched for the chunk size that wastes least memory.")
    dist.add_argument("--gemini_min_chunk_size_m", type=float, default=32,
                      help="Gemini: smallest chunk, in MiB.")
    dist.add_argument("--gemini_max_prefetch", type=int, default=0,
                      help="Gemini: chunks fetched ahead of use, to overlap host-device copies with compute.")
    dist.add_argument("--gemini_async_reduce", action=argparse.BooleanOptionalAction, default=True,
                      help="Gemini: reduce gradients on a side CUDA stream.")
    dist.add_argument("--zero_stage", type=int, default=None, choices=(1, 2),
                      help="low_level_zero: 1 shards the optimizer state, 2 also the gradients. Default 2.")
    dist.add_argument("--cpu_offload", action="store_true",
                      help="low_level_zero: keep master weights, gradients and optimizer state on the CPU "
                           "(Colossal-AI's HybridAdam steps them there).")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true",
                      help="Train LoRA adapters on the UNet instead of every UNet weight.")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale: alpha/rank). Default: --rank.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    lora.add_argument("--lora_target_modules", default=None,
                      help=f"Comma-separated UNet module names to adapt. Default: {DEFAULT_TARGET_MODULES}.")
    lora.add_argument("--train_text_encoder_lora", action="store_true",
                      help="Also train LoRA adapters on the text encoder's attention projections.")
    lora.add_argument("--lora_export_format", default="diffusers", choices=("diffusers", "kohya"),
                      help="kohya also writes an A1111/ComfyUI file beside diffusers' pytorch_lora_weights.")
    lora.add_argument("--merge_lora", action="store_true",
                      help="Also write the base pipeline with the LoRA fused in, to output_dir/merged.")
    return p


def add_quality_arguments(p: argparse.ArgumentParser):
    ema = p.add_argument_group("EMA")
    ema.add_argument("--use_ema", action="store_true",
                     help="Keep an exponential moving average of the UNet; it is what gets saved (raw weights go "
                          "to output_dir/unet_raw) and what validation samples from.")
    ema.add_argument("--ema_decay", type=float, default=0.9999,
                     help="EMA decay, reached after a warm-up of min(decay, (1+t)/(10+t)) as in diffusers.")
    ema.add_argument("--ema_offload_to_cpu", action="store_true", help="Keep the EMA weights in CPU memory.")

    loss = p.add_argument_group("loss")
    loss.add_argument("--snr_gamma", type=float, default=None,
                      help="Min-SNR-gamma loss weighting (5.0 is recommended); off by default.")
    loss.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the noise offset (e.g. 0.05).")
    loss.add_argument("--input_perturbation", type=float, default=0.0,
                      help="Scale of the input perturbation of the noised latents (0.1 is recommended).")
    loss.add_argument("--caption_dropout", type=float, default=0.0,
                      help="Probability of training on an empty caption, for classifier-free guidance.")
    loss.add_argument("--min_timestep", type=int, default=0, help="Smallest training timestep.")
    loss.add_argument("--max_timestep", type=int, default=None,
                      help="Training timesteps stay below this. Default: the scheduler's num_train_timesteps.")

    val = p.add_argument_group("validation")
    val.add_argument("--validation_prompts", nargs="+", default=None,
                     help="Prompts sampled during and after training into output_dir/samples/*.png.")
    val.add_argument("--validation_prompts_file", default=None, metavar="FILE",
                     help="Instead of --validation_prompts: a prompt file as sample.py's --prompt_file reads, one "
                          "prompt per line with kohya's options (--n negative, --w/--h size, --d seed, "
                          "--l guidance, --s steps); what a line leaves out comes from the validation flags.")
    val.add_argument("--validation_steps", type=int, default=None, help="Validate every N optimizer steps.")
    val.add_argument("--validation_epochs", type=int, default=5, help="Validate every N epochs (0: only by --validation_steps).")
    val.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    val.add_argument("--validation_seed", type=int, default=0, help="Seed of the validation images and noise.")
    val.add_argument("--validation_inference_steps", type=int, default=20,
                     help="Denoising steps per validation image.")
    val.add_argument("--validation_split", type=float, default=0.0,
                     help="Hold out this fraction of the data for a validation loss (e.g. 0.05).")


def check_quality_arguments(args: argparse.Namespace):
    if args.max_timestep is not None and args.max_timestep <= args.min_timestep:
        raise UserError(f"need --min_timestep < --max_timestep (got {args.min_timestep} and {args.max_timestep})")
    if args.report_to in ("wandb", "all"):
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise UserError(f"--report_to {args.report_to} needs wandb: pip install wandb")


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Cross-flag checks that need no model, data or device."""
    if args.dataset_name and args.train_data_dir:
        raise UserError("give either --dataset_name or --train_data_dir, not both")
    check_dataset_config(args)
    prior_preservation.check_arguments(args)
    if args.dataset_name is None and args.train_data_dir is None and args.dataset_config is None and (
            args.instance_data_dir is None):
        args.dataset_name = EMBEDDED_DATASET
    check_ranges(args)
    check_caption_options(args)
    check_data_pipeline(args)
    if args.plugin == "torch_ddp_fp16" and args.mixed_precision not in (None, "fp16"):
        raise UserError(f"--plugin torch_ddp_fp16 trains in fp16; drop --mixed_precision {args.mixed_precision} "
                        "or use --plugin torch_ddp")
    if is_single_file(args.pretrained_model_name_or_path) and not os.path.isfile(
            os.path.expanduser(args.pretrained_model_name_or_path)):
        raise UserError(f"--pretrained_model_name_or_path '{args.pretrained_model_name_or_path}' does not exist")
    if args.single_file_config and not is_single_file(args.pretrained_model_name_or_path):
        raise UserError("--single_file_config goes with a single-file --pretrained_model_name_or_path "
                        "(.safetensors or .ckpt); drop it for a diffusers directory or hub id")
    if args.allow_unsafe_pickle and not args.pretrained_model_name_or_path.lower().endswith(".ckpt"):
        raise UserError("--allow_unsafe_pickle only applies to a .ckpt --pretrained_model_name_or_path; drop it")
    if args.resume_from_checkpoint not in (None, "latest"):  # a bad explicit checkpoint fails before any loading
        from colossal_sd.checkpoint import problem, resolve_resume
        resolve_resume(args.resume_from_checkpoint, args.output_dir, print, check=problem)  # checksums come later
    check_lora_arguments(args)
    check_quality_arguments(args)
    check_validation_prompts(args)
    return args


def check_validation_prompts(args):
    """One definition of the grids' prompts; a bad prompt file fails here, before anything loads."""
    if args.validation_prompts_file and args.validation_prompts:
        raise UserError("give either --validation_prompts or --validation_prompts_file, not both")
    if args.validation_prompts_file:
        from colossal_sd.prompt_file import read_prompt_file
        read_prompt_file(args.validation_prompts_file)


def check_dataset_config(args):
    """A --dataset_config replaces the data flags; a broken file fails here, before anything loads."""
    if args.caption_extension and not args.caption_extension.startswith("."):
        args.caption_extension = "." + args.caption_extension
    if args.dataset_config is None:
        return
    given = [f"--{flag}" for flag in ("dataset_name", "train_data_dir") if getattr(args, flag)]
    if given:
        raise UserError(f"--dataset_config names the data: drop {' and '.join(given)}")
    from colossal_sd.dataset_config import read_subsets
    read_subsets(args.dataset_config)


def check_caption_options(args):
    augments = args.shuffle_caption or args.caption_tag_dropout > 0 or args.dataset_config
    if args.keep_tokens and not augments:
        raise UserError("--keep_tokens keeps tags in place under --shuffle_caption or --caption_tag_dropout; "
                        "add one of them or drop it")
    if args.caption_variants is not None and not (args.cache_text_embeddings and augments):
        raise UserError("--caption_variants sets how many caption variants --cache_text_embeddings caches under "
                        "--shuffle_caption or --caption_tag_dropout; without those, every step draws a fresh "
                        "variant: drop it")


def check_data_pipeline(args):
    """Streaming reads each row once per pass with no index: nothing to cache or bucket ahead of time."""
    if args.streaming:
        for flag in ("cache_latents", "cache_text_embeddings", "aspect_ratio_bucketing", "validation_split",
                     "dataset_config"):
            if getattr(args, flag):
                raise UserError(f"--streaming cannot be combined with --{flag} (it needs the whole dataset "
                                "indexed up front); drop one of them")
        if args.max_train_steps is None:
            raise UserError("--streaming needs --max_train_steps (a stream has no length to count epochs by)")
    if args.cache_text_embeddings and args.train_text_encoder_lora:
        raise UserError("--cache_text_embeddings freezes the text encoder's outputs, --train_text_encoder_lora "
                        "trains it; drop one of them")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, over the --config file's values when there is one."""
    return parse_with_config(build_parser(), argv, check_arguments)
