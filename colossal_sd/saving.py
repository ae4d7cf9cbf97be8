"""Writing the trained pipeline: a diffusers directory in safetensors, put in place atomically."""

import os
import shutil
import tempfile
from pathlib import Path

from colossal_sd import noise_schedule

PIPELINE_FILES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "scheduler", "safety_checker", "feature_extractor")


def atomic_directory(target: Path, write):
    """Let `write(tmp)` fill a temp dir beside `target`, then move its entries into `target`.

    A kill mid-write leaves only a hidden temp dir, never a half-written pipeline; what else the output
    directory holds (logs, checkpoints) is left alone.
    """
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target))
    try:
        write(tmp)
        for entry in tmp.iterdir():
            final = target / entry.name
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(entry, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_base_pipeline(parts, args, **components):
    """The family's pipeline loaded from the base model's source, with `components` in place of the source's."""
    models = ("unet", "vae", *parts.family.text_encoder_classes)
    if parts.single_file and not all(name in components for name in models):
        # the source holds configs only: the base's missing weights come from the file again
        from colossal_sd.models import load_parts
        base = load_parts(args).components()
        components.update({name: base[name] for name in models if name not in components})
    if parts.vae_source and "vae" not in components:  # the VAE trained with, not the source's
        from colossal_sd.models import load_vae_override
        components["vae"] = load_vae_override(parts.vae_source, dict(revision=args.revision, cache_dir=args.cache_dir))
    components = {**parts.tokenizers, **components}
    return parts.family.pipeline().from_pretrained(
        parts.source, **components, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
        **parts.family.loading_kwargs(bool(parts.single_file)))


def save_pipeline(output_dir, parts, unet_state_dict, args):
    """Rebuild the UNet from the gathered weights and save the whole pipeline as diffusers would load it."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(parts.unet.config)
    unet.load_state_dict(unet_state_dict)
    # A part freed once its outputs were cached is missing here: from_pretrained reloads it from the source.
    frozen = {name: module.float().cpu() for name, module in parts.frozen().items()}
    pipeline = open_base_pipeline(parts, args, unet=unet, **frozen)
    # what the run trained: --prediction_type or a single file's metadata, --rescale_betas_zero_snr
    pipeline.scheduler = noise_schedule.sampler(pipeline.scheduler, parts.noise_scheduler.config.prediction_type,
                                                getattr(args, "rescale_betas_zero_snr", False))
    atomic_directory(Path(output_dir), lambda tmp: pipeline.save_pretrained(tmp, safe_serialization=True))
