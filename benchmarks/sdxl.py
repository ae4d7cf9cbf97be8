"""Stable Diffusion XL base 1.0's UNet shape (2.567 B parameters), written out so GPU benchmarks need no hub access.

The values are stabilityai/stable-diffusion-xl-base-1.0's unet/config.json; what is left out is diffusers'
default. Trained at 1024 px: 128x128 latents, 77 tokens of 768 + 1280 = 2048 text channels, a 1280-channel
pooled text embedding and six time ids (6 x 256 + 1280 = 2816 added-embedding inputs).
"""

SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SDXL_UNET_PARAMETERS = 2_567_463_684  # as diffusers counts the released checkpoint's UNet
