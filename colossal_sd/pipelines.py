"""Opening a trained model for inference: a pipeline folder, a training checkpoint, a single file, plus LoRAs.

``--model`` may be
- a diffusers pipeline folder or hub id (what the trainer saves in output_dir);
- a ``checkpoint-N`` folder: its ``unet/`` (or, from a LoRA run, its LoRA file) over the run's base model, which
  is the ``pretrained_model_name_or_path`` recorded in its ``training_state.json``;
- a single ``.safetensors``/``.ckpt`` file in the original SD layout, read by colossal_sd.single_file under the
  trainer's rules (a pickle loads with ``weights_only`` unless ``--allow_unsafe_pickle``).

Model families: a folder's ``model_index.json`` names its pipeline class, which colossal_sd.families maps to
its family (SD 1.x/2.x or SDXL); everything else here (checkpoints, LoRAs, sampling) is the same for all.
The safety checker stays off, as in the training grids: samples of one's own fine-tune are for looking at.
"""

import argparse
import json
from pathlib import Path
from typing import List, Sequence, Tuple

from colossal_sd import embedded, noise_schedule, single_file
from colossal_sd.errors import UserError, first_line
from colossal_sd.hub import load_failure

CHECKPOINT_STATE = "training_state.json"  # colossal_sd.checkpoint.STATE, without importing the training side


def _family(index: dict, model: str):
    from colossal_sd import families

    family = families.for_pipeline_class(index.get("_class_name"), index)
    if family is None:
        raise UserError(f"--model '{model}' is a {index.get('_class_name')}; sample.py opens "
                        f"{', '.join(families.FAMILIES)} models")
    return family


def open_model(model: str, single_file_config=None, allow_unsafe_pickle=False):
    """(pipeline on the CPU in fp32, a short model name for the PNGs' parameters)."""
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars, not the user's business
    if single_file.is_single_file(model):
        return _from_single_file(model, single_file_config, allow_unsafe_pickle), Path(model).stem
    if single_file_config or allow_unsafe_pickle:
        raise UserError("--single_file_config and --allow_unsafe_pickle go with a single-file --model "
                        "(.safetensors or .ckpt); drop them")
    source = embedded.resolve(model) if embedded.is_embedded(model) else model
    path = Path(source).expanduser()
    if (path / CHECKPOINT_STATE).is_file():
        return _from_checkpoint(path), f"{path.resolve().parent.name}-{path.name}"
    if path.is_dir() and not (path / "model_index.json").is_file() and _lora_file(path):
        raise UserError(f"--model '{model}' holds a LoRA ({_lora_file(path).name}), not a model: give its base "
                        f"model as --model and this folder as --lora")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise UserError(f"--model '{model}' is neither a diffusers pipeline folder (no model_index.json) nor a "
                        f"checkpoint-N folder (no {CHECKPOINT_STATE}); give one of those or a .safetensors/.ckpt file")
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UserError(f"--model '{model}' does not exist")
    name = path.resolve().name if path.exists() else model.split("/")[-1]
    return _from_folder(model, source), name


def _lora_file(folder: Path):
    from colossal_sd.lora import WEIGHT_NAME
    return folder / WEIGHT_NAME if (folder / WEIGHT_NAME).is_file() else None


def _from_folder(model: str, source: str):
    from diffusers import DiffusionPipeline

    try:
        family = _family(dict(DiffusionPipeline.load_config(source)), model)
        pipeline = family.pipeline().from_pretrained(source, **family.pipeline_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(load_failure("model", model, e, "local diffusers pipeline folder", source)) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _from_single_file(path: str, config, allow_unsafe_pickle: bool):
    """The trainer's own single-file loading (colossal_sd.models.load_parts), assembled into a pipeline."""
    from colossal_sd.models import load_parts

    if not Path(path).expanduser().is_file():
        raise UserError(f"--model '{path}' does not exist")
    args = argparse.Namespace(pretrained_model_name_or_path=path, single_file_config=config,
                              allow_unsafe_pickle=allow_unsafe_pickle, revision=None, variant=None, cache_dir=None,
                              prediction_type=None)
    parts = load_parts(args)
    pipeline = parts.family.pipeline().from_pretrained(parts.source, **parts.components(),
                                                       **parts.family.pipeline_kwargs())
    # what the file's metadata says it predicts, over its config's scheduler
    pipeline.scheduler = noise_schedule.sampler(pipeline.scheduler, parts.noise_scheduler.config.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _from_checkpoint(folder: Path):
    """The run's base model, with the checkpoint's UNet in place, or its LoRA loaded (at scale 1)."""
    from colossal_sd.lora import WEIGHT_NAME

    try:
        run = json.loads((folder / CHECKPOINT_STATE).read_text())["args"]
        base = run["pretrained_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint '{folder}': cannot read the run's base model from {CHECKPOINT_STATE} "
                        f"({first_line(e)})") from None
    pipeline, _ = open_model(base, run.get("single_file_config"), bool(run.get("allow_unsafe_pickle")))
    if (folder / WEIGHT_NAME).is_file():
        load_loras(pipeline, [str(folder / WEIGHT_NAME)], [1.0])
    elif (folder / "unet").is_dir():
        pipeline.unet = _checkpoint_unet(folder, pipeline)
    else:
        raise UserError(f"checkpoint '{folder}' has neither unet/ nor {WEIGHT_NAME}: it is not a complete "
                        "training checkpoint")
    # the trainer writes these into the scheduler it saves; a checkpoint has none
    pipeline.scheduler = noise_schedule.sampler(pipeline.scheduler, run.get("prediction_type"),
                                                bool(run.get("rescale_betas_zero_snr")))
    return pipeline


def _checkpoint_unet(folder: Path, pipeline):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint '{folder}': cannot load its unet/: {first_line(e)}") from None


# ---------------------------------------------------------------- LoRAs


def lora_weight_file(lora: str) -> Path:
    """A LoRA file, or the LoRA file in a folder (a LoRA run's output_dir or checkpoint: its diffusers file)."""
    from colossal_sd.lora import WEIGHT_NAME

    path = Path(lora).expanduser()
    if path.is_dir():
        found = [path / WEIGHT_NAME] if (path / WEIGHT_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise UserError(f"--lora '{lora}': the folder holds {len(found) or 'no'} .safetensors files and no "
                            f"{WEIGHT_NAME}; name the LoRA file")
        return found[0]
    if not path.is_file():
        raise UserError(f"--lora '{lora}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--lora '{lora}': LoRAs load from .safetensors files (diffusers or kohya)")
    return path


def lora_scales(loras: Sequence[str], scales: Sequence[float]) -> List[float]:
    """One --lora_scale for all the LoRAs, or one each; default 1."""
    scales = list(scales or [1.0])
    if len(scales) == 1:
        return scales * len(loras)
    if len(scales) != len(loras):
        raise UserError(f"give one --lora_scale for all LoRAs or one per --lora (got {len(scales)} scales for "
                        f"{len(loras)} LoRAs)")
    return scales


def _mismatch(e: BaseException) -> str:
    """torch's load_state_dict error starts with a header line; the first mismatch says what does not fit."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("size mismatch")), first_line(e))


def load_loras(pipeline, loras: Sequence[str], scales: Sequence[float]) -> List[Tuple[str, float]]:
    """Load each LoRA (diffusers or kohya keys: diffusers converts) as its own adapter, at its scale.
    A LoRA made for another model is a one-line error."""
    # adapters already there (a LoRA checkpoint's own) stay at scale 1
    adapters = {name: 1.0 for names in pipeline.get_list_adapters().values() for name in names}
    for lora, scale in zip(loras, lora_scales(loras, scales)):
        file = lora_weight_file(lora)
        name = f"lora{len(adapters)}"
        try:
            pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise UserError(f"--lora '{lora}' does not fit this model: {_mismatch(e)}") from None
        adapters[name] = scale
    pipeline.set_adapters(list(adapters), list(adapters.values()))
    return list(adapters.items())
