"""Folders of images the way kohya keeps them: `<N>_<tokens>/` repeats each of its images N times per epoch,
and `<tokens>` is the caption of an image that has no caption file.

    train_data_dir/
        10_sks dog/      each image 10 times an epoch; "sks dog" where there is no .txt
        1_dog/

The repeats become one number per image (a column of the dataset); colossal_sd.data turns them into an index
map, so that the image is decoded, bucketed and cached once however often it repeats.
"""

import re
from pathlib import Path

from colossal_sd.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONCEPT = re.compile(r"^(\d+)_(.*)$")
REPEATS = "__repeats__"  # the column of repeat counts


def image_files(root: Path) -> list:
    """Every image under `root`, subfolders included, hidden ones left out, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def concept(image: Path, root: Path):
    """(repeats, tokens) of the nearest `<N>_<tokens>` folder between `root` and the image; (1, None) outside
    of one."""
    for folder in Path(image).parent.relative_to(root).parts[::-1]:
        match = CONCEPT.match(folder)
        if match:
            repeats = int(match.group(1))
            if repeats < 1:
                raise UserError(f"concept folder '{Path(root) / folder}': its repeat count must be at least 1 "
                                f"(got {repeats}); rename it, e.g. '1_{match.group(2)}'")
            return repeats, match.group(2).strip() or None
    return 1, None


def has_concept_folders(root: Path) -> bool:
    return any(CONCEPT.match(p.name) for p in Path(root).rglob("*") if p.is_dir())


def image_path(cell) -> str:
    """The file path of an image cell (a path, or datasets' {'bytes', 'path'} dict); '' when it has none."""
    path = cell.get("path") if isinstance(cell, dict) else cell
    return path if isinstance(path, str) else ""


def repeats_of(cells, root) -> list:
    """The repeat count of each image cell, from the concept folder it lies in (1 for one not in any)."""
    root = Path(root).resolve()
    counts = []
    for cell in cells:
        path = Path(image_path(cell))
        path = (path if path.is_absolute() else root / path).resolve()
        counts.append(concept(path, root)[0] if path.is_relative_to(root) else 1)
    return counts
