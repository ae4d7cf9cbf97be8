"""The data pipeline's pure parts: sources, image conversion, transforms, captions, sharding."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from colossal_sd import data
from colossal_sd.errors import UserError
from conftest import write_imagefolder


def rgb_array(image):
    return np.asarray(image)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I", "I;16", "F", "1"])
def test_every_image_mode_becomes_8bit_rgb(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    image = base.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        np.full((8, 8), 65535, dtype=np.uint16))
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode == "I;16":  # full-scale 16-bit white stays white, not clipped garbage
        assert rgb_array(rgb).min() == 255


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (rgb_array(data.to_rgb(image)) == 255).all()


def test_transform_gives_square_normalised_tensor_for_extreme_aspect():
    image = Image.new("RGB", (500, 5), (255, 255, 255))
    tensor = data.image_to_tensor(image, 32, center_crop=False, random_flip=True, rng=random.Random(0))
    assert tensor.shape == (3, 32, 32)
    assert torch.allclose(tensor, torch.ones_like(tensor))


def test_random_crop_and_flip_are_drawn_from_the_rng():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    a = [data.image_to_tensor(image, 16, False, True, random.Random(s)) for s in range(6)]
    assert any(not torch.equal(a[0], x) for x in a[1:])
    assert torch.equal(a[0], data.image_to_tensor(image, 16, False, True, random.Random(0)))
    centred = [data.image_to_tensor(image, 16, True, False, random.Random(s)) for s in range(3)]
    assert all(torch.equal(centred[0], x) for x in centred)


def test_caption_list_picks_one_at_random():
    rng = random.Random(0)
    picks = {data.pick_caption(["a", "b", "c"], rng) for _ in range(50)}
    assert picks == {"a", "b", "c"}
    assert data.pick_caption(None, rng) == "" and data.pick_caption("x", rng) == "x"


@pytest.fixture
def folder(tmp_path):
    images = {f"{i}.png": Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(5)}
    return write_imagefolder(tmp_path / "folder", images, {n: f"caption {n}" for n in images})


def test_sources_imagefolder_saved_dataset_parquet_and_csv(folder, tmp_path):
    from_folder = data.load_source(train_data_dir=str(folder))
    assert len(from_folder) == 5 and {"image", "text"} <= set(from_folder.column_names)

    from_path = data.load_source(dataset_name=str(folder))
    assert len(from_path) == 5

    from_folder.save_to_disk(str(tmp_path / "saved"))
    assert len(data.load_source(dataset_name=str(tmp_path / "saved"))) == 5

    from_folder.to_parquet(str(tmp_path / "d.parquet"))
    parquet = data.load_source(dataset_name=str(tmp_path / "d.parquet"))
    assert len(parquet) == 5

    (tmp_path / "d.csv").write_text("image,text\n" + "".join(f"{i}.png,caption {i}\n" for i in range(5)))
    csv = data.select_columns(data.load_source(dataset_name=str(tmp_path / "d.csv")), "image", "text")
    assert data.open_image(csv[0]["image"], root=folder).size == (8, 8)


def test_unknown_file_type_is_refused(tmp_path):
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(UserError, match="cannot read '.txt'"):
        data.load_source(dataset_name=str(tmp_path / "d.txt"))


def test_max_train_samples_subsamples(folder):
    ds = data.select_columns(data.load_source(train_data_dir=str(folder)), "image", "text", max_train_samples=3)
    assert len(ds) == 3


def test_unreadable_image_is_replaced_and_counted(tmp_path):
    from transformers import CLIPTokenizer
    from colossal_sd import embedded
    tok = CLIPTokenizer.from_pretrained(embedded.resolve(embedded.EMBEDDED_MODEL), subfolder="tokenizer")
    folder = write_imagefolder(tmp_path / "f", {"a.png": b"", "b.png": Image.new("RGB", (8, 8))},
                               {"a.png": "bad", "b.png": "good"})
    ds = data.select_columns(data.load_source(train_data_dir=str(folder)), "image", "text")
    dataset = data.ImageCaptionDataset(ds, tok, "image", "text", 16)
    samples = [dataset[i] for i in range(2)]
    assert [s["skipped"] for s in samples] == [1, 0]
    assert all(s["pixel_values"].shape == (3, 16, 16) for s in samples)
    batch = data.collate(samples)
    assert batch["skipped"] == 1 and batch["input_ids"].shape == (2, 77)
