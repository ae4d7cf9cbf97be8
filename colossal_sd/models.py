"""Loading Stable Diffusion's parts: a trainable UNet, a frozen VAE and text encoder, the noise scheduler."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from colossal_sd import embedded, noise_schedule, single_file
from colossal_sd.errors import UserError
from colossal_sd.hub import load_failure


@dataclass
class StableDiffusionParts:
    source: str  # local directory or hub id the parts came from
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    single_file: Optional[str] = None  # the single-file checkpoint the weights came from, if any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def resolution_multiple(self) -> int:
        """Pixels per latent cell, times the UNet's downsampling: every resolution must divide by this."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)


def resolve_model_source(name_or_path: str) -> str:
    if embedded.is_embedded(name_or_path):
        return embedded.resolve(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise UserError(f"--pretrained_model_name_or_path '{name_or_path}' is not a diffusers pipeline "
                            "directory (no model_index.json or unet/)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"--pretrained_model_name_or_path '{name_or_path}' does not exist")
    return name_or_path


def load_parts(args) -> StableDiffusionParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel, CLIPTokenizer

    if single_file.is_single_file(args.pretrained_model_name_or_path):
        base = single_file.open_base_model(args)
        source, prediction_type = base.source, base.prediction_type
    else:
        base, source = None, resolve_model_source(args.pretrained_model_name_or_path)
        prediction_type = args.prediction_type
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        if base is not None:
            models = single_file.build_models(base, common)
            text_encoder, vae, unet = models["text_encoder"], models["vae"], models["unet"]
        else:
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=args.variant,
                                                         **common)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, **common)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant, **common)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError, SafetensorError) as e:  # a local source's message names the broken file
        raise UserError(load_failure("model", args.pretrained_model_name_or_path, e,
                                     "local diffusers pipeline directory", source)) from None
    noise_scheduler = noise_schedule.training_scheduler(noise_scheduler, prediction_type,
                                                        getattr(args, "rescale_betas_zero_snr", False))
    return StableDiffusionParts(source, tokenizer, text_encoder, vae, unet, noise_scheduler,
                                single_file=args.pretrained_model_name_or_path if base is not None else None)


def check_resolution(parts: StableDiffusionParts, resolution):
    resolution = resolution or parts.native_resolution
    multiple = parts.resolution_multiple
    if resolution % multiple:
        raise UserError(f"--resolution {resolution} is not a multiple of {multiple} (the VAE's factor "
                        f"{parts.vae_scale_factor} times the UNet's downsampling); try "
                        f"{max(multiple, resolution // multiple * multiple)}")
    return resolution


def prepare_for_training(parts: StableDiffusionParts, device, frozen_dtype, gradient_checkpointing=False,
                         xformers=False):
    """Freeze the VAE and text encoder in the compute dtype on the device; make the UNet trainable."""
    for frozen in (parts.vae, parts.text_encoder):
        frozen.requires_grad_(False).eval().to(device, dtype=frozen_dtype)
    parts.unet.train()
    if gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if xformers:
        parts.unet.enable_xformers_memory_efficient_attention()
    # otherwise diffusers already uses PyTorch SDPA (AttnProcessor2_0) by default


@torch.no_grad()
def encode_batch(parts: StableDiffusionParts, pixel_values, input_ids, generator):
    """Latents (scaled) and text embeddings for one batch, through the frozen models."""
    return encode_latents(parts, pixel_values, generator), encode_text(parts, input_ids)


@torch.no_grad()
def encode_latents(parts: StableDiffusionParts, pixel_values, generator):
    dtype = next(parts.vae.parameters()).dtype
    latents = parts.vae.encode(pixel_values.to(dtype)).latent_dist.sample(generator)
    return (latents * parts.vae.config.scaling_factor).float()


@torch.no_grad()
def encode_text(parts: StableDiffusionParts, input_ids):
    return parts.text_encoder(input_ids, return_dict=False)[0]
