"""Stable Diffusion 1.x and 2.x: one CLIP (1.x) or OpenCLIP (2.x) text encoder, its last hidden states."""

import torch

from colossal_sd.families.base import Family

# The safety checker stays off: a fine-tune's samples are for looking at, and a single file carries none.
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class StableDiffusion(Family):
    name = "SD1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    text_components = (("tokenizer", "text_encoder"),)
    text_encoder_classes = {"text_encoder": "CLIPTextModel"}
    lora_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}

    def pipeline_kwargs(self) -> dict:
        return dict(NO_SAFETY_CHECKER)

    def loading_kwargs(self, single_file: bool) -> dict:
        # A single file carries no safety checker (diffusers' from_single_file skips it too), and its config
        # source may hold only configs; a pipeline folder keeps whatever it has.
        return dict(NO_SAFETY_CHECKER) if single_file else {}

    def encode_prompt(self, text_encoders: dict, input_ids: torch.Tensor, empty_ids: torch.Tensor) -> dict:
        return {"encoder_hidden_states": text_encoders["text_encoder"](input_ids, return_dict=False)[0]}

    def kohya_prefixes(self, kohya_state: dict) -> dict:
        # diffusers names SD's one text encoder like SDXL's first; A1111 and ComfyUI read lora_te_ for it
        return {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya_state.items()}
