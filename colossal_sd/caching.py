"""Disk cache of VAE latents and text embeddings: each image and caption is encoded once, ever.

Layout: ``<root>/<key>/shard-00000/`` ... one directory per `SHARD_SIZE` consecutive samples. The key hashes
everything that changes an encoding: the model's VAE and text encoder, resolution (or buckets), crop, flip
variants and the dataset's content fingerprint. Each rank encodes its share of the missing shards into a private
temp directory and renames it into place, so a killed or concurrent run never leaves a shard that can be read
half-written; a finished shard is never rewritten.

A latent is cached as its VAE distribution (mean and log-variance), so every step still samples a fresh latent
from it, as the uncached loop does. With --random_flip both flips are cached. Captions are cached per row
(every caption of a caption list) plus the empty prompt, so caption dropout can swap in "" without the encoder.
"""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchvision.transforms import functional as TF

from colossal_sd import data, embedded, models
from colossal_sd.distributed import barrier

SHARD_SIZE = 256
ENCODE_BATCH = 32
FORMAT_VERSION = 1


# ---------------------------------------------------------------- where


def cache_root(cache_dir) -> Path:
    return Path(cache_dir) / "colossal_sd_latents" if cache_dir else embedded.home() / "latents"


def cache_key(parts, dataset, what: dict) -> str:
    """Hash of the model's encoders, the data's content fingerprint and every setting that changes an encoding."""
    identity = {"version": FORMAT_VERSION, "model": parts.source, **what,
                "vae": parts.vae.config if what["latents"] else None,
                "text_encoder": parts.text_encoder.config.to_dict() if what["text"] else None,
                "data": dataset.ds._fingerprint, "rows": len(dataset.ds)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shard_dir(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}"


# ---------------------------------------------------------------- encoding one shard


def _pixel_variants(dataset, index, size, flips: bool):
    """The image at `index` (or the next readable one), centre-cropped, and its mirror image when flipping."""
    for skipped in range(dataset.MAX_SKIPS):
        row = dataset.ds[(index + skipped) % len(dataset.ds)]
        try:
            image = data.open_image(row[dataset.image_column], dataset.root)
        except Exception:
            continue
        pixels = data.image_to_tensor(image, size, True, False, random.Random(0))
        return ([pixels, TF.hflip(pixels)] if flips else [pixels]), int(skipped > 0)
    raise RuntimeError(f"{dataset.MAX_SKIPS} images in a row from index {index} are unreadable")


def _captions(value) -> list:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [data.pick_caption(v, random.Random(0)) for v in values] or [""]


@torch.no_grad()
def _encode_latent_dists(parts, pixels: list, device) -> list:
    """VAE mean and log-variance (2C x h x w) per image; images of one shape are encoded together."""
    dtype = next(parts.vae.parameters()).dtype
    out = [None] * len(pixels)
    by_shape = {}
    for i, p in enumerate(pixels):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[start:start + ENCODE_BATCH]
            batch = torch.stack([pixels[i] for i in chunk]).to(device, dtype)
            params = parts.vae.encode(batch).latent_dist.parameters.float().cpu()
            for i, p in zip(chunk, params):
                out[i] = p
    return out


@torch.no_grad()
def _encode_texts(parts, tokenize, captions: list, device) -> torch.Tensor:
    chunks = []
    for start in range(0, len(captions), ENCODE_BATCH):
        ids = torch.stack([tokenize(c) for c in captions[start:start + ENCODE_BATCH]]).to(device)
        chunks.append(parts.text_encoder(ids, return_dict=False)[0].float().cpu())
    return torch.cat(chunks)


def encode_shard(parts, dataset, indices, sizes, what: dict, device, store_dtype) -> dict:
    """Arrays of one shard: ragged latents as one flat array plus offsets and shapes; unique captions."""
    arrays = {}
    if what["latents"]:
        variants, skipped = [], []
        for index in indices:
            pixels, was_skipped = _pixel_variants(dataset, index, sizes[index] if sizes else dataset.resolution,
                                                  what["flip"])
            variants += pixels
            skipped.append(was_skipped)
        dists = _encode_latent_dists(parts, variants, device)
        per_image = 2 if what["flip"] else 1
        per_sample = [torch.stack(dists[i:i + per_image]) for i in range(0, len(dists), per_image)]
        arrays["latents"] = np.concatenate([d.numpy().ravel() for d in per_sample]).astype(store_dtype)
        arrays["latent_shapes"] = np.array([d.shape for d in per_sample], dtype=np.int64)
        arrays["latent_offsets"] = np.cumsum([0] + [d.numel() for d in per_sample]).astype(np.int64)
        arrays["skipped"] = np.array(skipped, dtype=np.int64)
    if what["text"]:
        unique, caption_ids, offsets = {"": 0}, [], [0]
        for index in indices:
            for caption in _captions(dataset.ds[index][dataset.caption_column]):
                caption_ids.append(unique.setdefault(caption, len(unique)))
            offsets.append(len(caption_ids))
        arrays["text"] = _encode_texts(parts, dataset.tokenize, list(unique), device).numpy().astype(store_dtype)
        arrays["caption_ids"] = np.array(caption_ids, dtype=np.int64)
        arrays["caption_offsets"] = np.array(offsets, dtype=np.int64)
    return arrays


def write_shard_atomically(target: Path, arrays: dict):
    """Write into a private temp dir, then rename: readers see the whole shard or none of it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # another run finished the same shard first: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- building the cache


def missing_shards(directory: Path, samples: int) -> list:
    """Shards not yet in place; a killed writer's hidden temp directory does not count as a shard."""
    return [s for s in range(math.ceil(samples / SHARD_SIZE)) if not shard_dir(directory, s).is_dir()]


def build_cache(parts, dataset, sizes, what: dict, info, store_dtype, say) -> Path:
    """Encode the missing shards, each rank its share; returns the cache directory. Collective."""
    what = dict(what)
    directory = cache_root(what.pop("cache_dir")) / cache_key(parts, dataset, what)
    directory.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(directory, len(dataset))
    encoded = torch.zeros((), dtype=torch.int64)
    for shard in missing[info.rank::info.world_size]:
        indices = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(dataset)))
        write_shard_atomically(shard_dir(directory, shard),
                               encode_shard(parts, dataset, indices, sizes, what, info.device, store_dtype))
        encoded += len(indices)
    dist.all_reduce(encoded)
    barrier()
    encoded = int(encoded.item())
    if encoded:
        say(f"cache: encoded {encoded} of {len(dataset)} samples into {directory}")
    else:
        say(f"cache: all {len(dataset)} samples found in {directory}; re-encoded nothing")
    return directory


class CachedDataset(torch.utils.data.Dataset):
    """Samples from the cache: a latent distribution and/or a text embedding instead of pixels and token ids.

    What is not cached comes from the wrapped image dataset. Flip and caption choice are drawn from
    (seed, epoch, index) like the image dataset's augmentations.
    """

    def __init__(self, directory: Path, images, what: dict, caption_dropout: float = 0.0):
        self.directory, self.images, self.what = directory, images, what
        self.caption_dropout = caption_dropout  # hook for --caption_dropout: "" is cached in every shard
        self.shards = {}

    def __len__(self):
        return len(self.images)

    def set_epoch(self, epoch: int):
        self.images.set_epoch(epoch)

    def _shard(self, shard: int) -> dict:
        if shard not in self.shards:  # memory-mapped: RAM stays flat however large the cache
            folder = shard_dir(self.directory, shard)
            self.shards[shard] = {f.stem: np.load(f, mmap_mode="r") for f in folder.glob("*.npy")}
        return self.shards[shard]

    def __getitem__(self, index):
        arrays = self._shard(index // SHARD_SIZE)
        row = index % SHARD_SIZE
        rng = random.Random(f"{self.images.seed}-{self.images.epoch}-{index}-cached")
        sample = {} if self.what["latents"] and self.what["text"] else dict(self.images[index])
        if self.what["latents"]:
            start, end = arrays["latent_offsets"][row:row + 2]
            variants = torch.from_numpy(np.array(arrays["latents"][start:end])).view(*arrays["latent_shapes"][row])
            flip = self.what["flip"] and rng.random() < 0.5
            sample.update(latent_dist=variants[int(flip)].float(), skipped=int(arrays["skipped"][row]))
            sample.pop("pixel_values", None)
        if self.what["text"]:
            start, end = arrays["caption_offsets"][row:row + 2]
            caption = 0 if rng.random() < self.caption_dropout else int(rng.choice(arrays["caption_ids"][start:end]))
            sample["text_embeddings"] = torch.from_numpy(np.array(arrays["text"][caption])).float()
            sample.pop("input_ids", None)
        return sample


# ---------------------------------------------------------------- the loop's view


class Encoder:
    """Latents and text embeddings for a batch: sampled from the cache where cached, encoded otherwise."""

    def __init__(self, parts, compute_dtype):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        self.parts, self.compute_dtype = parts, compute_dtype
        self.scaling_factor = parts.vae.config.scaling_factor  # kept: the VAE itself may be freed
        self.distribution = DiagonalGaussianDistribution

    def __call__(self, batch, device, generator):
        if "latent_dist" in batch:
            params = batch["latent_dist"].to(device, non_blocking=True)
            latents = self.distribution(params).sample(generator) * self.scaling_factor
        else:
            latents = models.encode_latents(self.parts, batch["pixel_values"].to(device, non_blocking=True),
                                            generator)
        if "text_embeddings" in batch:
            text = batch["text_embeddings"].to(device, self.compute_dtype, non_blocking=True)
        else:
            text = models.encode_text(self.parts, batch["input_ids"].to(device, non_blocking=True))
        return latents.float(), text
