"""Datasets the way people keep them: caption files, kohya's concept folders with repeats, caption augmentation
that survives caching, and --dataset_config mixing several subsets. Through the trainer, and as units."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colossal_sd import captions, data, dataset_config
from colossal_sd.captions import CaptionOptions
from colossal_sd.errors import UserError
from conftest import FAST, load_pipeline, run_trainer, sample, unet_weights, write_imagefolder
from test_bad_input import assert_one_line_error


def write_images(folder: Path, names, size=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return folder


def concept_folders(root: Path) -> Path:
    """kohya's layout: 5 x 4 images of the subject (two with a caption file), 2 x 3 class images: 26 samples."""
    subject = write_images(root / "5_sks dog", [f"{i}.png" for i in range(4)])
    (subject / "0.txt").write_text("sks dog, sitting, red collar, grass")
    (subject / "1.txt").write_text("sks dog, running")
    write_images(root / "2_dog", [f"{i}.jpg" for i in range(3)], size=(56, 40), seed=1)
    return root


# ---------------------------------------------------------------- units


def test_tags_shuffle_and_drop_but_the_first_keep_tokens_stay():
    caption = "sks dog, a, b, c, d, e, f"
    shuffled = {captions.augment(caption, CaptionOptions(shuffle_caption=True, keep_tokens=1), random.Random(i))
                for i in range(20)}
    assert len(shuffled) > 5 and all(s.startswith("sks dog, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    dropped = [captions.augment(caption, CaptionOptions(caption_tag_dropout=0.5, keep_tokens=1), random.Random(i))
               for i in range(20)]
    assert all(d.startswith("sks dog") for d in dropped) and min(len(d.split(", ")) for d in dropped) < 7
    assert captions.augment(caption, CaptionOptions(), random.Random(0)) == caption


def test_cached_variants_are_drawn_from_the_seed():
    options = CaptionOptions(shuffle_caption=True, caption_variants=3)
    first = captions.variants("a, b, c, d, e", options, seed=1, row=4)
    assert len(first) == 3 and len(set(first)) > 1
    assert captions.variants("a, b, c, d, e", options, seed=1, row=4) == first
    assert captions.variants("a, b, c, d, e", options, seed=2, row=4) != first
    assert captions.variants("a, b", CaptionOptions(caption_variants=3), seed=1, row=4) == ["a, b"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer
    from colossal_sd import embedded
    return CLIPTokenizer.from_pretrained(embedded.resolve(embedded.EMBEDDED_MODEL), subfolder="tokenizer")


def test_caption_files_subfolders_and_concept_tokens(tmp_path):
    root = concept_folders(tmp_path / "data")
    write_images(root / "misc" / "deeper", ["x.png"])
    (root / "misc" / "deeper" / "x.txt").write_bytes(b"caf\xe9  au\nlait")  # not UTF-8, two lines
    ds = data.load_source(train_data_dir=str(root))
    by_name = {Path(image).relative_to(root).as_posix(): text for image, text in zip(ds["image"], ds["text"])}
    assert by_name["5_sks dog/0.png"] == ["sks dog, sitting, red collar, grass"]
    assert by_name["5_sks dog/3.png"] == ["sks dog"]  # no .txt: the folder's tokens
    assert by_name["2_dog/0.jpg"] == ["dog"]
    assert by_name["misc/deeper/x.png"] == ["caf\ufffd au lait"]
    assert sorted(ds["__repeats__"]) == [1] + [2] * 3 + [5] * 4


def test_caption_extension_and_metadata_wins(tmp_path):
    folder = write_images(tmp_path / "data", ["a.png", "b.png"])
    (folder / "a.caption").write_text("from the caption file")
    ds = data.load_source(train_data_dir=str(folder), caption_extension=".caption")
    assert sorted(ds["text"]) == [[""], ["from the caption file"]]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"metadata {n}"}) + "\n"
                                                   for n in ("a.png", "b.png")))
    assert sorted(data.load_source(train_data_dir=str(folder))["text"]) == ["metadata a.png", "metadata b.png"]


def test_repeats_are_an_index_map_with_their_own_augmentations(tmp_path, tokenizer):
    root = concept_folders(tmp_path / "data")
    ds = data.with_concept_repeats(data.select_columns(data.load_source(train_data_dir=str(root)), "image", "text"),
                                   "image", str(root))
    dataset = data.ImageCaptionDataset(ds, tokenizer, "image", "text", 16, random_flip=True, seed=3,
                                       caption_options=[CaptionOptions(shuffle_caption=True, keep_tokens=1)])
    assert len(ds) == 7 and len(dataset) == 26
    assert sorted(np.bincount(dataset.rows).tolist()) == [2, 2, 2, 5, 5, 5, 5]
    repeats = [i for i in range(26) if dataset.rows[i] == dataset.rows[0]]
    pixels = [dataset[i]["pixel_values"] for i in repeats]
    assert any(not torch.equal(pixels[0], p) for p in pixels[1:])  # each repeat its own crop and flip
    assert torch.equal(dataset[repeats[1]]["pixel_values"], pixels[1])  # from (seed, epoch, index): the same again
    # uncached, each epoch draws a fresh variant of the caption; the same epoch draws the same one
    subject = next(i for i in range(26) if ds[int(dataset.rows[i])]["text"] == ["sks dog, sitting, red collar, grass"])
    ids = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        ids.append(tuple(dataset[subject]["input_ids"].tolist()))
    assert len(set(ids)) > 1 and tuple(dataset[subject]["input_ids"].tolist()) == ids[-1]
    cached = dataset.cached_captions(int(dataset.rows[subject]))
    assert len(cached) == 4 and all(c.startswith("sks dog, ") for c in cached)
    # the cached variants depend on the options and the seed: either changed, the text cache is another one
    assert dataset.caption_key()["caption_seed"] == 3 and dataset.caption_key()["captions"][0]["keep_tokens"] == 1
    dataset.caption_options = [CaptionOptions()]
    assert dataset.caption_key() == {} and dataset.cached_captions(int(dataset.rows[subject])) == [
        "sks dog, sitting, red collar, grass"]


def test_hostile_metadata_loads_and_a_broken_line_is_named(tmp_path):
    folder = write_images(tmp_path / "data", ["a.png", "b.png", "c.png", "d.png"])
    rows = [{"file_name": "a.png", "text": "a string"}, {"file_name": "b.png", "text": ["one", "two"]},
            {"file_name": "c.png", "text": None}, {"file_name": "d.png", "text": ""}, {"file_name": "gone.png"},
            {"text": "no file name"}, {"file_name": "a.png", "text": 7}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = data.select_columns(data.load_source(train_data_dir=str(folder)), "image", "text")
    assert ds["text"] == [["a string"], ["one", "two"], [], [], [], ["no file name"], ["7"]]
    assert [Path(p).name for p in ds["image"]] == ["a.png", "b.png", "c.png", "d.png", "gone.png", "", "a.png"]
    assert len(data.load_source(dataset_name=str(folder))) == 7  # the case: a local --dataset_name
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "{oops\n")
    with pytest.raises(UserError) as error:
        data.load_source(train_data_dir=str(folder))
    assert f"{folder}/metadata.jsonl line 3, column 2: not valid JSON" in str(error.value)
    assert "hub" not in str(error.value)


def test_dataset_config_defaults_and_paths_beside_the_file(tmp_path):
    write_images(tmp_path / "data" / "photos", ["a.png"])
    (tmp_path / "data" / "mix.toml").write_text('keep_tokens = 2\nshuffle_caption = true\n[[subsets]]\n'
                                                'train_data_dir = "photos"\nkeep_tokens = 1\n'
                                                '[[subsets]]\ndataset_name = "someone/on-the-hub"\n')
    first, second = dataset_config.read_subsets(tmp_path / "data" / "mix.toml")
    assert first.train_data_dir == str(tmp_path / "data" / "photos") and second.dataset_name == "someone/on-the-hub"
    args = type("Args", (), {"caption_tag_dropout": 0.1, "keep_tokens": 0})()
    assert first.caption_options(args) == CaptionOptions(True, 1, 0.1)
    assert second.caption_options(args) == CaptionOptions(True, 2, 0.1)


def test_dataset_config_refuses_unknown_keys_and_bad_values(tmp_path):
    folder = write_images(tmp_path / "data", ["a.png"])
    cases = {f'[[subsets]]\ntrain_data_dir = "{folder}"\nrepeat = 3\n':
             "[[subsets]] 1: unknown key 'repeat'; did you mean 'repeats'?",
             f'shufle_caption = true\n[[subsets]]\ntrain_data_dir = "{folder}"\n':
             "unknown key 'shufle_caption'; did you mean 'shuffle_caption'?",
             f'[[subsets]]\ntrain_data_dir = "{folder}"\nrepeats = 0\n': "key 'repeats' must be at least 1 (got 0)",
             f'[[subsets]]\ntrain_data_dir = "{folder}"\nshuffle_caption = 1\n':
             "key 'shuffle_caption' must be true or false",
             f'[[subsets]]\ntrain_data_dir = "{folder}"\ndataset_name = "x"\n': "give one of train_data_dir or "
                                                                                  "dataset_name, not both",
             'caption_extension = ".txt"\n': "no [[subsets]] tables"}
    for i, (text, expected) in enumerate(cases.items()):
        (tmp_path / f"{i}.toml").write_text(text)
        with pytest.raises(UserError, match=re.escape(expected)):
            dataset_config.read_subsets(tmp_path / f"{i}.toml")


# ---------------------------------------------------------------- through the trainer


def test_caption_files_train_and_save_a_loadable_pipeline(tmp_path):
    folder = write_images(tmp_path / "data", [f"{i}.png" for i in range(4)])
    write_images(folder / "more", ["4.jpg", "5.jpg"], seed=2)
    for image in [*folder.glob("*.png"), *folder.glob("more/*.jpg")]:
        image.with_suffix(".txt").write_text(f"an emoji of a cat, number {image.stem}")
    out = tmp_path / "out"
    proc = run_trainer(*FAST, "--train_data_dir", folder, "--output_dir", out, "--report_to", "none")
    assert "samples=6 " in proc.stdout + proc.stderr
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)


def test_concept_folders_with_buckets_and_a_validation_split(tmp_path):
    """Repeats count in samples= and the epoch; held-out images are whole images (never a repeat of a
    training image); every image's repeats share its bucket."""
    root = concept_folders(tmp_path / "data")
    out = tmp_path / "out"
    proc = run_trainer(*FAST, "--train_data_dir", root, "--output_dir", out, "--report_to", "none",
                       "--train_batch_size", 2, "--aspect_ratio_bucketing",
                       "--validation_split", 0.15, "--validation_steps", 3, "--shuffle_caption", "--keep_tokens", 1)
    log = proc.stdout + proc.stderr
    assert "buckets (width x height: images): " in log and "val_loss" in log
    # 7 images, 2 held out (ceil(0.15 * 7)); the 5 left hold 5 x 4 + 2 x 3 minus the held-out ones' repeats
    samples = int(re.search(r"samples=(\d+)", log).group(1))
    assert samples in {26 - a - b for a in (2, 5) for b in (2, 5)}, log[-3000:]
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)


@pytest.fixture(scope="module")
def resumed_with_repeats(tmp_path_factory):
    """2 processes, concept folders, cached latents and text with shuffled captions (cached variants): a run of
    6 steps, and one stopped at step 3 and resumed."""
    tmp = tmp_path_factory.mktemp("repeats")
    root = concept_folders(tmp / "data")
    run = [*FAST, "--train_data_dir", root, "--train_batch_size", 2, "--max_train_steps", 6, "--report_to", "none",
           "--cache_latents", "--cache_text_embeddings", "--cache_dir", tmp / "cache", "--random_flip",
           "--shuffle_caption", "--keep_tokens", 1, "--caption_tag_dropout", 0.2, "--caption_variants", 3]
    reference = run_trainer(*run, "--output_dir", tmp / "reference", nproc=2)
    stopped = run_trainer(*run, "--output_dir", tmp / "chain", "--stop_after_steps", 3, nproc=2)
    resumed = run_trainer(*run, "--output_dir", tmp / "chain", "--resume_from_checkpoint", "latest", nproc=2)
    return tmp, *(p.stdout + p.stderr for p in (reference, stopped, resumed))


def test_concept_folder_repeats_count_as_samples_and_are_cached_once(resumed_with_repeats):
    tmp, reference, _, resumed = resumed_with_repeats
    assert "samples=26 " in reference  # 5 x 4 + 2 x 3
    assert "data: 7 images, 26 samples an epoch" in reference
    assert "cache: encoded 7 of 7 samples" in reference  # each image once, however often it repeats
    assert "re-encoded nothing" in resumed  # the caption variants are drawn from the seed: the same cache
    assert sample(load_pipeline(tmp / "reference")).shape == (1, 32, 32, 3)


def test_resume_is_exact_with_repeats_and_caption_variants(resumed_with_repeats):
    tmp, _, stopped, resumed = resumed_with_repeats
    assert "stopped after --stop_after_steps 3" in stopped and "at step 3" in resumed
    expected, actual = unet_weights(tmp / "reference"), unet_weights(tmp / "chain")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_dataset_config_mixes_two_subsets(tmp_path):
    photos = write_images(tmp_path / "photos", [f"{i}.png" for i in range(3)])
    for image in photos.glob("*.png"):
        image.with_suffix(".caption").write_text(f"sks cat, photo {image.stem}, outdoors")
    emoji = {f"{i}.png": Image.new("RGB", (24, 24), (i * 40, 90, 0)) for i in range(4)}
    folder = write_imagefolder(tmp_path / "emoji", emoji, {n: [f"an emoji {n}", "an emoji"] for n in emoji})
    config = tmp_path / "mix.toml"
    config.write_text(f'shuffle_caption = true\n\n[[subsets]]\ntrain_data_dir = "{photos}"\nrepeats = 2\n'
                      f'caption_extension = ".caption"\nkeep_tokens = 1\n\n'
                      f'[[subsets]]\ndataset_name = "{folder}"\nshuffle_caption = false\n')
    out = tmp_path / "out"
    proc = run_trainer(*FAST, "--dataset_config", config, "--output_dir", out, "--report_to", "none",
                       "--cache_text_embeddings", "--cache_dir", tmp_path / "cache")
    log = proc.stdout + proc.stderr
    assert "samples=10 " in log  # 2 x 3 + 4
    assert f"subset 1 ({photos}): 3 images, repeated 2x" in log and f"subset 2 ({folder}): 4 images" in log
    assert sample(load_pipeline(out)).shape == (1, 32, 32, 3)

    (tmp_path / "bad.toml").write_text(f'[[subsets]]\ntrain_data_dir = "{photos}"\ncaption_extention = ".x"\n')
    bad = run_trainer("--dataset_config", tmp_path / "bad.toml", "--output_dir", tmp_path / "bad", check=False,
                      timeout=120)
    assert_one_line_error(bad, "unknown key 'caption_extention'; did you mean 'caption_extension'?")


@pytest.mark.parametrize("flags,expected", [
    (["--caption_variants", "3", "--shuffle_caption"], "--caption_variants sets how many"),
    (["--keep_tokens", "1"], "--keep_tokens keeps tags in place"),
    (["--caption_tag_dropout", "1"], "--caption_tag_dropout must be in [0, 1)"),
    (["--dataset_config", "mix.toml", "--train_data_dir", "."],
     "--dataset_config names the data: drop --train_data_dir"),
    (["--dataset_config", "missing.toml"], "--dataset_config missing.toml does not exist"),
])
def test_caption_and_dataset_config_flags_are_checked(flags, expected, tmp_path, monkeypatch):
    from parse_arguments import parse_args
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "photos", ["a.png"])
    (tmp_path / "mix.toml").write_text('[[subsets]]\ntrain_data_dir = "photos"\n')
    with pytest.raises(UserError, match=re.escape(expected)):
        parse_args(flags)
