"""Stable Diffusion XL: two text encoders, a pooled text embedding and size/crop conditioning.

The conditioning is built exactly as SDXL was trained (and as ``StableDiffusionXLPipeline`` samples):
- the penultimate hidden states of CLIP-L and OpenCLIP-bigG, concatenated (768 + 1280 channels);
- the projected pooled output of the second encoder, as ``added_cond_kwargs["text_embeds"]``;
- per sample, ``time_ids`` = original size + crop top-left + target size (colossal_sd.data records them from the
  real image and the real crop, also for cached latents);
- an empty caption (caption dropout included) is all zeros when the pipeline says
  ``force_zeros_for_empty_prompt``, which is what the pipeline's unconditional half uses at sampling time.
"""

import torch

from colossal_sd.families.base import Family


class StableDiffusionXL(Family):
    name = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    lora_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

    @property
    def zeros_for_empty_prompt(self) -> bool:
        return bool(self.index.get("force_zeros_for_empty_prompt", True))  # the pipeline's default

    def pipeline_kwargs(self) -> dict:
        # the watermark needs an extra package, and marks one's own samples
        return {"add_watermarker": False, "force_zeros_for_empty_prompt": self.zeros_for_empty_prompt}

    @property
    def text_outputs(self):
        return ("encoder_hidden_states", "text_embeds")

    def encode_prompt(self, text_encoders: dict, input_ids: torch.Tensor, empty_ids: torch.Tensor) -> dict:
        hidden = []
        for i, (_, name) in enumerate(self.text_components):
            output = text_encoders[name](input_ids[:, i], output_hidden_states=True, return_dict=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's: its projected pooled output
        text = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
        if self.zeros_for_empty_prompt:
            empty = (input_ids == empty_ids.to(input_ids.device)).flatten(1).all(dim=1)
            # no `if empty.any()`: that would be a host sync every step
            text = {k: torch.where(empty.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v)
                    for k, v in text.items()}
        return text

    def unused_text_layers(self, text_encoders: dict) -> list:
        # The penultimate states are used: the first encoder's last layer feeds nothing (the second's feeds the
        # pooled embedding).
        last = text_encoders["text_encoder"].config.num_hidden_layers - 1
        return [f"text_encoder.text_model.encoder.layers.{last}"]

    def conditioning(self, text: dict, time_ids) -> dict:
        time_ids = time_ids.to(text["text_embeds"].device, text["text_embeds"].dtype)
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": text["text_embeds"], "time_ids": time_ids}}

    def random_conditioning(self, unet_config, batch_size: int, resolution: int, device, generator=None) -> dict:
        text = super().random_conditioning(unet_config, batch_size, resolution, device, generator)
        pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        text["text_embeds"] = torch.randn((batch_size, pooled), generator=generator, device=device)
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return self.conditioning(text, time_ids.repeat(batch_size, 1))

    def kohya_module_names(self, lora_state: dict, unet_config) -> dict:
        """The UNet's modules under their SGM names (input_blocks.4.1...), as sd-scripts writes SDXL LoRAs."""
        from colossal_sd.single_file import unet_names
        from colossal_sd.single_file_places import locate

        names = unet_names(unet_config)  # the single-file layout's module map: one mapping, written once
        return {("unet." + locate(k[len("unet."):], names).key if k.startswith("unet.") else k): v
                for k, v in lora_state.items()}

    def vae_dtype(self, vae, compute_dtype: torch.dtype) -> torch.dtype:
        # SDXL's own VAE overflows in fp16; its config says so (an fp16-fix VAE's does not)
        return torch.float32 if getattr(vae.config, "force_upcast", False) else compute_dtype
