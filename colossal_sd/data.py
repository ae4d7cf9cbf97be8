"""Image-caption data: where it comes from, how an image becomes a tensor, and what a batch holds."""

import io
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from colossal_sd import embedded
from colossal_sd.errors import UserError, first_line
from colossal_sd.hub import load_failure

SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


# ---------------------------------------------------------------- sources


def load_source(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None, streaming=False):
    """The training split as a `datasets.Dataset` (an `IterableDataset` when streaming), from the hub, a local
    path, or an imagefolder."""
    import datasets

    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise UserError(f"--train_data_dir '{train_data_dir}' is not a directory")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(train_data_dir).rglob("*")):
            raise UserError(f"--train_data_dir '{train_data_dir}' holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return _train_split(_load(datasets.load_dataset, "imagefolder", data_dir=train_data_dir,
                                  cache_dir=cache_dir, streaming=streaming), train_data_dir)
    if embedded.is_embedded(dataset_name):
        return load_source(train_data_dir=embedded.resolve(dataset_name), cache_dir=cache_dir, streaming=streaming)
    path = Path(dataset_name)
    if path.is_dir() and any((path / m).exists() for m in SAVED_DATASET_MARKERS):
        saved = _train_split(_load(datasets.load_from_disk, str(path)), dataset_name)
        return saved.to_iterable_dataset() if streaming else saved
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"--dataset_name '{dataset_name}': cannot read '{path.suffix}' files; "
                            f"use one of {', '.join(DATA_FILE_BUILDERS)}")
        return _train_split(_load(datasets.load_dataset, builder, data_files=str(path), cache_dir=cache_dir,
                                  streaming=streaming), dataset_name)
    if not path.exists() and (dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1):
        raise UserError(f"--dataset_name '{dataset_name}' does not exist")
    return _train_split(_load(datasets.load_dataset, dataset_name, dataset_config_name, cache_dir=cache_dir,
                              streaming=streaming), dataset_name)


def _load(loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except Exception as e:  # datasets raises many types for "not there" / "offline"
        what = kwargs.get("data_dir") or kwargs.get("data_files") or args[0]
        raise UserError(load_failure("dataset", what, e, "local dataset path")) from None


def _train_split(ds, name):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise UserError(f"dataset '{name}' has no 'train' split (it has: {', '.join(ds)})")
    return ds


def select_columns(ds, image_column: str, caption_column: str, max_train_samples=None, seed=0):
    """Keep the two columns, leave images undecoded (bad ones are skipped later), subsample if asked."""
    ds = keep_columns_undecoded(ds, image_column, caption_column)
    if len(ds) == 0:
        raise UserError("the dataset is empty")
    if max_train_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(max_train_samples, len(ds))))
    return ds


def keep_columns_undecoded(ds, image_column: str, caption_column: str):
    """The two columns only, images left as bytes/paths. Works on streaming datasets too."""
    import datasets

    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if ds.column_names is not None and column not in ds.column_names:
            raise UserError(f"{flag} '{column}' is not in the dataset; its columns are: "
                            f"{', '.join(ds.column_names)}")
    if ds.features is not None:
        check_column_kinds(ds.features, image_column, caption_column)
    ds = ds.select_columns([image_column, caption_column])
    if ds.features is not None and isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def check_column_kinds(features, image_column: str, caption_column: str):
    """The image column must not be the dataset's text, nor the caption column its images (they would fail
    deep inside, or train on nothing). A text column of file paths stays allowed as the image column."""
    kinds = {name: _kind(feature) for name, feature in features.items()}
    image_columns = [name for name, kind in kinds.items() if kind == "images"]
    text_columns = [name for name, kind in kinds.items() if kind in ("text", "lists of text")]
    if kinds[caption_column] == "images":
        raise UserError(f"--caption_column '{caption_column}' holds images, not captions; the text is in: "
                        f"{', '.join(text_columns) or 'no column'}")
    if kinds[image_column] not in ("images", "text") or (kinds[image_column] == "text" and image_columns):
        raise UserError(f"--image_column '{image_column}' holds {kinds[image_column]}, not images; the images "
                        f"are in: {', '.join(image_columns) or 'no column'}")


def _kind(feature) -> str:
    """What a column holds: images (an Image feature, raw bytes, or datasets' {bytes, path} struct), text
    (strings: captions or image paths), lists of text, or the type it holds otherwise."""
    import datasets

    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, datasets.Image) or dtype in ("binary", "large_binary") or (
            isinstance(feature, dict) and "bytes" in feature):
        return "images"
    if dtype in ("string", "large_string"):
        return "text"
    inner = getattr(feature, "feature", None)  # datasets' List / Sequence
    if inner is not None:
        return "lists of text" if getattr(inner, "dtype", None) in ("string", "large_string") else "lists"
    return f"{dtype or type(feature).__name__} values"


# ---------------------------------------------------------------- one image


def open_image(value, root=None) -> Image.Image:
    """Any image cell (PIL image, path, bytes, datasets' {'bytes','path'} dict) as an RGB PIL image."""
    image = open_lazily(value, root)
    image.load()
    return to_rgb(image)


def open_lazily(value, root=None) -> Image.Image:
    """The image cell opened but not decoded: its header (size, mode) is read, its pixels are not."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        image = Image.open(path if path.is_absolute() or root is None else Path(root) / path)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, 16-bit, float, CMYK, palette and alpha images, all as 8-bit RGB (alpha onto white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    rng: random.Random) -> torch.Tensor:
    """Resize the short side, crop to a square, maybe flip, scale to [-1, 1]: the SD training transform.

    `resolution` may be a (height, width) bucket: the image is resized to cover it, then cropped to it.
    """
    return transform(image, resolution, center_crop, random_flip, rng)[0]


def transform(image: Image.Image, resolution, center_crop: bool, random_flip: bool, rng: random.Random,
              flip=None):
    """(pixels, time ids) of :func:`image_to_tensor`. The time ids are SDXL's size conditioning, as it was
    trained: original (height, width), the crop's (top, left) in the resized image, and the output (height,
    width). A flipped crop's left is measured in the flipped image, so the conditioning describes the pixels.
    `flip` True or False decides the flip instead of `random_flip`'s draw (the cache encodes both)."""
    out_h, out_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    original = (image.height, image.width)
    if isinstance(resolution, int):
        image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
    else:
        scale = max(out_h / image.height, out_w / image.width)
        image = TF.resize(image, [max(out_h, round(image.height * scale)), max(out_w, round(image.width * scale))],
                          interpolation=TF.InterpolationMode.BILINEAR)
    width, height = image.size
    if center_crop:
        top, left = (height - out_h) // 2, (width - out_w) // 2
    else:
        top, left = rng.randint(0, height - out_h), rng.randint(0, width - out_w)
    image = TF.crop(image, top, left, out_h, out_w)
    if flip is None:
        flip = random_flip and rng.random() < 0.5
    if flip:
        image, left = TF.hflip(image), width - out_w - left  # the same pixels as cropping the flipped image there
    time_ids = torch.tensor([*original, top, left, out_h, out_w], dtype=torch.float32)
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), time_ids


def pick_caption(value, rng: random.Random) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        value = rng.choice(value)
    if value is None:
        return ""
    return str(value)


# ---------------------------------------------------------------- the dataset


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes, augments and tokenizes one sample; an unreadable image is replaced by the next readable one.

    Replacing (rather than dropping) keeps every batch, on every rank, the same size, so no rank waits on a
    collective that another rank skipped. Each sample reports whether its own image was unreadable, so one
    epoch's count equals the number of unreadable images.

    Randomness (crop, flip, caption choice) is drawn from (seed, epoch, index) alone, so it is the same
    whichever worker or rank decodes the sample, and a resumed run sees the same augmentations.
    """

    MAX_SKIPS = 100

    def __init__(self, ds, tokenizer, image_column, caption_column, resolution, center_crop=False,
                 random_flip=False, seed=0, root=None):
        self.ds, self.tokenizer = ds, tokenizer
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.root, self.epoch = seed, root, 0
        self.sizes = None  # aspect-ratio bucketing: a (height, width) per index instead of `resolution`

    def set_epoch(self, epoch: int):
        # Worker processes get a fresh copy of the dataset each epoch (no persistent workers), so this reaches them.
        self.epoch = epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        for skipped in range(self.MAX_SKIPS):
            i = (index + skipped) % len(self.ds)
            rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
            size = self.resolution if self.sizes is None else self.sizes[index]
            sample = self.decode(self.ds[i], rng, size)
            if sample is not None:
                return {**sample, "skipped": int(skipped > 0)}
        raise RuntimeError(f"{self.MAX_SKIPS} images in a row from index {index} are unreadable")

    def decode(self, row, rng: random.Random, size):
        """Pixels and token ids of one row, or None when its image is unreadable."""
        try:
            image = open_image(row[self.image_column], self.root)
        except Exception:
            return None
        pixels, time_ids = transform(image, size, self.center_crop, self.random_flip, rng)
        return {"pixel_values": pixels, "input_ids": self.tokenize(pick_caption(row[self.caption_column], rng)),
                "time_ids": time_ids}

    def tokenize(self, caption: str) -> torch.Tensor:
        return tokenize(self.tokenizer, caption)


def tokenize(tokenizer, caption: str) -> torch.Tensor:
    """Token ids (77,); a tuple of tokenizers (SDXL's two) gives one row each."""
    if isinstance(tokenizer, tuple):
        return torch.stack([tokenize(t, caption) for t in tokenizer])
    return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids[0]


def collate(samples):
    """Stack every tensor the samples hold (pixels or cached latents, token ids or cached embeddings)."""
    batch = {key: torch.stack([s[key] for s in samples]).contiguous() for key in samples[0] if key != "skipped"}
    batch["skipped"] = sum(s["skipped"] for s in samples)
    return batch


def check_some_image_readable(ds, image_column: str, root, where: str):
    """Stop at start-up when not one image can be read: each sample would look for a readable one in vain.

    Reads images in order up to the first readable one: one image for any dataset that trains."""
    first_failure = None
    for i in range(len(ds)):
        cell = ds[i][image_column]
        try:
            open_image(cell, root)
            return
        except Exception as e:
            first_failure = first_failure or f"{_cell_name(cell, i)}: {first_line(e)}"
    raise UserError(f"none of the {len(ds)} images in {where} could be read: e.g. {first_failure}")


def _cell_name(cell, index: int) -> str:
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
    return Path(path).name if path else f"row {index}"


def build_dataset(args, tokenizer, resolution: int, seed: int) -> ImageCaptionDataset:
    source = load_source(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    root = args.train_data_dir or (args.dataset_name if Path(args.dataset_name or "").is_dir() else None)
    ds = select_columns(source, args.image_column, args.caption_column, args.max_train_samples, seed)
    check_some_image_readable(ds, args.image_column, root, args.train_data_dir or args.dataset_name)
    return ImageCaptionDataset(ds, tokenizer, args.image_column, args.caption_column, resolution,
                               args.center_crop, args.random_flip, seed, root)
