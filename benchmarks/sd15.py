"""Stable Diffusion 1.5's UNet shape, written out so GPU benchmarks need no hub access."""

SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TEXT_TOKENS = 77


def sd15_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**SD15_UNET_CONFIG)
