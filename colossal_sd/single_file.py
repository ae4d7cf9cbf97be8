"""Single-file checkpoints: Stable Diffusion 1.x, 2.x and SDXL in the original layout that AUTOMATIC1111 and
ComfyUI load, written after a fine-tune and read as a base model.

One ``.safetensors`` holds every model of the pipeline under its original prefix (a :class:`Layout` per
generation, in :data:`LAYOUTS`): the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``,
and the text encoders where LDM/SGM keep them (CLIP under ``cond_stage_model.transformer.`` for SD 1.x, OpenCLIP
under ``cond_stage_model.model.`` for SD 2.x, both under ``conditioner.embedders.{0,1}.`` for SDXL). Each part's
name map is derived here from the model's diffusers config (block counts, layers per block, where the attention
blocks sit, text encoder depth), so it serves fine-tunes of any size, the embedded tiny models included, and the
same map serves writing and reading (colossal_sd.single_file_places).

The weights do not say what the model predicts, so the file's metadata does: kohya's ``modelspec.*`` keys
(Stability AI's model spec), with the architecture, ``prediction_type`` (``epsilon`` or ``v``), resolution and
title. Reading a file takes its prediction type from there, else --prediction_type, else the config's scheduler.

A ``.ckpt`` is a pickle, and unpickling can run arbitrary code: it is read with ``torch.load(weights_only=True)``,
and a file that needs more is refused unless the user passes ``--allow_unsafe_pickle``. diffusers never reads
the user's file here (it would call ``torch.load`` itself): we read it, map it and load the tensors.
"""

import datetime
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from colossal_sd.errors import UserError, first_line
from colossal_sd.single_file_openclip import openclip_names, sd2_filler
from colossal_sd.single_file_places import Place, from_original, to_original

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Inside a residual block, diffusers' sub-module names -> the LDM ones.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: linear layers in diffusers, 1x1 convolutions in LDM.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def is_single_file(name_or_path) -> bool:
    return isinstance(name_or_path, str) and name_or_path.lower().endswith(SINGLE_FILE_SUFFIXES)


# ---------------------------------------------------------------- the name maps, from the configs


def _add(modules: dict, diffusers: str, ldm: str, renames: dict):
    modules.update({f"{diffusers}.{d}": f"{ldm}.{l}" for d, l in renames.items()})


def unet_names(config) -> dict:
    """diffusers module path -> LDM/SGM module path, for a UNet2DConditionModel config (SD 1.x, 2.x, SDXL)."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    if config.get("mid_block_type") not in (None, "UNetMidBlock2DCrossAttn"):
        raise UserError(f"single-file layout: UNet mid block '{config['mid_block_type']}' is not SD-shaped")
    modules = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
               "mid_block.attentions.0": "middle_block.1"}
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text + size/crop embedding
        modules.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    _add(modules, "mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    _add(modules, "mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    index = 1  # LDM numbers the input blocks in one run: conv_in, then each layer, then each downsampler
    for block, kind in enumerate(config["down_block_types"]):
        for layer in range(layers[block]):
            _add(modules, f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET)
            if "CrossAttn" in kind:  # its transformer_blocks.N (SDXL: several per block) keep their names
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


def vae_names(config) -> dict:
    """diffusers module path -> LDM module path, for an AutoencoderKL config."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    modules = {name: name for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                        f"{part}.conv_norm_out": f"{part}.norm_out"})
        _add(modules, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        _add(modules, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
        for ours, theirs in VAE_ATTENTION.items():
            if ours != "group_norm":
                modules[f"{part}.mid_block.attentions.0.{ours}.weight"] = Place(f"{part}.mid.attn_1.{theirs}.weight",
                                                                                conv1x1=True)
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


def clip_names(config) -> dict:
    return {"text_model": "text_model"}  # transformers' CLIPTextModel, as LDM's FrozenCLIPEmbedder holds it


# ---------------------------------------------------------------- the layouts


@dataclass(frozen=True)
class Part:
    """One model of the pipeline inside the file."""
    component: str  # the diffusers pipeline's component name
    prefix: str  # where its keys start in the file
    names: Callable[[dict], dict]  # its config -> its name map
    model_class: str  # "library.Class" that builds it from its config
    filler: Optional[Callable[[dict, dict], dict]] = None  # written-only extras UIs expect (never read back)


@dataclass(frozen=True)
class Layout:
    """One generation's single-file layout."""
    name: str  # "sd1", "sd2" or "sdxl"
    pipeline_class: str  # the diffusers pipeline it loads into
    parts: Tuple[Part, ...]
    architectures: Tuple[str, str]  # modelspec.architecture for (epsilon, v-prediction)

    @property
    def components(self) -> Tuple[str, ...]:
        return tuple(part.component for part in self.parts)

    def to_original(self, state_dicts: dict, configs: dict) -> dict:
        """{component: diffusers state dict} -> one original-layout state dict (same tensors, same dtypes)."""
        original = {}
        for part in self.parts:
            config = configs[part.component]
            tensors = to_original(state_dicts[part.component], part.names(config), part.component)
            if part.filler is not None:
                tensors.update(part.filler(tensors, config))
            original.update({part.prefix + key: tensor for key, tensor in tensors.items()})
        return original

    def from_original(self, checkpoint: dict, expected: dict, configs: dict, path="the file") -> dict:
        """{component: diffusers state dict} for the keys and shapes of `expected` ({component: state dict})."""
        return {part.component: from_original(checkpoint, part.prefix, expected[part.component],
                                              part.names(configs[part.component]), part.component, path)
                for part in self.parts}

    def architecture(self, prediction_type: str) -> str:
        return self.architectures[prediction_type == "v_prediction"]


UNET = Part("unet", "model.diffusion_model.", unet_names, "diffusers.UNet2DConditionModel")
VAE = Part("vae", "first_stage_model.", vae_names, "diffusers.AutoencoderKL")
LAYOUTS = {layout.name: layout for layout in (
    Layout("sd1", "StableDiffusionPipeline",
           (UNET, VAE, Part("text_encoder", "cond_stage_model.transformer.", clip_names,
                            "transformers.CLIPTextModel")),
           ("stable-diffusion-v1", "stable-diffusion-v1")),
    Layout("sd2", "StableDiffusionPipeline",
           (UNET, VAE, Part("text_encoder", "cond_stage_model.model.", openclip_names, "transformers.CLIPTextModel",
                            sd2_filler)),
           ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v")),
    Layout("sdxl", "StableDiffusionXLPipeline",
           (UNET, VAE, Part("text_encoder", "conditioner.embedders.0.transformer.", clip_names,
                            "transformers.CLIPTextModel"),
            Part("text_encoder_2", "conditioner.embedders.1.model.", openclip_names,
                 "transformers.CLIPTextModelWithProjection")),
           ("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base")),
)}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def detect_family(keys) -> str:
    """"sd1", "sd2" or "sdxl", from where a file keeps its text encoders."""
    keys = list(keys)
    for family in ("sdxl", "sd2"):  # where their OpenCLIP text encoder sits
        prefix = LAYOUTS[family].parts[-1].prefix
        if any(key.startswith(prefix) for key in keys):
            return family
    return "sd1"


def layout_for(pipeline_class: str, text_encoder_config: dict) -> Layout:
    """The layout of a diffusers pipeline: SDXL by class; SD 2.x's OpenCLIP uses exact GELU, SD 1.x's CLIP
    OpenAI's quick GELU (the only config difference in the text encoder besides its size)."""
    if pipeline_class == LAYOUTS["sdxl"].pipeline_class:
        return LAYOUTS["sdxl"]
    return LAYOUTS["sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd1"]


# ---------------------------------------------------------------- metadata (kohya's modelspec)


PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers' names -> modelspec's
V_ARCHITECTURES = ("stable-diffusion-v2-768-v",)  # architectures that say v-prediction by themselves


def modelspec(layout: Layout, prediction_type: str, resolution: int, title: str) -> dict:
    """The safetensors metadata kohya's sd-scripts writes for a full checkpoint (Stability AI's model spec)."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": layout.architecture(prediction_type),
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": title, "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.prediction_type": PREDICTION_TYPES[prediction_type],
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(), "format": "pt"}


def read_metadata(path) -> dict:
    """A .safetensors file's metadata (a .ckpt has none)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(Path(path).expanduser()), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise UserError(f"cannot read '{path}' as safetensors: {first_line(e)}") from None


def metadata_prediction_type(metadata: dict) -> Optional[str]:
    """diffusers' prediction type the metadata states, or None."""
    stated = metadata.get("modelspec.prediction_type")
    for ours, theirs in PREDICTION_TYPES.items():
        if stated in (ours, theirs):
            return ours
    if metadata.get("modelspec.architecture") in V_ARCHITECTURES:
        return "v_prediction"
    return None


# ---------------------------------------------------------------- diffusers -> one file


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def _read_pipeline_folder(folder: Path):
    """(layout, {component: state dict}, {component: config}, scheduler config) of a saved pipeline."""
    from safetensors.torch import load_file

    def config(name):
        return json.loads((folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json"))
                          .read_text())

    index = json.loads((folder / "model_index.json").read_text())
    layout = layout_for(index.get("_class_name"), config("text_encoder"))
    configs = {name: config(name) for name in layout.components}
    state_dicts = {name: load_file(folder / name / WEIGHT_FILES[name]) for name in layout.components}
    return layout, state_dicts, configs, config("scheduler")


def single_file_path(output_dir) -> Path:
    """`out/my-model/my-model.safetensors`: named after the run, so it keeps its name in a UI's model folder."""
    output_dir = Path(output_dir).resolve()
    return output_dir / f"{output_dir.name}.safetensors"


def save_single_file(pipeline_folder, target=None) -> Path:
    """Write the saved pipeline's models, as saved (same tensors, same dtype), into one original-layout file
    whose metadata says its architecture, prediction type, resolution and title (the folder's name)."""
    from safetensors.torch import save_file

    folder = Path(pipeline_folder)
    target = Path(target or single_file_path(folder))
    layout, state_dicts, configs, scheduler = _read_pipeline_folder(folder)
    original = layout.to_original(state_dicts, configs)
    resolution = configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    metadata = modelspec(layout, scheduler.get("prediction_type", "epsilon"), resolution, folder.resolve().name)
    # Same idea as saving.atomic_directory: a kill mid-write leaves a hidden temp file, never a torn checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=target.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in original.items()}, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# ---------------------------------------------------------------- one file -> diffusers models


@dataclass
class BaseSingleFile:
    """A single-file --pretrained_model_name_or_path, read and recognised."""
    path: str
    checkpoint: dict  # its tensors, original names
    layout: Layout
    source: str  # the diffusers pipeline whose configs, tokenizers and scheduler go with it
    prediction_type: Optional[str]  # what the file's metadata or --prediction_type says; None: the config's


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


def _model_class(name: str):
    import importlib
    library, cls = name.split(".")
    return getattr(importlib.import_module(library), cls)


def build_models(base: BaseSingleFile, common: dict) -> dict:
    """{component: model} of the file's layout (text encoder(s), VAE, UNet): architecture from the diffusers
    configs at base.source, weights from the file."""
    from accelerate import init_empty_weights

    models = {}
    # Empty weights: no time spent on a random init the file overwrites, and no draw from the seeded RNG, so a
    # run from the single file matches a run from the same weights in a diffusers directory.
    with init_empty_weights():
        for part in base.layout.parts:
            cls = _model_class(part.model_class)
            if part.model_class.startswith("diffusers."):
                models[part.component] = cls.from_config(cls.load_config(base.source, subfolder=part.component,
                                                                         **common))
            else:
                models[part.component] = cls(cls.config_class.from_pretrained(base.source, subfolder=part.component,
                                                                              **common))
    configs = {name: _config_dict(model) for name, model in models.items()}
    expected = {name: model.state_dict() for name, model in models.items()}
    for name, state in base.layout.from_original(base.checkpoint, expected, configs, base.path).items():
        models[name].load_state_dict(state, assign=True)
    return models


def _config_dict(model) -> dict:
    config = model.config
    return dict(config) if isinstance(config, dict) else config.to_dict()


def _guess(layout: Layout) -> str:
    """The hub pipeline diffusers itself pairs with a file of this generation."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    model_type = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[layout.name]
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]


def config_source(args, layout: Layout) -> str:
    """The diffusers pipeline whose configs, tokenizer and scheduler go with the single file.

    --single_file_config when given; otherwise the pipeline diffusers associates with the file's generation
    (SD 1.5 for an SD 1.x file), from the local cache only: we never download on a guess.
    """
    from colossal_sd.models import resolve_model_source

    if args.single_file_config:
        source = resolve_model_source(args.single_file_config)
        _check_same_generation(args, layout, source)
        return source
    from diffusers import UNet2DConditionModel

    guess = _guess(layout)
    try:
        UNet2DConditionModel.load_config(guess, subfolder="unet", cache_dir=args.cache_dir, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"no diffusers config for '{args.pretrained_model_name_or_path}' (it looks like {guess}, "
                        "which is not in the local cache); pass --single_file_config with a diffusers pipeline "
                        f"directory or hub id of the same architecture, e.g. --single_file_config {guess}") from None
    return guess


def _check_same_generation(args, layout: Layout, source: str):
    from colossal_sd import families
    family = families.of_folder(source)
    if family.pipeline_class != layout.pipeline_class:
        raise UserError(f"'{args.pretrained_model_name_or_path}' is an {FAMILY_NAMES[layout.name]} single file, "
                        f"but --single_file_config '{args.single_file_config}' is a {family.name} pipeline; pass "
                        "the config of the file's own architecture")


def base_prediction_type(args, metadata: dict, layout: Layout) -> Optional[str]:
    """What the base model predicts: --prediction_type (what the run trains), else the file's metadata, else
    None (its config's scheduler says). An SD 2.x file that says nothing cannot be guessed: 512 px SD 2.x models
    predict epsilon, 768 px ones v, and the same weights trained for the wrong one sample noise."""
    stated = args.prediction_type or metadata_prediction_type(metadata)
    if stated is None and layout.name == "sd2" and not args.single_file_config:
        raise UserError(f"'{args.pretrained_model_name_or_path}' is an SD 2.x single file whose metadata does not "
                        "say what it predicts; pass --prediction_type v_prediction (768 px SD 2.x models) or "
                        "--prediction_type epsilon (512 px ones), or --single_file_config with its pipeline")
    return stated


def open_base_model(args) -> BaseSingleFile:
    """A single-file --pretrained_model_name_or_path: its tensors, layout, config source and prediction type."""
    path = args.pretrained_model_name_or_path
    checkpoint = read_checkpoint(path, args.allow_unsafe_pickle)
    layout = LAYOUTS[detect_family(checkpoint)]
    prediction_type = base_prediction_type(args, read_metadata(path), layout)
    return BaseSingleFile(path, checkpoint, layout, config_source(args, layout), prediction_type)
