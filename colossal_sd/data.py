"""Image-caption data: where it comes from, how an image becomes a tensor, and what a batch holds."""

import io
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from colossal_sd import caption_files, captions, concept_folders, embedded, metadata_files
from colossal_sd.captions import CaptionOptions
from colossal_sd.concept_folders import IMAGE_SUFFIXES, REPEATS
from colossal_sd.errors import UserError, first_line
from colossal_sd.hub import load_failure

SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
SUBSET = "__subset__"  # the column of --dataset_config subset numbers: whose caption options a row takes
DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


# ---------------------------------------------------------------- sources


def load_source(dataset_name=None, dataset_config_name=None, train_data_dir=None, cache_dir=None, streaming=False,
                image_column="image", caption_column="text", caption_extension=caption_files.DEFAULT_EXTENSION,
                say=lambda message: None):
    """The training split as a `datasets.Dataset` (an `IterableDataset` when streaming), from the hub, a local
    path, or a folder (an imagefolder, or images with caption files)."""
    import datasets

    if train_data_dir is not None:
        ds = load_folder(train_data_dir, cache_dir, streaming, image_column, caption_column, caption_extension, say)
        if not streaming or not isinstance(ds, datasets.Dataset):
            return ds
        if REPEATS in ds.column_names or concept_folders.has_concept_folders(train_data_dir):
            raise UserError(f"--streaming reads each image once a pass: it cannot repeat the concept folders of "
                            f"'{train_data_dir}'; drop --streaming")
        return ds.to_iterable_dataset()
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
    if path.is_dir() and _holds_only_images(path):  # an imagefolder, or images with caption files
        return load_source(None, None, str(path), cache_dir, streaming, image_column, caption_column,
                           caption_extension, say)
    if not path.exists() and (dataset_name.startswith((".", "/", "~")) or dataset_name.count("/") > 1):
        raise UserError(f"--dataset_name '{dataset_name}' does not exist")
    return _train_split(_load(datasets.load_dataset, dataset_name, dataset_config_name, cache_dir=cache_dir,
                              streaming=streaming), dataset_name)


def load_folder(train_data_dir, cache_dir=None, streaming=False, image_column="image", caption_column="text",
                caption_extension=caption_files.DEFAULT_EXTENSION, say=lambda message: None):
    """A folder with a metadata file is an imagefolder (read by `datasets`, or line by line where `datasets`
    refuses the metadata); one without is images with caption files beside them. Either may hold kohya's
    concept folders (colossal_sd.concept_folders)."""
    import datasets

    root = Path(train_data_dir)
    if not root.is_dir():
        raise UserError(f"--train_data_dir '{train_data_dir}' is not a directory")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")):
        raise UserError(f"--train_data_dir '{train_data_dir}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not metadata_files.metadata_files(root):
        ds, uncaptioned = caption_files.read_folder(root, image_column, caption_column, caption_extension)
        if uncaptioned:
            say(f"data: {uncaptioned} of {len(ds)} images in {train_data_dir} have no {caption_extension} caption "
                "file and no concept folder name: they train with an empty caption")
        return ds
    try:
        return _train_split(datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir,
                                                  streaming=streaming), train_data_dir)
    except Exception as refused:  # e.g. a caption column of strings in some rows and lists in others
        try:
            ds = metadata_files.read_folder(root, image_column, caption_column)
        except UserError as e:
            raise UserError(f"cannot load dataset '{train_data_dir}': {e}") from None
        say(f"data: read the metadata of {train_data_dir} line by line ({len(ds)} rows): `datasets` refused it "
            f"({first_line(refused)})")
        return ds


def _holds_only_images(folder: Path) -> bool:
    """Images and maybe metadata, but no data files of a dataset (parquet, json, csv, arrow) to load as one."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return (any(p.suffix.lower() in IMAGE_SUFFIXES for p in files)
            and not any(p.suffix.lower() in DATA_FILE_BUILDERS and p.stem != "metadata" for p in files))


def with_concept_repeats(ds, image_column: str, root):
    """Each row's repeat count from the concept folder its image lies in, where the folder has such folders."""
    if REPEATS in ds.column_names or root is None or not Path(root).is_dir() or not (
            concept_folders.has_concept_folders(root)):
        return ds
    return ds.add_column(REPEATS, concept_folders.repeats_of(ds[image_column], root))


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
    ours = [column for column in (REPEATS, SUBSET) if column in (ds.column_names or ())]
    ds = ds.select_columns([image_column, caption_column, *ours])
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


def every_caption(value) -> list:
    """Each caption a cell may pick (one for a string, each of a list), "" for none."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [pick_caption(v, random.Random(0)) for v in values] or [""]


def sample_rows(ds):
    """The row of each sample: a row repeated its repeat count (concept folders), every row once otherwise.
    An index map: an image repeated N times is still decoded, bucketed and cached as one row."""
    if ds is None:
        return None
    if REPEATS in ds.column_names:
        return np.repeat(np.arange(len(ds)), np.asarray(ds[REPEATS], dtype=np.int64))
    return np.arange(len(ds))


# ---------------------------------------------------------------- the dataset


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes, augments and tokenizes one sample; an unreadable image is replaced by the next readable one.

    Replacing (rather than dropping) keeps every batch, on every rank, the same size, so no rank waits on a
    collective that another rank skipped. Each sample reports whether its own image was unreadable, so one
    epoch's count equals the number of unreadable images.

    Randomness (crop, flip, caption choice, caption augmentation) is drawn from (seed, epoch, index) alone, so
    it is the same whichever worker or rank decodes the sample, and a resumed run sees the same augmentations.

    Samples are not rows: `rows` maps each sample to its row, a row repeated its concept folder's count, so
    the repeats of one image get their own crops and captions but share its decoding, bucket and cache entry.
    """

    MAX_SKIPS = 100

    def __init__(self, ds, tokenizer, image_column, caption_column, resolution, center_crop=False,
                 random_flip=False, seed=0, root=None, caption_options=(CaptionOptions(),)):
        self.ds, self.tokenizer = ds, tokenizer
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.root, self.epoch = seed, root, 0
        self.caption_options = list(caption_options)  # one per --dataset_config subset (the SUBSET column)
        self.sizes = None  # aspect-ratio bucketing: a (height, width) per row instead of `resolution`

    @property
    def ds(self):
        return self._ds

    @ds.setter
    def ds(self, ds):
        # the rows are set anew by a validation split: so are the samples
        self._ds, self.rows = ds, sample_rows(ds)

    def set_epoch(self, epoch: int):
        # Worker processes get a fresh copy of the dataset each epoch (no persistent workers), so this reaches them.
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = int(self.rows[index])
        for skipped in range(self.MAX_SKIPS):
            rng = random.Random(f"{self.seed}-{self.epoch}-{index + skipped}")
            size = self.resolution if self.sizes is None else self.sizes[row]
            sample = self.decode(self.ds[(row + skipped) % len(self.ds)], rng, size)
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
        caption = captions.augment(pick_caption(row[self.caption_column], rng), self.options_of(row), rng)
        return {"pixel_values": pixels, "input_ids": self.tokenize(caption), "time_ids": time_ids}

    def options_of(self, row) -> CaptionOptions:
        return self.caption_options[row.get(SUBSET, 0)]

    def cached_captions(self, row: int) -> list:
        """What the text cache holds for a row: each of its captions, in each of its cached variants."""
        value = self.ds[row]
        return [variant for caption in every_caption(value[self.caption_column])
                for variant in captions.variants(caption, self.options_of(value), self.seed, row)]

    def caption_key(self) -> dict:
        """What changes the cached captions beyond the data: the augmentation and the seed it is drawn from."""
        keys = [options.key() for options in self.caption_options]
        return {"captions": keys, "caption_seed": self.seed} if any(keys) else {}

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


def build_dataset(args, tokenizer, resolution: int, seed: int, say=lambda message: None) -> ImageCaptionDataset:
    """The training set. --max_train_samples counts images (rows): their repeats come on top."""
    source = load_source(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                         image_column=args.image_column, caption_column=args.caption_column,
                         caption_extension=args.caption_extension, say=say)
    root = args.train_data_dir or (args.dataset_name if Path(args.dataset_name or "").is_dir() else None)
    ds = select_columns(source, args.image_column, args.caption_column, args.max_train_samples, seed)
    ds = with_concept_repeats(ds, args.image_column, root)
    return make_dataset(args, ds, tokenizer, args.image_column, args.caption_column, resolution, seed, root,
                        [CaptionOptions.from_args(args)], args.train_data_dir or args.dataset_name, say)


def make_dataset(args, ds, tokenizer, image_column, caption_column, resolution, seed, root, caption_options,
                 where: str, say) -> ImageCaptionDataset:
    check_some_image_readable(ds, image_column, root, where)
    dataset = ImageCaptionDataset(ds, tokenizer, image_column, caption_column, resolution, args.center_crop,
                                  args.random_flip, seed, root, caption_options)
    if len(dataset) != len(ds):
        say(f"data: {len(ds)} images, {len(dataset)} samples an epoch with their repeats")
    return dataset
