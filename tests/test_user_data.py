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


def test_hostile_imagefolder_trains_and_counts_every_unreadable_row(tmp_path):
    """metadata.jsonl as people write it: captions that are strings, lists, empty, null or absent, which
    `datasets`' JSON reader refuses; rows whose image is missing, empty, corrupt or not named at all."""
    import json

    good, bad = awkward_images()
    data = tmp_path / "data"
    data.mkdir()
    for name, image in {**good, **bad}.items():
        (data / name).write_bytes(image) if isinstance(image, bytes) else image.save(data / name)
    captions = ["a string", ["a list", "of captions"], "", None, [], "x", ["y"], "z"]
    rows = [{"file_name": name, "text": caption} for name, caption in zip(good, captions)]
    rows[5].pop("text")
    rows += [{"file_name": "zero.png", "text": "empty"}, {"file_name": "corrupt.png", "text": ["corrupt"]},
             {"file_name": "missing.png", "text": "gone"}, {"text": "no file_name"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    proc = run_trainer("--train_data_dir", data, "--output_dir", out, "--resolution", "32", "--train_batch_size", "2",
                       "--num_train_epochs", "1", "--seed", "3", "--report_to", "none")
    log = proc.stdout + proc.stderr
    assert "read the metadata of" in log and "line by line (12 rows)" in log
    assert "samples=12 " in log
    assert "skipped 4 unreadable images" in log
    assert "the hub" not in log
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)
