"""Single-file checkpoints: Stable Diffusion in the original (LDM) key layout that AUTOMATIC1111 and ComfyUI load.

One ``.safetensors`` holds the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and
the CLIP text encoder under ``cond_stage_model.transformer.``. The key mapping is derived here from each model's
diffusers config (block counts, layers per block, where the attention blocks sit), so it serves any SD 1.x-shaped
model, the embedded tiny one included. It maps module prefixes both ways: diffusers -> LDM to export a trained
pipeline, LDM -> diffusers to train from a single file.

A ``.ckpt`` is a pickle, and unpickling can run arbitrary code: it is read with ``torch.load(weights_only=True)``,
and a file that needs more is refused unless the user passes ``--allow_unsafe_pickle``. diffusers never reads
the user's file here (it would call ``torch.load`` itself): we read it, map it and load the tensors.
"""

import os
import pickle
import tempfile
from pathlib import Path

from colossal_sd.errors import UserError, first_line

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Inside a residual block, diffusers' sub-module names -> the LDM ones.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: linear layers in diffusers, 1x1 convolutions in LDM.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_CONV_1X1 = tuple(f".mid.attn_1.{name}.weight" for name in ("q", "k", "v", "proj_out"))


def is_single_file(name_or_path) -> bool:
    return isinstance(name_or_path, str) and name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)


# ---------------------------------------------------------------- the layout, from the configs


def _add(modules: dict, diffusers: str, ldm: str, renames: dict):
    modules.update({f"{diffusers}.{d}": f"{ldm}.{l}" for d, l in renames.items()})


def unet_modules(config) -> dict:
    """diffusers module path -> LDM module path, for a UNet2DConditionModel config."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    if config.get("mid_block_type") not in (None, "UNetMidBlock2DCrossAttn"):
        raise UserError(f"single-file layout: UNet mid block '{config['mid_block_type']}' is not SD 1.x-shaped")
    modules = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
               "mid_block.attentions.0": "middle_block.1"}
    _add(modules, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    _add(modules, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    index = 1  # LDM numbers the input blocks in one run: conv_in, then each layer, then each downsampler
    for block, kind in enumerate(config["down_block_types"]):
        for layer in range(layers[block]):
            _add(modules, f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET)
            if "CrossAttn" in kind:
                modules[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if block < levels - 1:
            modules[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for block, kind in enumerate(config["up_block_types"]):
        attention = "CrossAttn" in kind
        for layer in range(layers[levels - 1 - block] + 1):
            _add(modules, f"up_blocks.{block}.resnets.{layer}", f"output_blocks.{index}.0", UNET_RESNET)
            if attention:
                modules[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{index}.1"
            index += 1
        if block < levels - 1:  # LDM appends the upsampler to the block's last layer
            modules[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{1 + attention}.conv"
    return modules


def vae_modules(config) -> dict:
    """diffusers module path -> LDM module path, for an AutoencoderKL config."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    modules = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                        f"{part}.conv_norm_out": f"{part}.norm_out"})
        _add(modules, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        _add(modules, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
        _add(modules, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
    for block in range(levels):
        level = levels - 1 - block  # the decoder's up blocks run from the deepest level in LDM's numbering
        for layer in range(layers):
            _add(modules, f"encoder.down_blocks.{block}.resnets.{layer}", f"encoder.down.{block}.block.{layer}",
                 VAE_RESNET)
        for layer in range(layers + 1):
            _add(modules, f"decoder.up_blocks.{block}.resnets.{layer}", f"decoder.up.{level}.block.{layer}",
                 VAE_RESNET)
        if block < levels - 1:
            modules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = f"encoder.down.{block}.downsample.conv"
            modules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return modules


TEXT_ENCODER_MODULES = {"text_model": "text_model"}  # transformers' CLIPTextModel, as LDM's FrozenCLIPEmbedder holds it


def ldm_key(key: str, name: str, prefix: str, modules: dict) -> str:
    """The LDM name of a diffusers weight: rename the longest module path of `key` that `modules` knows."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return prefix + ".".join([modules[module], *parts[cut:]])
    raise UserError(f"{name} weight '{key}' has no place in the original Stable Diffusion layout "
                    "(single files support SD 1.x-shaped models)")


# ---------------------------------------------------------------- diffusers -> one file


def _components(unet_config, vae_config):
    """(name, LDM prefix, diffusers -> LDM module map) of the three models."""
    return (("unet", UNET_PREFIX, unet_modules(unet_config)), ("vae", VAE_PREFIX, vae_modules(vae_config)),
            ("text_encoder", TEXT_ENCODER_PREFIX, TEXT_ENCODER_MODULES))


def to_ldm(state_dicts: dict, unet_config, vae_config) -> dict:
    """{"unet": sd, "vae": sd, "text_encoder": sd} in diffusers naming -> one LDM-layout state dict."""
    ldm = {}
    for name, prefix, modules in _components(unet_config, vae_config):
        for key, tensor in state_dicts[name].items():
            target = ldm_key(key, name, prefix, modules)
            ldm[target] = tensor.reshape(*tensor.shape, 1, 1) if target.endswith(VAE_CONV_1X1) else tensor
    return ldm


def _read_pipeline_folder(folder: Path):
    import json

    from safetensors.torch import load_file

    def load(name, weights):
        return load_file(folder / name / weights)

    configs = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae")}
    state_dicts = {"unet": load("unet", "diffusion_pytorch_model.safetensors"),
                   "vae": load("vae", "diffusion_pytorch_model.safetensors"),
                   "text_encoder": load("text_encoder", "model.safetensors")}
    return state_dicts, configs["unet"], configs["vae"]


def single_file_path(output_dir) -> Path:
    """`out/my-model/my-model.safetensors`: named after the run, so it keeps its name in a UI's model folder."""
    output_dir = Path(output_dir).resolve()
    return output_dir / f"{output_dir.name}.safetensors"


def save_single_file(pipeline_folder, target=None) -> Path:
    """Write the saved pipeline's three models, as saved (same tensors, same dtype), into one LDM-layout file."""
    from safetensors.torch import save_file

    target = Path(target or single_file_path(pipeline_folder))
    ldm = to_ldm(*_read_pipeline_folder(Path(pipeline_folder)))
    # Same idea as saving.atomic_directory: a kill mid-write leaves a hidden temp file, never a torn checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=target.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in ldm.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# ---------------------------------------------------------------- one file -> diffusers models


def read_checkpoint(path, allow_unsafe_pickle=False) -> dict:
    """The file's tensors. A pickle is read with weights_only=True unless the user trusts it explicitly."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise UserError(f"cannot read '{path}' as safetensors: {first_line(e)}") from None
    import torch
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError:
        raise UserError(f"'{path}' is a pickle that holds more than tensors, and unpickling it could run code; "
                        "convert it to .safetensors, or pass --allow_unsafe_pickle if you trust its source") from None
    except Exception as e:
        raise UserError(f"cannot read '{path}' as a checkpoint: {first_line(e)}") from None
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # Lightning wraps the weights
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise UserError(f"'{path}' holds no state dict (it unpickles to {type(checkpoint).__name__})")
    return checkpoint


def from_ldm(model, checkpoint: dict, prefix: str, modules: dict, name: str, path):
    """Fill `model` (built from its diffusers config) with its weights from an LDM-layout state dict."""
    state = {}
    for key, expected in model.state_dict().items():
        source = ldm_key(key, name, prefix, modules)
        if source not in checkpoint:
            raise UserError(f"'{path}' has no {name} weight '{source}': it is not a Stable Diffusion single file "
                            "of the architecture its config describes (see --single_file_config)")
        tensor = checkpoint[source]
        if tensor.numel() != expected.numel():
            raise UserError(f"'{path}': {name} weight '{source}' has shape {tuple(tensor.shape)}, its config "
                            f"expects {tuple(expected.shape)}; pass the matching --single_file_config")
        state[key] = tensor.reshape(expected.shape).to(expected.dtype)  # undoes the VAE attention's 1x1 convs
    model.load_state_dict(state, assign=True)
    return model


def build_models(checkpoint: dict, source: str, path, common: dict):
    """Text encoder, VAE and UNet: architecture from the diffusers config at `source`, weights from the file."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Empty weights: no time spent on a random init the file overwrites, and no draw from the seeded RNG, so a
    # run from the single file matches a run from the same weights in a diffusers directory.
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet", **common))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(source, subfolder="vae", **common))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **common))
    for model, (name, prefix, modules) in zip((unet, vae, text_encoder), _components(unet.config, vae.config)):
        from_ldm(model, checkpoint, prefix, modules, name, path)
    return text_encoder, vae, unet


def config_source(args, checkpoint: dict) -> str:
    """The diffusers pipeline whose configs, tokenizer and scheduler go with the single file.

    --single_file_config when given; otherwise the pipeline diffusers associates with the file's keys (SD 1.5 for
    an SD 1.x file), from the local cache only: we never download on a guess.
    """
    from colossal_sd.models import resolve_model_source

    if args.single_file_config:
        return resolve_model_source(args.single_file_config)
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    guess = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        UNet2DConditionModel.load_config(guess, subfolder="unet", cache_dir=args.cache_dir, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"no diffusers config for '{args.pretrained_model_name_or_path}' (it looks like {guess}, "
                        "which is not in the local cache); pass --single_file_config with a diffusers pipeline "
                        f"directory or hub id of the same architecture, e.g. --single_file_config {guess}") from None
    return guess


def open_base_model(args):
    """(LDM state dict, diffusers config source) of a single-file --pretrained_model_name_or_path."""
    checkpoint = read_checkpoint(args.pretrained_model_name_or_path, args.allow_unsafe_pickle)
    return checkpoint, config_source(args, checkpoint)
