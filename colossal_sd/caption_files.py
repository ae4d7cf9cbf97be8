"""A folder of images with a caption file beside each (`cat.png` + `cat.txt`), the way kohya, OneTrainer and
SimpleTuner read them; subfolders too. An image without one is captioned by its concept folder's tokens
(colossal_sd.concept_folders), or trains unconditioned ("").
"""

from pathlib import Path

from colossal_sd import concept_folders

DEFAULT_EXTENSION = ".txt"


def read_caption(file: Path) -> str:
    """A caption file's text on one line. Not UTF-8 (an old Windows editor's): the odd bytes are replaced, so
    that the image still trains."""
    return " ".join(file.read_bytes().decode("utf-8", errors="replace").split())


def read_folder(root, image_column: str, caption_column: str, extension: str = DEFAULT_EXTENSION):
    """The folder as a `datasets.Dataset`: image paths, their captions (a one-caption list each, like a
    metadata file's list of captions), and each image's repeat count. Also returns how many images have
    neither a caption file nor concept tokens."""
    import datasets

    root = Path(root).resolve()
    images, captions, repeats, uncaptioned = [], [], [], 0
    for image in concept_folders.image_files(root):
        count, tokens = concept_folders.concept(image, root)
        caption_file = image.with_suffix(extension)
        caption = read_caption(caption_file) if caption_file.is_file() else tokens
        uncaptioned += caption is None
        images.append(str(image))
        captions.append([caption or ""])
        repeats.append(count)
    columns = {image_column: images, caption_column: captions}
    if any(r != 1 for r in repeats):
        columns[concept_folders.REPEATS] = repeats
    return datasets.Dataset.from_dict(columns), uncaptioned
