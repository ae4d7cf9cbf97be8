"""A user's own pipeline directory and imagefolder, with the awkward images real folders contain."""

import io
import shutil

import numpy as np
from PIL import Image

from conftest import load_pipeline, run_trainer, sample, write_imagefolder


def awkward_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    good = {
        "rgb.jpg": rgb,
        "grey.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen.png": Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)),
        "palette.png": rgb.convert("P"),
        "tiny.png": rgb.resize((3, 2)),
        "wide.png": rgb.resize((400, 8)),
    }
    bad = {"zero.png": b"", "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10}
    return good, bad


def test_local_pipeline_and_awkward_imagefolder_with_two_processes(tmp_path, tiny_sd):
    model = shutil.copytree(tiny_sd, tmp_path / "my-sd")
    good, bad = awkward_images()
    captions = {name: [f"a picture called {name}", "another caption"] for name in good}
    captions.update({name: ["unreadable"] for name in bad})
    data = write_imagefolder(tmp_path / "data", {**good, **bad}, captions)
    out = tmp_path / "out"
    proc = run_trainer("--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
                       "--resolution", "32", "--train_batch_size", "2", "--num_train_epochs", "1",
                       "--random_flip", "--seed", "3", nproc=2)
    log = proc.stdout + proc.stderr
    assert "samples=10" in log
    assert "skipped 2 unreadable images" in log
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)
