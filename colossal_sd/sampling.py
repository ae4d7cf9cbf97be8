"""Prompts in, PNGs out: the images, their A1111 ``parameters`` text, the labelled grid, and sharding across ranks.

Every image has its own seed (its prompt's seed + its index within the prompt) and its own CPU generator, so
an image does not depend on the device's RNG, on which rank draws it, or on the other images: the same prompt
file with the same seeds gives the same images. The training grids (colossal_sd.validation) draw theirs here too.

Each PNG carries the text AUTOMATIC1111 writes (modules/processing.py ``create_infotext``), which its "PNG Info"
tab and civitai read::

    an emoji of a red heart
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: my-model
"""

import json
import math
import os
from pathlib import Path
from typing import List, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from colossal_sd.errors import UserError
from colossal_sd.prompt_file import Prompt

DEFAULT_GUIDANCE = 7.5  # diffusers' and A1111's
LABEL_HEIGHT = 14
LABEL_PADDING = 4
GRID_MIN_SIDE = 64  # tiny models' 32 px samples are drawn larger, to be seen
GRID = "grid.png"

# --scheduler / --ss name -> (diffusers class, config overrides, A1111's sampler name)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "dpmsolver++": "dpmpp_2m"}  # kohya's --ss names


# ---------------------------------------------------------------- schedulers


def scheduler_name(value: str, label: str) -> str:
    name = ALIASES.get(value.lower(), value.lower())
    if name not in SCHEDULERS:
        raise UserError(f"{label} {value}: unknown sampler; choose one of {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(name: str, config):
    """The named scheduler with the model's own betas, timesteps and prediction type."""
    import diffusers

    class_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def sampler_label(scheduler) -> str:
    """A1111's name for the scheduler, or its class name."""
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for class_name, overrides, label in SCHEDULERS.values():
        if type(scheduler).__name__ == class_name and overrides.get("use_karras_sigmas", False) == karras:
            return label
    return type(scheduler).__name__


# ---------------------------------------------------------------- images


def image_seeds(seed: int, count: int, first: int = 0) -> List[int]:
    return [seed + i for i in range(first, first + count)]


@torch.no_grad()
def generate(pipeline, prompt: Prompt, seeds: Sequence[int]):
    """(images, the scheduler they were drawn with) for one complete prompt, one image per seed."""
    original = pipeline.scheduler
    if prompt.sampler:
        pipeline.scheduler = make_scheduler(prompt.sampler, original.config)
    try:
        images = pipeline(prompt.prompt, negative_prompt=prompt.negative_prompt or None, width=prompt.width,
                          height=prompt.height, num_inference_steps=prompt.steps,
                          guidance_scale=prompt.guidance_scale, num_images_per_prompt=len(seeds),
                          generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
        return images, pipeline.scheduler
    finally:
        pipeline.scheduler = original


def quote(value) -> str:
    """A1111's quoting of a parameter value (infotext_utils.quote)."""
    text = str(value)
    return text if not any(c in text for c in ",\n:") else json.dumps(text, ensure_ascii=False)


def infotext(prompt: Prompt, seed: int, sampler: str, model: str) -> str:
    """A1111's ``parameters`` text of one image (processing.create_infotext)."""
    parameters = {"Steps": prompt.steps, "Sampler": sampler, "CFG scale": prompt.guidance_scale, "Seed": seed,
                  "Size": f"{prompt.width}x{prompt.height}", "Model": model}
    text = ", ".join(f"{k}: {quote(v)}" for k, v in parameters.items() if v is not None)
    negative = f"\nNegative prompt: {prompt.negative_prompt}" if prompt.negative_prompt else ""
    return f"{prompt.prompt}{negative}\n{text}".strip()


def save_png(image, path: Path, parameters: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # tEXt, or iTXt for text beyond Latin-1
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, pnginfo=info)
    os.replace(tmp, path)  # a grid built from the folder never reads half a file


def label_grid(rows, labels, min_side: int = GRID_MIN_SIDE):
    """One row of images per label, the label written above its row, on white.

    Images keep their aspect ratio; one smaller than `min_side` on its short side is scaled up to it. Rows may
    differ in size (a prompt file's lines may set their own), narrower ones are padded with white.
    """
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [[_at_least(image, min_side) for image in images] for images in rows]
    heights = [max(image.height for image in images) for images in rows]
    text_width = max(int(probe.textlength(label, font=font)) for label in labels) + 2 * LABEL_PADDING
    width = max(max(sum(image.width for image in images) for images in rows), text_width)
    grid = Image.new("RGB", (width, sum(heights) + len(rows) * LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for images, label, height in zip(rows, labels, heights):
        draw.text((LABEL_PADDING, top + 1), label, fill="black", font=font)
        left = 0
        for image in images:
            grid.paste(image, (left, top + LABEL_HEIGHT))
            left += image.width
        top += LABEL_HEIGHT + height
    return grid


def _at_least(image, min_side: int):
    scale = min_side / min(image.size)
    if scale <= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)))


# ---------------------------------------------------------------- a sampling run


def image_name(index: int, seed: int) -> str:
    return f"{index:05d}-{seed}.png"


def plan(prompts: Sequence[Prompt], num_images: int) -> list:
    """(image index, prompt number, seed) of every image, in output order."""
    return [(p * num_images + i, p, seed)
            for p, prompt in enumerate(prompts) for i, seed in enumerate(image_seeds(prompt.seed, num_images))]


def share(items: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous part: neighbouring images of one prompt stay together, drawn as one batch."""
    per_rank = math.ceil(len(items) / world_size)
    return items[rank * per_rank:(rank + 1) * per_rank]


def sample_images(pipeline, prompts: Sequence[Prompt], num_images: int, output_dir: Path, model_name: str,
                  rank: int = 0, world_size: int = 1, log=print) -> list:
    """Write this rank's share of the images; returns the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    mine, written = share(plan(prompts, num_images), rank, world_size), []
    while mine:
        number = mine[0][1]
        batch = [job for job in mine if job[1] == number]
        mine = mine[len(batch):]
        prompt = prompts[number]
        images, scheduler = generate(pipeline, prompt, [seed for _, _, seed in batch])
        sampler = sampler_label(scheduler)
        for (index, _, seed), image in zip(batch, images):
            path = output_dir / image_name(index, seed)
            save_png(image, path, infotext(prompt, seed, sampler, model_name))
            written.append(path)
        log(f"wrote {len(batch)} image(s) of prompt {number + 1}/{len(prompts)}: {prompt.prompt}")
    return written


def write_grid(prompts: Sequence[Prompt], num_images: int, output_dir: Path) -> Path:
    """grid.png from the images in output_dir (every rank's), one labelled row per prompt."""
    rows = [[] for _ in prompts]
    for index, number, seed in plan(prompts, num_images):
        with Image.open(output_dir / image_name(index, seed)) as image:
            rows[number].append(image.convert("RGB"))
    grid = label_grid(rows, [p.prompt for p in prompts])
    path = output_dir / GRID
    grid.save(path)
    return path


def prompts_of(args) -> List[Prompt]:
    """--prompt_file's lines or the --prompt flags, before the model's defaults are known."""
    from colossal_sd.prompt_file import read_prompt_file

    if args.prompt and args.prompt_file:
        raise UserError("give either --prompt or --prompt_file, not both")
    if args.prompt_file:
        return read_prompt_file(args.prompt_file)
    if not args.prompt:
        raise UserError("nothing to sample: give --prompt \"...\" (repeatable) or --prompt_file FILE")
    return [Prompt(text) for text in args.prompt]


def with_defaults(prompts: Sequence[Prompt], args, pipeline) -> List[Prompt]:
    """Fill what a line leaves out from the flags; the size defaults to the model's native one."""
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return [p.with_defaults(negative_prompt=args.negative_prompt, width=args.width or native,
                            height=args.height or native, seed=args.seed, guidance_scale=args.guidance_scale,
                            steps=args.steps, sampler=args.scheduler) for p in prompts]


def run(args):
    """sample.py: every rank loads the model and draws its share; global rank 0 then writes grid.png."""
    from colossal_sd import distributed, pipelines

    prompts = prompts_of(args)  # a bad prompt file fails before any loading, identically on every rank
    scales = pipelines.lora_scales(args.lora or [], args.lora_scale)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = distributed.init_distributed() if world_size > 1 else None  # a single process needs no group
    rank = info.rank if info else 0
    device = info.device if info else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipeline, model_name = pipelines.open_model(args.model, args.single_file_config, args.allow_unsafe_pickle)
        if args.lora:
            pipelines.load_loras(pipeline, args.lora, scales)
        pipeline.to(device, _dtype(args.dtype, device))
        prompts = with_defaults(prompts, args, pipeline)
        output_dir = Path(args.output_dir)
        say = print if rank == 0 else (lambda *_: None)
        sample_images(pipeline, prompts, args.num_images, output_dir, model_name, rank, world_size, say)
        distributed.barrier()  # every rank's images are in output_dir
        if rank == 0:
            grid = write_grid(prompts, args.num_images, output_dir)
            say(f"wrote {len(prompts) * args.num_images} image(s) and {grid}")
    finally:
        distributed.shutdown_distributed()


def _dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
