"""Caching, aspect-ratio bucketing, streaming and the throughput figures, through the scripts and as units."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from colossal_sd import buckets, caching, speed
from conftest import FAST, run_script, run_trainer, unet_weights, write_imagefolder
from test_bad_input import assert_one_line_error

# ---------------------------------------------------------------- caching, end to end


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    """The 02 script (caching on by default) on 2 processes, then a second run on the same cache."""
    tmp = tmp_path_factory.mktemp("cached")
    # the same data in both runs: the script alone would train the demo's colour emoji
    first = run_script("02_run_trainer_with_colossalai.sh", *FAST, "--random_flip", "--cache_dir", tmp / "cache",
                       "--dataset_name", "embedded:emoji",
                       env={"NPROC": "2", "OUTPUT_DIR": str(tmp / "first"), "VALIDATION_SPLIT": "0"})
    second = run_trainer(*FAST, "--random_flip", "--cache_latents", "--cache_text_embeddings",
                         "--cache_dir", tmp / "cache", "--dataset_name", "embedded:emoji",
                         "--output_dir", tmp / "second")
    return SimpleNamespace(tmp=tmp, first=first.stdout + first.stderr, second=second.stdout + second.stderr)


def test_first_run_encodes_every_sample_into_the_cache(cached_runs):
    assert "cache: encoded 48 of 48 samples" in cached_runs.first
    assert "processes=2" in cached_runs.first
    shard = next((cached_runs.tmp / "cache" / "colossal_sd_latents").glob("*/shard-00000"))
    shapes = np.load(shard / "latent_shapes.npy")
    assert shapes.shape == (48, 4) and (shapes[:, :2] == [2, 8]).all()  # both flips, mean + log-variance


def test_second_run_re_encodes_nothing(cached_runs):
    assert "re-encoded nothing" in cached_runs.second
    assert "cache: encoded" not in cached_runs.second


def test_cached_run_saves_a_complete_pipeline_and_logs_throughput(cached_runs, tiny_sd):
    # the VAE and text encoder were freed after caching: saving reloads them from the source model
    for part in ("vae", "text_encoder"):
        assert list((cached_runs.tmp / "second" / part).glob("*.safetensors"))
    assert unet_weights(cached_runs.tmp / "second").keys() == unet_weights(tiny_sd).keys()
    assert re.search(r"tflops=[0-9.e-]+", cached_runs.second)


class _Rows(list):
    """Stands in for a `datasets.Dataset`: rows plus the content fingerprint `datasets` computes."""

    def __init__(self, fingerprint):
        super().__init__([0, 1, 2])
        self._fingerprint = fingerprint


def test_cache_key_changes_with_resolution_flip_buckets_and_data():
    parts = SimpleNamespace(source="m", vae=SimpleNamespace(config={"scaling_factor": 0.18}), vae_source=None,
                            text_encoders={"text_encoder": SimpleNamespace(
                                config=SimpleNamespace(to_dict=lambda: {"h": 64}))})
    base = {"latents": True, "text": True, "flip": False, "resolution": 32, "crop": "center", "buckets": None,
            "text_outputs": ["encoder_hidden_states"]}

    def key(fingerprint="abc", **change):
        return caching.cache_key(parts, SimpleNamespace(ds=_Rows(fingerprint)), {**base, **change})

    assert key() == key()
    for change in ({"resolution": 64}, {"flip": True}, {"buckets": [(48, 80)]}, {"fingerprint": "other"}):
        assert key(**change) != key(), change


def test_interrupted_shard_is_never_read(tmp_path, monkeypatch):
    # a writer killed mid-shard leaves only its hidden temp directory: the shard still counts as missing
    (tmp_path / ".tmp-shard-00000-killed").mkdir()
    (tmp_path / ".tmp-shard-00000-killed" / "latents.npy").write_bytes(b"half")
    shard = caching.shard_dir(tmp_path, 0)
    assert caching.shard_problem(shard, ["latents"]) == caching.MISSING

    real_save = np.save

    def save_then_fail(path, array):
        if "text" in str(path):
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError):
        caching.write_shard_atomically(caching.shard_dir(tmp_path, 0), {"latents": np.zeros(2), "text": np.ones(2)})
    assert caching.shard_problem(shard, ["latents"]) == caching.MISSING
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-shard-00000-killed"]  # ours was cleaned up

    monkeypatch.setattr(np, "save", real_save)
    caching.write_shard_atomically(caching.shard_dir(tmp_path, 0), {"latents": np.zeros(2)})
    assert caching.shard_problem(shard, ["latents"]) == 0


# ---------------------------------------------------------------- bucketing


def test_buckets_have_about_resolution_squared_pixels_and_step_sides():
    table = buckets.make_buckets(512, 64, 2.0)
    assert (512, 512) in table and (384, 640) in table and (640, 384) in table
    for height, width in table:
        assert height % 64 == 0 and width % 64 == 0
        assert height * width <= 512 * 512 and height * width >= 0.75 * 512 * 512
        assert max(height, width) / min(height, width) <= 2.0
    assert table[buckets.nearest_bucket(1000, 500, table)][1] > table[buckets.nearest_bucket(1000, 500, table)][0]


def test_bucket_batches_are_uniform_disjoint_across_ranks_and_resumable():
    assigned = [0] * 21 + [1] * 13 + [2] * 6
    ranks = [buckets.BucketBatchSampler(assigned, 4, 2, rank, seed=3) for rank in range(2)]
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0])  # no rank starves or waits
    seen = [i for rank in batches for batch in rank for i in batch]
    assert len(seen) == len(set(seen))  # no duplicates across ranks
    assert all(len({assigned[i] for i in batch}) == 1 and len(batch) == 4 for rank in batches for batch in rank)

    ranks[0].set_epoch(1)
    assert list(ranks[0]) != batches[0]  # reshuffled each epoch

    resumed = buckets.BucketBatchSampler(assigned, 4, 2, 0, seed=3)
    resumed.load_state_dict({"epoch": 0, "position": 2})
    assert list(resumed) == batches[0][2:]


@pytest.fixture(scope="module")
def mixed_aspect_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    shapes = [(40, 80), (80, 40), (64, 64)]  # (height, width): tall, wide, square
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (*shapes[i % 3], 3), dtype=np.uint8))
              for i in range(36)}
    return write_imagefolder(tmp_path_factory.mktemp("mixed") / "f", images, {n: f"caption {n}" for n in images})


def test_bucketed_cached_run_through_the_02_script(mixed_aspect_folder, tmp_path):
    # torch.stack in collate would fail on a batch of mixed shapes: finishing proves each batch is one bucket
    proc = run_script("02_run_trainer_with_colossalai.sh", *FAST[4:], "--resolution", "64",
                      "--aspect_ratio_bucketing", "--cache_dir", tmp_path / "cache",
                      env={"NPROC": "2", "OUTPUT_DIR": str(tmp_path / "out"), "VALIDATION_SPLIT": "0",
                           "TRAIN_DATA_DIR": str(mixed_aspect_folder)})
    log = proc.stdout + proc.stderr
    assert "buckets (width x height: images): 80x48: 12, 64x64: 12, 48x80: 12" in log
    assert "cache: encoded 36 of 36 samples" in log
    shard = next((tmp_path / "cache" / "colossal_sd_latents").glob("*/shard-00000"))
    assert {tuple(s[-2:]) for s in np.load(shard / "latent_shapes.npy")} == {(12, 20), (16, 16), (20, 12)}


# ---------------------------------------------------------------- streaming


def test_streaming_run_trains_from_local_parquet_through_the_01_script(mixed_aspect_folder, tmp_path):
    import datasets
    parquet = tmp_path / "train.parquet"
    datasets.load_dataset("imagefolder", data_dir=str(mixed_aspect_folder), cache_dir=str(tmp_path / "hf"),
                          split="train").to_parquet(str(parquet))
    proc = run_script("01_trainer_no_colossalai.sh", *FAST[2:], "--resolution", "32", "--streaming",
                      "--dataset_name", parquet, "--dataloader_num_workers", "2",
                      env={"OUTPUT_DIR": str(tmp_path / "out")})
    assert "step 3:" in proc.stdout + proc.stderr
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("args, expected", [
    (["--streaming", "--cache_latents", "--max_train_steps", "2"], "--streaming cannot be combined"),
    (["--streaming"], "needs --max_train_steps"),
    (["--aspect_ratio_bucketing", "--bucket_step", "24"], "is not a multiple of 16"),
])
def test_conflicting_data_flags_are_refused(args, expected):
    proc = run_trainer(*args, check=False)
    assert_one_line_error(proc, expected)


# ---------------------------------------------------------------- speed


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")


def test_flops_per_sample_are_counted_and_grow_with_resolution(tiny_unet):
    from colossal_sd.families import StableDiffusion
    parts = SimpleNamespace(unet=tiny_unet, family=StableDiffusion({}), vae_scale_factor=4)
    small = speed.unet_flops_per_sample(parts, 8)
    large = speed.unet_flops_per_sample(parts, 16)
    assert small > 0 and 3.5 < large / small < 4.5  # convolutions dominate: ~linear in pixels
    assert all(p.grad is None for p in tiny_unet.parameters())  # counted on a copy: the UNet is untouched


def test_tflops_always_mfu_only_with_a_known_peak():
    values = speed.with_tflops({"images_per_s": 10.0}, 2e12, None, 1)
    assert values == {"images_per_s": 10.0, "tflops": 20.0}
    assert speed.with_tflops({"images_per_s": 10.0}, 2e12, 100.0, 2)["mfu"] == pytest.approx(0.1)
    assert speed.bf16_peak_tflops(torch.device("cpu")) is None
