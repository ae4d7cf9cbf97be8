"""Model families: what differs between Stable Diffusion generations, one module each.

Like torchtitan's per-model "train spec", a family owns everything that is not the same across SD 1.x/2.x
(:mod:`.sd`) and SDXL (:mod:`.sdxl`): which text encoders and tokenizers a pipeline has, how a caption becomes
the UNet's conditioning, the pipeline class used for validation, saving and sampling, and its LoRA file names.
The loop, caching, checkpoints, EMA, LoRA and validation call a family's methods and never ask which it is.

A family is recognised from the pipeline itself, by model_index.json's class name: no flag says which.
"""

import json
from pathlib import Path

from colossal_sd.families.base import Family
from colossal_sd.families.sd import StableDiffusion
from colossal_sd.families.sdxl import StableDiffusionXL

FAMILIES = {family.pipeline_class: family for family in (StableDiffusion, StableDiffusionXL)}

__all__ = ["FAMILIES", "Family", "for_index", "for_pipeline_class", "of_folder"]


def for_pipeline_class(name: str, index: dict = None) -> Family:
    """The family of a model_index.json `_class_name`; None when no family knows it."""
    family = FAMILIES.get(name)
    return family(index or {}) if family is not None else None


def for_index(index: dict) -> Family:
    """The family of a model_index.json's contents; a folder without one (parts only) is SD 1.x/2.x-shaped
    unless it has a second text encoder."""
    family = for_pipeline_class(index.get("_class_name"), index)
    if family is not None:
        return family
    return (StableDiffusionXL if "text_encoder_2" in index else StableDiffusion)(index)


def of_folder(source) -> Family:
    """The family of a local pipeline folder or hub id (its model_index.json, read by diffusers)."""
    path = Path(source) / "model_index.json"
    if path.is_file():
        return for_index(json.loads(path.read_text()))
    from diffusers import DiffusionPipeline
    try:
        return for_index(dict(DiffusionPipeline.load_config(source)))
    except (OSError, ValueError):  # no model_index.json: a folder of parts (unet/, vae/, ...)
        has_second = (Path(source) / "text_encoder_2").is_dir()
        return (StableDiffusionXL if has_second else StableDiffusion)({})
