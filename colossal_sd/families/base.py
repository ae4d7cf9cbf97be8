"""The interface a model family implements (see colossal_sd.families)."""

from typing import Dict, Optional, Tuple

import torch


class Family:
    """One generation of Stable Diffusion. Subclasses set the class attributes and the conditioning methods."""

    name: str  # as the log and errors say it
    pipeline_class: str  # the diffusers pipeline, as model_index.json names it
    # (tokenizer, text encoder) component names, in the order their outputs are concatenated
    text_components: Tuple[Tuple[str, str], ...]
    text_encoder_classes: Dict[str, str]  # component -> transformers class loading it
    lora_prefixes: Dict[str, str]  # component -> kohya LoRA key prefix

    def __init__(self, index: dict):
        self.index = index  # model_index.json: the pipeline's own settings (e.g. force_zeros_for_empty_prompt)

    # -- the pipeline
    def pipeline(self):
        import diffusers
        return getattr(diffusers, self.pipeline_class)

    def pipeline_kwargs(self) -> dict:
        """Extra arguments for constructing or loading the pipeline (no safety checker, no watermark)."""
        return {}

    def default_resolution(self, unet_config, vae_scale_factor: int) -> int:
        return unet_config.sample_size * vae_scale_factor

    # -- text
    def tokenize(self, tokenizers: dict, caption: str) -> torch.Tensor:
        """Token ids of one caption: (77,) for one text encoder, (encoders, 77) for several."""
        from colossal_sd.data import tokenize
        ids = [tokenize(tokenizers[tokenizer], caption) for tokenizer, _ in self.text_components]
        return ids[0] if len(ids) == 1 else torch.stack(ids)

    def encode_prompt(self, text_encoders: dict, input_ids: torch.Tensor, empty_ids: torch.Tensor) -> dict:
        """What the text encoders make of a batch of token ids: {"encoder_hidden_states", maybe "text_embeds"}."""
        raise NotImplementedError

    def conditioning(self, text: dict, time_ids: Optional[torch.Tensor]) -> dict:
        """The UNet's keyword arguments besides the noisy latents and timesteps."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    @property
    def text_outputs(self) -> Tuple[str, ...]:
        """The keys encode_prompt returns: what a text cache stores per caption."""
        return ("encoder_hidden_states",)

    # -- frozen parts
    def vae_dtype(self, vae, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE encodes in."""
        return compute_dtype
