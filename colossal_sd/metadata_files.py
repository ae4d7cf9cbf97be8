"""An imagefolder's metadata.jsonl / metadata.csv read line by line, for when `datasets` refuses it.

`datasets`' JSON reader wants one type per column: a caption that is a string in some rows and a list in
others, or null, stops it, and with it the run. Here every caption cell becomes a list of strings (null or
missing: no caption), every row whose image is named is kept (a missing or broken image is skipped and counted
later, like any unreadable image), and a line that cannot be read at all is an error naming the file and line.
"""

import csv
import json
from pathlib import Path

from colossal_sd import local_files
from colossal_sd.errors import UserError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def metadata_files(root: Path) -> list:
    return sorted(p for name in METADATA_FILES for p in Path(root).rglob(name))


def caption_list(value) -> list:
    """A caption cell as a list of strings: a string, a list of them, a number, or nothing."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _rows(file: Path):
    """The rows of one metadata file as dicts; a line that is not a row is an error naming the file and line."""
    problem = local_files.check_file(file)
    if problem:
        raise UserError(problem)
    with open(file, newline="" if file.suffix == ".csv" else None, encoding="utf-8", errors="replace") as f:
        if file.suffix == ".csv":
            yield from csv.DictReader(f)
        else:
            yield from (json.loads(line) for line in f if line.strip())


def read_folder(root, image_column: str, caption_column: str):
    """The imagefolder as a `datasets.Dataset` of image paths and caption lists, one row per metadata row."""
    import datasets

    images, captions, seen_column = [], [], False
    for file in metadata_files(root):
        for row in _rows(file):
            name = row.get("file_name")  # without one, the row is an unreadable image: skipped and counted
            seen_column = seen_column or caption_column in row
            images.append(str((file.parent / name).resolve()) if isinstance(name, str) and name else "")
            captions.append(caption_list(row.get(caption_column)))
    if not seen_column:
        files = ", ".join(map(str, metadata_files(root)))
        raise UserError(f"--caption_column '{caption_column}' is in no row of {files}")
    features = datasets.Features({image_column: datasets.Value("string"),
                                  caption_column: datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({image_column: images, caption_column: captions}, features=features)
