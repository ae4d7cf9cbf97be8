"""LoRA fine-tuning through peft, and the files users load it from: diffusers, kohya (A1111/ComfyUI), merged.

Adapters go on the UNet (and with --train_text_encoder_lora on the text encoder) through the booster's own
``enable_lora`` (peft's ``get_peft_model``; plain DDP calls peft directly). Only the adapter weights train and
reach the optimizer; the frozen base stays in the compute dtype, the adapters in fp32 as diffusers'
``train_text_to_image_lora.py`` keeps them.
"""

import dataclasses
from pathlib import Path

import torch

from colossal_sd.errors import UserError, first_line

LORA_PLUGINS = ("torch_ddp", "torch_ddp_fp16", "low_level_zero", "none")
DEFAULT_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]  # as diffusers' dreambooth LoRA script
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
MERGED_DIR = "merged"
LORA_ONLY_FLAGS = {"train_text_encoder_lora": False, "merge_lora": False, "lora_export_format": "diffusers",
                   "lora_target_modules": None, "lora_alpha": None}


# -- flags
def check_lora_arguments(args):
    """Cross-flag checks for LoRA; fills in --lora_alpha and --lora_target_modules defaults."""
    if not args.use_lora:
        given = [flag for flag, default in LORA_ONLY_FLAGS.items() if getattr(args, flag) != default]
        if given:
            raise UserError(f"--{given[0]} only applies to LoRA training; add --use_lora")
        return
    if getattr(args, "save_single_file", False):
        raise UserError("--save_single_file writes a full fine-tune; a LoRA run's A1111/ComfyUI file comes from "
                        "--lora_export_format kohya")
    if getattr(args, "use_ema", False):
        raise UserError("--use_ema averages a full fine-tune's UNet; drop it with --use_lora")
    if args.plugin == "gemini":
        raise UserError("--use_lora does not work with --plugin gemini (Colossal-AI 0.5.0 has no Gemini LoRA, "
                        f"ColossalAI issue #4929); use --plugin {', '.join(LORA_PLUGINS[:-1])} or none")
    if args.rank < 1:
        raise UserError("--rank must be at least 1")
    if not 0 <= args.lora_dropout < 1:
        raise UserError("--lora_dropout must be in [0, 1)")
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else float(args.rank)
    if args.lora_alpha <= 0:
        raise UserError("--lora_alpha must be positive")
    args.lora_target_modules = args.lora_target_modules or DEFAULT_TARGET_MODULES


def lora_config(args, target_modules):
    from peft import LoraConfig
    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      init_lora_weights="gaussian", target_modules=target_modules)


# -- training
class TextConditionedUNet(torch.nn.Module):
    """The text encoders and the UNet as one model for the booster, so the text encoders' adapters get gradients
    and are synchronised with the UNet's. Called like the UNet, with token ids (and SDXL's time ids) in place of
    the conditioning; its sub-modules keep the pipeline's component names ("unet", "text_encoder", ...)."""

    def __init__(self, parts):
        super().__init__()
        self.unet = parts.unet
        self.encoder_names = list(parts.text_encoders)
        for name, encoder in parts.text_encoders.items():
            self.add_module(name, encoder)
        self.family, self.empty_ids = parts.family, parts.empty_ids

    def forward(self, sample, timestep, input_ids, time_ids=None, return_dict=False):
        encoders = {name: getattr(self, name) for name in self.encoder_names}
        text = self.family.encode_prompt(encoders, input_ids, self.empty_ids)
        return self.unet(sample, timestep, **self.family.conditioning(text, time_ids), return_dict=return_dict)


def add_lora(engine, parts, args) -> torch.nn.Module:
    """Freeze the model in the compute dtype and attach fp32 LoRA adapters; returns the model to boost.

    With --train_text_encoder_lora that model is a :class:`TextConditionedUNet` and the loop feeds it token ids.
    """
    from diffusers.training_utils import cast_training_params
    from peft import get_peft_model

    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    unet = parts.unet
    if args.train_text_encoder_lora:
        unet = TextConditionedUNet(parts).train()
        targets += TEXT_ENCODER_TARGET_MODULES  # CLIP's names, which no UNet module shares
    unet.requires_grad_(False).to(engine.dist.device, dtype=engine.compute_dtype)
    config = lora_config(args, targets)
    try:
        model = (engine.booster.enable_lora(unet, lora_config=config) if engine.booster is not None
                 else get_peft_model(unet, config))
    except ValueError as e:  # peft: no module matches the targets
        raise UserError(f"--lora_target_modules {args.lora_target_modules}: {first_line(e)}") from None
    cast_training_params(model, torch.float32)  # fp32 adapters: GradScaler refuses fp16 gradients
    if args.train_text_encoder_lora:
        freeze_unused_adapters(model, parts.family.unused_text_layers(parts.text_encoders))
    return model


def freeze_unused_adapters(model, unused_layers: list):
    """Adapters in text-encoder layers whose output the conditioning never uses would get no gradient, which DDP
    refuses. They stay in the model, frozen at their zero start, because diffusers' loader expects an adapter in
    every layer of a text encoder."""
    for name, parameter in model.named_parameters():
        if "lora_" in name and any(f"{layer}." in name for layer in unused_layers):
            parameter.requires_grad_(False)


def describe(model, args) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    where = "the UNet" + (" and text encoders" if args.train_text_encoder_lora else "")
    return (f"LoRA rank={args.rank} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on "
            f"{args.lora_target_modules}: {trainable:,} trainable parameters "
            f"({100 * trainable / frozen:.2f}% of {where}'s {frozen:,})")


# -- outputs
def lora_state_dict(model) -> dict:
    """peft-format adapter weights, keys under "unet." / "text_encoder.", the alpha/rank scale folded into lora_B.

    diffusers 0.29's loader assumes alpha == rank for its own format, so folding keeps any --lora_alpha exact
    in every loader.
    """
    from peft import get_peft_model_state_dict

    model = adapted_module(model)
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = get_peft_model_state_dict(model)
    prefix = "" if isinstance(model, TextConditionedUNet) else "unet."
    return {prefix + k: (v * scale if ".lora_B." in k else v).detach().to("cpu", torch.float32).contiguous()
            for k, v in state.items()}


def adapted_module(model) -> torch.nn.Module:
    """The module holding the adapters, from a peft model or Colossal-AI's PeftUnwrapMixin.

    torch_ddp_fp16 nests its AMP wrapper around the DDP one, and in 0.5.0 the outer ``unwrap(unwrap_peft=False)``
    calls the inner one without the flag, so the booster hands back a PeftUnwrapMixin there.
    """
    from colossalai.interface.model import PeftUnwrapMixin
    from peft import PeftModel

    if isinstance(model, PeftUnwrapMixin):
        return model.base_model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _component(state: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")} or None


def save_lora_weights(directory, unet, family, unet_config, export_format: str = "diffusers"):
    """Write the inference-ready LoRA file(s) of the trained `unet` into `directory`. Global rank 0 only.

    `unet` is the model as boosted (``engine.unwrap`` of it, or the peft model), text encoder adapters included.
    Writes ``pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights``) and, for export_format
    "kohya", ``pytorch_lora_weights_kohya.safetensors`` (A1111 / ComfyUI: ``lora_unet_*`` and ``lora_te*_*``
    keys with ``.alpha``, named as the family's kohya files are).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = convert_state_dict_to_diffusers(lora_state_dict(unet))
    layers = {f"{name}_lora_layers": _component(state, name) for name in family.lora_prefixes}
    family.pipeline().save_lora_weights(directory, **layers, weight_name=WEIGHT_NAME, safe_serialization=True)
    if export_format == "kohya":
        kohya = convert_state_dict_to_kohya(family.kohya_module_names(lora_state_dict(unet), unet_config))
        kohya = family.kohya_prefixes(kohya)
        save_file(kohya, str(Path(directory) / KOHYA_WEIGHT_NAME), metadata={"format": "pt"})


def save_merged_pipeline(directory, parts, args):
    """Base pipeline + the LoRA file already in args.output_dir, fused into plain weights and saved whole."""
    from colossal_sd.saving import open_base_pipeline, save_pipeline

    pipeline = open_base_pipeline(parts, args)
    pipeline.load_lora_weights(args.output_dir, weight_name=WEIGHT_NAME)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    fused = dataclasses.replace(parts, unet=pipeline.unet, vae=pipeline.vae,
                                text_encoders={name: getattr(pipeline, name) for name in parts.family.text_encoder_classes})
    save_pipeline(directory, fused, pipeline.unet.state_dict(), args)


def save_lora_outputs(unet, parts, args, run: dict):
    """Everything a LoRA run leaves in args.output_dir. Global rank 0 only."""
    output = Path(args.output_dir)
    save_lora_weights(output, unet, parts.family, parts.unet.config, args.lora_export_format)
    if args.merge_lora:
        save_merged_pipeline(output / MERGED_DIR, parts, args)
    write_model_card(output, args, parts.source, run, parts.family.pipeline_class)


def write_model_card(directory: Path, args, source: str, run: dict, pipeline_class: str):
    """README.md for the hub and for people: base, data, settings, files, how to load."""
    from huggingface_hub import ModelCard, ModelCardData

    data = (args.dataset_name or args.train_data_dir or getattr(args, "dataset_config", None)
            or getattr(args, "instance_data_dir", None))
    files = [WEIGHT_NAME] + ([KOHYA_WEIGHT_NAME] if args.lora_export_format == "kohya" else [])
    files += [f"{MERGED_DIR}/ (the base with the LoRA fused in)"] if args.merge_lora else []
    settings = {"rank": args.rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                "target modules": args.lora_target_modules, "text encoder LoRA": args.train_text_encoder_lora,
                **run, "batch size per process": args.train_batch_size,
                "gradient accumulation": args.gradient_accumulation_steps, "learning rate": args.learning_rate,
                "lr scheduler": args.lr_scheduler}
    card_data = ModelCardData(base_model=args.pretrained_model_name_or_path, library_name="diffusers",
                              tags=["stable-diffusion", "text-to-image", "diffusers", "lora", "colossalai"])
    body = "\n".join([
        f"# LoRA for {args.pretrained_model_name_or_path}", "",
        f"LoRA adapters on the UNet of `{args.pretrained_model_name_or_path}`, fine-tuned on `{data}` "
        "with Colossal-AI.", "",
        "## Settings", "", *[f"- {name}: {value}" for name, value in settings.items()], "",
        "## Files", "", *[f"- `{name}`" for name in files], "",
        "## Use", "", "```python", f"from diffusers import {pipeline_class}",
        f'pipe = {pipeline_class}.from_pretrained("{source}")',
        f'pipe.load_lora_weights("{args.output_dir}")', "```", ""])
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").save(directory / "README.md")
