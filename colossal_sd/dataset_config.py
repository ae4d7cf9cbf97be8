"""--dataset_config FILE.toml: several datasets mixed into one run, each a subset with its own repeats, columns
and caption options (kohya's idea, with this trainer's flag names).

    shuffle_caption = true            # top level: defaults for every subset

    [[subsets]]
    train_data_dir = "photos/sks"     # a folder: images with caption files, concept folders, or an imagefolder
    repeats = 10
    keep_tokens = 1

    [[subsets]]
    dataset_name = "laion_part.parquet"   # or a saved dataset, a json/csv file, a hub id
    caption_column = "prompt"

A subset's keys: train_data_dir or dataset_name (with dataset_config_name), image_column, caption_column,
caption_extension, repeats, class_tokens (kohya's: the caption of an image that has none), is_reg (regularisation
images: each training sample is paired with one, weighted by --prior_loss_weight; colossal_sd.prior_preservation),
and the caption options shuffle_caption, keep_tokens, caption_tag_dropout and
caption_variants; a key at the top level is every subset's default, and a caption option set in neither place is
the command line's. Relative paths are relative to the file's folder.

Every subset becomes the same columns (IMAGE, CAPTION, colossal_sd.concept_folders.REPEATS and
colossal_sd.data.SUBSET, the subset's number, by which a row finds its caption options, and IS_REG), and the
subsets are concatenated. A subset key the file does not know is a one-line error naming it. A new per-subset
setting is one more `Subset` field and, where the loop needs it per sample, one more column.
"""

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from colossal_sd import caption_files, concept_folders, data, metadata_files
from colossal_sd.captions import CaptionOptions
from colossal_sd.config_file import read_config
from colossal_sd.errors import UserError

IMAGE, CAPTION = "image", "text"
IS_REG = "__is_reg__"  # the column of regularisation flags
SOURCES = ("train_data_dir", "dataset_name")
CAPTION_OPTIONS = tuple(CaptionOptions.__dataclass_fields__)


@dataclass(frozen=True)
class Subset:
    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    image_column: str = "image"
    caption_column: str = "text"
    caption_extension: str = caption_files.DEFAULT_EXTENSION
    repeats: int = 1
    class_tokens: Optional[str] = None  # the caption of an image without one (kohya's name)
    is_reg: bool = False  # regularisation (class) images, paired with the training samples
    shuffle_caption: Optional[bool] = None  # the caption options: None takes the command line's
    keep_tokens: Optional[int] = None
    caption_tag_dropout: Optional[float] = None
    caption_variants: Optional[int] = None

    @property
    def name(self) -> str:
        return self.train_data_dir or self.dataset_name

    @property
    def root(self):
        """Where the subset's relative image paths start."""
        path = Path(self.name).expanduser()
        return str(path) if path.is_dir() else str(path.parent) if path.is_file() else None

    def caption_options(self, args) -> CaptionOptions:
        return CaptionOptions.from_args(args, **{k: getattr(self, k) for k in CAPTION_OPTIONS
                                                 if getattr(self, k) is not None})


KEYS = {field.name: field for field in dataclasses.fields(Subset)}
# What each key takes: (type, lowest value) — bools are not ints here, though Python says they are.
KINDS = {"repeats": (int, 1), "keep_tokens": (int, 0), "caption_tag_dropout": ((int, float), 0),
         "caption_variants": (int, 1), "shuffle_caption": (bool, None), "is_reg": (bool, None)}


def read_subsets(path) -> list:
    """The file's subsets, each checked: one line naming the file, the subset and the key at fault."""
    if not str(path).lower().endswith(".toml"):
        raise UserError(f"--dataset_config {path}: use a .toml file")
    if not Path(path).is_file():
        raise UserError(f"--dataset_config {path} does not exist")
    config = read_config(path)
    defaults = {key: value for key, value in config.items() if key != "subsets"}
    _check(defaults, f"{path}", top_level=True)
    tables = config.get("subsets")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{path}: no [[subsets]] tables (each names a train_data_dir or a dataset_name)")
    subsets = []
    for number, table in enumerate(tables, start=1):
        where = f"{path}: [[subsets]] {number}"
        _check(table, where)
        given = [key for key in SOURCES if table.get(key)]
        if len(given) != 1:
            raise UserError(f"{where}: give one of train_data_dir or dataset_name"
                            + (f", not both" if len(given) > 1 else ""))
        subset = Subset(**{**defaults, **table, **_beside(path, table)})
        if subset.train_data_dir and not Path(subset.train_data_dir).expanduser().is_dir():
            raise UserError(f"{where}: train_data_dir '{subset.train_data_dir}' is not a directory")
        subsets.append(subset)
    return subsets


def _beside(config, table: dict) -> dict:
    """A relative path is relative to the file's folder, so that a config kept with its data works from anywhere;
    a dataset_name that is no path there stays a name (a hub id)."""
    paths = {}
    for key in SOURCES:
        if table.get(key) and not Path(table[key]).expanduser().is_absolute():
            beside = Path(config).parent / table[key]
            if key == "train_data_dir" or beside.exists():
                paths[key] = str(beside)
    return paths


def _check(table: dict, where: str, top_level: bool = False):
    known = [k for k in KEYS if not (top_level and k in SOURCES)] + (["subsets"] if top_level else [])
    for key, value in table.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise UserError(f"{where}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        kind, lowest = KINDS.get(key, (str, None))
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            name = {int: "a whole number", bool: "true or false", str: "a string"}.get(kind, "a number")
            raise UserError(f"{where}: key '{key}' must be {name} (got {value!r})")
        if lowest is not None and value < lowest:
            raise UserError(f"{where}: key '{key}' must be at least {lowest} (got {value!r})")
        if key == "caption_tag_dropout" and value >= 1:
            raise UserError(f"{where}: key '{key}' must be below 1 (got {value!r})")


def build_dataset(args, tokenizer, resolution: int, seed: int, say=lambda message: None, subsets=None,
                  where=None):
    """The training set of the mixed subsets (colossal_sd.data.build_dataset's counterpart): the file's, or
    `subsets` made from the command line (colossal_sd.prior_preservation)."""
    where = where or f"--dataset_config {args.dataset_config}"
    ds, caption_options = load(args, seed, say, subsets)
    if len(ds) == 0:
        raise UserError(f"{where}: its subsets hold no images")
    return data.make_dataset(args, ds, tokenizer, IMAGE, CAPTION, resolution, seed, None, caption_options,
                             where, say)


def load(args, seed: int, say, subsets=None):
    """The subsets as one `datasets.Dataset` of IMAGE, CAPTION, REPEATS, SUBSET and IS_REG columns, and the
    caption options of each subset. --max_train_samples picks from the mix of training images."""
    import datasets

    subsets = subsets if subsets is not None else read_subsets(args.dataset_config)
    parts = []
    for number, subset in enumerate(subsets):
        source = data.load_source(subset.dataset_name, subset.dataset_config_name, subset.train_data_dir,
                                  args.cache_dir, image_column=subset.image_column,
                                  caption_column=subset.caption_column, caption_extension=subset.caption_extension,
                                  # class_tokens caption the images that have none: no warning about them
                                  say=say if subset.class_tokens is None else lambda message: None)
        ds = data.keep_columns_undecoded(source, subset.image_column, subset.caption_column)
        ds = data.with_concept_repeats(ds, subset.image_column, subset.name)
        parts.append(_common_columns(ds, subset, number))
        kind = " regularisation" if subset.is_reg else ""
        say(f"data: subset {number + 1} ({subset.name}): {len(ds)}{kind} images"
            + (f", repeated {subset.repeats}x" if subset.repeats > 1 else ""))
    ds = datasets.concatenate_datasets(parts)
    if args.max_train_samples is not None:
        ds = _pick(ds, args.max_train_samples, seed)
    return ds, [subset.caption_options(args) for subset in subsets]


def _pick(ds, count: int, seed: int):
    """--max_train_samples of the training images, at random; the regularisation images are all kept."""
    import datasets
    import numpy as np

    is_reg = np.asarray(ds[IS_REG], dtype=bool)
    training = ds.select(np.flatnonzero(~is_reg)) if is_reg.any() else ds
    training = training.shuffle(seed=seed).select(range(min(count, len(training))))
    return datasets.concatenate_datasets([training, ds.select(np.flatnonzero(is_reg))]) if is_reg.any() else training


def _common_columns(ds, subset: Subset, number: int):
    """One subset in the columns every subset shares: images as undecoded {bytes, path} cells with absolute
    paths, captions as lists of strings, repeats times the subset's own."""
    import datasets

    features = datasets.Features({IMAGE: datasets.Image(decode=False),
                                  CAPTION: datasets.Sequence(datasets.Value("string")),
                                  concept_folders.REPEATS: datasets.Value("int64"),
                                  data.SUBSET: datasets.Value("int64"), IS_REG: datasets.Value("bool")})
    root, repeats, fallback = subset.root, subset.repeats, [subset.class_tokens] if subset.class_tokens else []

    def common(batch):
        rows = len(batch[subset.image_column])
        folder_repeats = batch.get(concept_folders.REPEATS, [1] * rows)
        return {IMAGE: [_absolute(cell, root) for cell in batch[subset.image_column]],
                CAPTION: [metadata_files.caption_list(value) or fallback for value in batch[subset.caption_column]],
                concept_folders.REPEATS: [count * repeats for count in folder_repeats],
                data.SUBSET: [number] * rows, IS_REG: [subset.is_reg] * rows}

    return ds.map(common, batched=True, remove_columns=ds.column_names, features=features)


def _absolute(cell, root) -> dict:
    if isinstance(cell, dict) and cell.get("bytes"):
        return {"bytes": cell["bytes"], "path": cell.get("path")}
    path = concept_folders.image_path(cell)
    if path and root and not Path(path).is_absolute():
        path = str(Path(root) / path)
    return {"bytes": None, "path": path or None}
