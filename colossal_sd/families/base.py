"""The interface a model family implements (see colossal_sd.families)."""

from typing import Dict, Optional, Tuple

import torch

TEXT_LENGTH = 77  # CLIP's context: every SD text encoder's token count


class Family:
    """One generation of Stable Diffusion. Subclasses set the class attributes and the conditioning methods."""

    name: str  # as the log's first line says it (model=...)
    pipeline_class: str  # the diffusers pipeline, as model_index.json names it
    # (tokenizer, text encoder) component names, in the order their outputs are concatenated
    text_components: Tuple[Tuple[str, str], ...]
    text_encoder_classes: Dict[str, str]  # component -> transformers class loading it
    lora_prefixes: Dict[str, str]  # the LoRA file's components (UNet, text encoders) -> their kohya key prefix

    def __init__(self, index: dict):
        self.index = index  # model_index.json: the pipeline's own settings (e.g. force_zeros_for_empty_prompt)

    # -- the pipeline
    def pipeline(self):
        import diffusers
        return getattr(diffusers, self.pipeline_class)

    def pipeline_kwargs(self) -> dict:
        """Extra arguments for constructing a pipeline from parts (no safety checker, no watermark)."""
        return {}

    def loading_kwargs(self, single_file: bool) -> dict:
        """Extra arguments for loading the pipeline from its source around trained parts."""
        return self.pipeline_kwargs()

    def default_resolution(self, unet_config, vae_scale_factor: int) -> int:
        return unet_config.sample_size * vae_scale_factor

    # -- text
    def encode_prompt(self, text_encoders: dict, input_ids: torch.Tensor, empty_ids: torch.Tensor) -> dict:
        """What the text encoders make of a batch of token ids: {"encoder_hidden_states", maybe "text_embeds"}."""
        raise NotImplementedError

    def unused_text_layers(self, text_encoders: dict) -> list:
        """Module paths ("text_encoder.text_model.encoder.layers.N") whose output the conditioning never uses."""
        return []

    def conditioning(self, text: dict, time_ids: Optional[torch.Tensor]) -> dict:
        """The UNet's keyword arguments besides the noisy latents and timesteps."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def random_conditioning(self, unet_config, batch_size: int, resolution: int, device, generator=None) -> dict:
        """Conditioning of the real shapes, random values: for benchmarks and FLOP counts."""
        shape = (batch_size, TEXT_LENGTH, unet_config.cross_attention_dim)
        return {"encoder_hidden_states": torch.randn(shape, generator=generator, device=device)}

    @property
    def text_outputs(self) -> Tuple[str, ...]:
        """The keys encode_prompt returns: what a text cache stores per caption."""
        return ("encoder_hidden_states",)

    # -- LoRA files
    def kohya_module_names(self, lora_state: dict, unet_config) -> dict:
        """peft-format LoRA weights ("unet.<module>...") with the module names kohya's files use for this family."""
        return lora_state

    def kohya_prefixes(self, kohya_state: dict) -> dict:
        """diffusers' kohya conversion names text encoders lora_te1_/lora_te2_: what this family's files say."""
        return kohya_state

    # -- frozen parts
    def vae_dtype(self, vae, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE encodes in."""
        return compute_dtype
