"""Loading Stable Diffusion's parts (a trainable UNet, a frozen VAE and text encoders, the noise scheduler) and\nturning a batch into what the UNet takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from colossal_sd import embedded, families, noise_schedule, single_file
from colossal_sd.data import tokenize
from colossal_sd.families import Family
from colossal_sd.errors import UserError
from colossal_sd.hub import load_failure


@dataclass
class StableDiffusionParts:
    source: str  # local directory or hub id the parts came from
    family: Family  # what differs between SD generations (colossal_sd.families)
    tokenizers: Dict[str, object]  # component name ("tokenizer", "tokenizer_2") -> tokenizer
    text_encoders: Optional[Dict[str, torch.nn.Module]]  # component name -> encoder; None once cached and freed
    vae: Optional[torch.nn.Module]  # None once latents are cached and it is freed
    unet: torch.nn.Module
    noise_scheduler: object
    single_file: Optional[str] = None  # the single-file checkpoint the weights came from, if any
    vae_source: Optional[str] = None  # --pretrained_vae_model_name_or_path, when the VAE is not the source's

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    def __post_init__(self):
        self._vae_config = self.vae.config  # kept: the VAE itself may be freed once latents are cached

    @property
    def vae_config(self):
        return self._vae_config

    @property
    def native_resolution(self) -> int:
        return self.family.default_resolution(self.unet.config, self.vae_scale_factor)

    @property
    def resolution_multiple(self) -> int:
        """Pixels per latent cell, times the UNet's downsampling: every resolution must divide by this."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def caption_tokenizer(self):
        """What colossal_sd.data tokenizes captions with: the tokenizer, or a tuple of them (one row each)."""
        tokenizers = tuple(self.tokenizers[name] for name, _ in self.family.text_components)
        return tokenizers[0] if len(tokenizers) == 1 else tokenizers

    @property
    def empty_ids(self) -> torch.Tensor:
        """The empty caption's token ids: what caption dropout puts in a caption's place."""
        if getattr(self, "_empty_ids", None) is None:
            self._empty_ids = tokenize(self.caption_tokenizer, "")
        return self._empty_ids

    def encode_prompt(self, input_ids) -> dict:
        return self.family.encode_prompt(self.text_encoders, input_ids, self.empty_ids)

    def frozen(self) -> Dict[str, torch.nn.Module]:
        """The frozen parts still loaded, by pipeline component name."""
        return {**({"vae": self.vae} if self.vae is not None else {}), **(self.text_encoders or {})}

    def components(self) -> dict:
        """The loaded pipeline components by name (tokenizers included), for building or saving a pipeline."""
        return {**self.frozen(), **self.tokenizers, "unet": self.unet}


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
    from diffusers import DDPMScheduler
    from safetensors import SafetensorError

    if single_file.is_single_file(args.pretrained_model_name_or_path):
        base = single_file.open_base_model(args)
        source, prediction_type = base.source, base.prediction_type
    else:
        base, source = None, resolve_model_source(args.pretrained_model_name_or_path)
        prediction_type = args.prediction_type
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    vae_source = getattr(args, "pretrained_vae_model_name_or_path", None)
    try:
        family = (families.of_folder(source) if base is None else
                  families.for_pipeline_class(base.layout.pipeline_class, _index(source)))
        tokenizers = load_tokenizers(family, source, common)
        if base is not None:
            models = single_file.build_models(base, common)
            text_encoders = {name: models[name] for _, name in family.text_components}
            vae, unet = models["vae"], models["unet"]
        else:
            text_encoders = load_text_encoders(family, source, dict(common, variant=args.variant))
            vae = None if vae_source else load_vae(source, "vae", dict(common, variant=args.variant))
            unet = _load_unet(source, dict(common, variant=args.variant))
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError, SafetensorError) as e:  # a local source's message names the broken file
        raise UserError(load_failure("model", args.pretrained_model_name_or_path, e,
                                     "local diffusers pipeline directory", source)) from None
    if vae_source:
        vae = load_vae_override(vae_source, common)
    noise_scheduler = noise_schedule.training_scheduler(noise_scheduler, prediction_type,
                                                        getattr(args, "rescale_betas_zero_snr", False))
    return StableDiffusionParts(source, family, tokenizers, text_encoders, vae, unet, noise_scheduler,
                                single_file=args.pretrained_model_name_or_path if base is not None else None,
                                vae_source=vae_source)


def _index(source: str) -> dict:
    """A single file's config pipeline's model_index.json (its settings, e.g. force_zeros_for_empty_prompt)."""
    from diffusers import DiffusionPipeline
    try:
        return dict(DiffusionPipeline.load_config(source))
    except (OSError, ValueError):
        return {}


def load_tokenizers(family: Family, source: str, common: dict) -> dict:
    from transformers import CLIPTokenizer
    return {name: CLIPTokenizer.from_pretrained(source, subfolder=name, **common) for name, _ in family.text_components}


def load_text_encoders(family: Family, source: str, common: dict) -> dict:
    import transformers
    return {name: getattr(transformers, family.text_encoder_classes[name]).from_pretrained(source, subfolder=name,
                                                                                          **common)
            for _, name in family.text_components}


def load_vae(source: str, subfolder: Optional[str], common: dict):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(source, subfolder=subfolder, **common)


def load_vae_override(vae_source: str, common: dict):
    """--pretrained_vae_model_name_or_path: a VAE folder (config.json + weights) or a pipeline folder's vae/."""
    path = Path(vae_source).expanduser()
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if not path.exists() and (vae_source.startswith((".", "/", "~")) or vae_source.count("/") > 1):
        raise UserError(f"--pretrained_vae_model_name_or_path '{vae_source}' does not exist")
    try:
        return load_vae(vae_source, subfolder, common)
    except (OSError, ValueError) as e:
        raise UserError(load_failure("VAE", vae_source, e, "local VAE folder (config.json and weights)",
                                     vae_source)) from None


def _load_unet(source: str, common: dict):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common)


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
    """Freeze the VAE and text encoders in the compute dtype on the device; make the UNet trainable."""
    place_frozen(parts, device, frozen_dtype)
    for frozen in parts.frozen().values():
        frozen.requires_grad_(False).eval()
    parts.unet.train()
    if gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if xformers:
        parts.unet.enable_xformers_memory_efficient_attention()
    # otherwise diffusers already uses PyTorch SDPA (AttnProcessor2_0) by default


def place_frozen(parts: StableDiffusionParts, device, compute_dtype):
    """The frozen parts on `device` in the compute dtype; the VAE in the dtype its family encodes in."""
    for name, module in parts.frozen().items():
        dtype = parts.family.vae_dtype(module, compute_dtype) if name == "vae" else compute_dtype
        module.to(device, dtype=dtype)


@torch.no_grad()
def encode_latents(parts: StableDiffusionParts, pixel_values, generator):
    dtype = next(parts.vae.parameters()).dtype
    latents = parts.vae.encode(pixel_values.to(dtype)).latent_dist.sample(generator)
    return (latents * parts.vae.config.scaling_factor).float()


class BatchEncoder:
    """A batch as the model takes it: (latents, conditioning keyword arguments).

    Latents are sampled from the cached VAE distribution where cached, encoded otherwise; text embeddings
    likewise. With text-encoder LoRA the model encodes the token ids itself, through its adapters."""

    def __init__(self, parts: StableDiffusionParts, compute_dtype, text_encoder_lora: bool = False):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        self.parts, self.compute_dtype, self.text_encoder_lora = parts, compute_dtype, text_encoder_lora
        self.scaling_factor = parts.vae_config.scaling_factor
        self.distribution = DiagonalGaussianDistribution

    def __call__(self, batch, device, generator):
        if "latent_dist" in batch:
            params = batch["latent_dist"].to(device, non_blocking=True)
            latents = self.distribution(params).sample(generator) * self.scaling_factor
        else:
            latents = encode_latents(self.parts, batch["pixel_values"].to(device, non_blocking=True), generator)
        time_ids = batch.get("time_ids")
        if self.text_encoder_lora:
            return latents.float(), {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                                     "time_ids": time_ids}
        if CACHED_TEXT["encoder_hidden_states"] in batch:
            text = {name: batch[CACHED_TEXT[name]].to(device, self.compute_dtype, non_blocking=True)
                    for name in self.parts.family.text_outputs}
        else:
            with torch.no_grad():
                text = self.parts.encode_prompt(batch["input_ids"].to(device, non_blocking=True))
        return latents.float(), self.parts.family.conditioning(text, time_ids)


# A cached sample's key for each of encode_prompt's outputs (colossal_sd.caching)
CACHED_TEXT = {"encoder_hidden_states": "text_embeddings", "text_embeds": "pooled_text_embeddings"}
