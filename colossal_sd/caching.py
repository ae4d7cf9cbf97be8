"""Disk cache of VAE latents and text embeddings: each image and caption is encoded once, ever.

Layout: ``<root>/<key>/shard-00000/`` ... one directory per `SHARD_SIZE` consecutive samples. The key hashes
everything that changes an encoding: the model's VAE and text encoder, resolution (or buckets), crop, flip
variants and the dataset's content fingerprint. Each rank encodes its share of the missing shards into a private
temp directory, fsyncs it, and renames it into place, so a killed or concurrent run never leaves a shard that can
be read half-written.

Each shard holds ``manifest.json``: every file's size and xxh3-128 checksum. Every run verifies every shard (each
rank its share) before training on it: one that is missing files, truncated, emptied by a power cut, corrupted
in place or written before manifests existed is re-encoded, and the log counts it. The cost is one read of the
cache per run, split across the ranks: xxh3 hashes about 5 GB/s on one core, so it is the disk's read speed (SD at
512 px caches ~64 KiB of latents per image and ~120 KiB per caption: ~20 GB for 100k images, about 10 s on a node
with an NVMe disk), and it leaves the shards in the page cache for the first epoch.
A temp directory whose writer is gone (its pid, on this host) or that has not been touched for
`STALE_TEMP_S` (another host's writer) is removed: the cache may be shared by runs, so a live writer's is kept.

A latent is cached as its VAE distribution (mean and log-variance), so every step still samples a fresh latent
from it, as the uncached loop does. With --random_flip both flips are cached. Captions are cached per row
(every caption of a caption list, each in --caption_variants variants when captions are shuffled or their tags
dropped: colossal_sd.captions) plus the empty prompt, so caption dropout can swap in "" without the encoder.
An image that repeats (kohya's concept folders) is one row: encoded once, read by each of its samples.
"""

import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from colossal_sd import data, embedded, models
from colossal_sd.checksums import ALGORITHM, file_checksum
from colossal_sd.distributed import barrier
from colossal_sd.errors import CleanStop, UserError, first_line
from colossal_sd.run_lock import pid_runs

DEFAULT_SHARD_SIZE = 256
# Overridable so that a test gets several shards out of a few dozen samples; part of the cache key.
SHARD_SIZE = int(os.environ.get("COLOSSAL_SD_CACHE_SHARD_SIZE", DEFAULT_SHARD_SIZE))
ENCODE_BATCH = 32
FORMAT_VERSION = 2  # 2: time ids (SDXL's size conditioning) and pooled text embeddings. Shards without a manifest (written before them) are re-encoded in place, not orphaned
MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600  # a live writer touches its temp directory every few seconds
# Why a shard on disk cannot be used, as counted in the log.
MISSING, NO_MANIFEST, CORRUPT = 1, 2, 3
ARRAYS = {"latents": ("latents", "latent_shapes", "latent_offsets", "skipped", "time_ids"),
          "text": ("caption_ids", "caption_offsets")}
# Each of the family's text outputs (models.BatchEncoder) is one array of unique captions.
TEXT_ARRAYS = {"encoder_hidden_states": "text", "text_embeds": "text_pooled"}


def required_arrays(what: dict) -> list:
    names = [name for kind, names in ARRAYS.items() if what[kind] for name in names]
    return names + ([TEXT_ARRAYS[output] for output in what["text_outputs"]] if what["text"] else [])


# ---------------------------------------------------------------- where


def cache_root(cache_dir) -> Path:
    return Path(cache_dir) / "colossal_sd_latents" if cache_dir else embedded.home() / "latents"


def cache_key(parts, dataset, what: dict) -> str:
    """Hash of the model's encoders, the data's content fingerprint and every setting that changes an encoding."""
    identity = {"version": FORMAT_VERSION, "model": parts.source, **what,
                "vae": (parts.vae.config, parts.vae_source) if what["latents"] else None,
                "text_encoder": {name: encoder.config.to_dict() for name, encoder in parts.text_encoders.items()}
                if what["text"] else None,
                "data": dataset.ds._fingerprint, "rows": len(dataset.ds),
                **({"shard_size": SHARD_SIZE} if SHARD_SIZE != DEFAULT_SHARD_SIZE else {})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def shard_dir(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}"


# ---------------------------------------------------------------- encoding one shard


def _pixel_variants(dataset, index, size, flips: bool):
    """The image at `index` (or the next readable one), centre-cropped, and its mirror image when flipping:
    [(pixels, time ids)] per variant, and whether the image was replaced."""
    for skipped in range(dataset.MAX_SKIPS):
        row = dataset.ds[(index + skipped) % len(dataset.ds)]
        try:
            image = data.open_image(row[dataset.image_column], dataset.root)
        except Exception:
            continue
        variants = [data.transform(image, size, True, False, random.Random(0), flip=flip)
                    for flip in ((False, True) if flips else (False,))]
        return variants, int(skipped > 0)
    raise RuntimeError(f"{dataset.MAX_SKIPS} images in a row from index {index} are unreadable")


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
def _encode_texts(parts, tokenize, captions: list, device) -> dict:
    """Each of the family's text outputs for `captions`, stacked: {output name: tensor}."""
    chunks = {}
    for start in range(0, len(captions), ENCODE_BATCH):
        ids = torch.stack([tokenize(c) for c in captions[start:start + ENCODE_BATCH]]).to(device)
        for name, value in parts.encode_prompt(ids).items():
            chunks.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(values) for name, values in chunks.items()}


class _Interrupted(Exception):
    """A signal arrived mid-shard: the shard is dropped, so that the ranks can agree to stop soon."""


def encode_shard(parts, dataset, indices, sizes, what: dict, device, store_dtype, interrupted=lambda: False) -> dict:
    """Arrays of one shard: ragged latents as one flat array plus offsets and shapes; unique captions."""
    arrays = {}
    if what["latents"]:
        variants, time_ids, skipped = [], [], []
        for index in indices:
            if interrupted():
                raise _Interrupted
            encoded, was_skipped = _pixel_variants(dataset, index, sizes[index] if sizes else dataset.resolution,
                                                   what["flip"])
            variants += [pixels for pixels, _ in encoded]
            time_ids.append(torch.stack([ids for _, ids in encoded]))
            skipped.append(was_skipped)
        dists = _encode_latent_dists(parts, variants, device)
        per_image = 2 if what["flip"] else 1
        per_sample = [torch.stack(dists[i:i + per_image]) for i in range(0, len(dists), per_image)]
        arrays["latents"] = np.concatenate([d.numpy().ravel() for d in per_sample]).astype(store_dtype)
        arrays["latent_shapes"] = np.array([d.shape for d in per_sample], dtype=np.int64)
        arrays["latent_offsets"] = np.cumsum([0] + [d.numel() for d in per_sample]).astype(np.int64)
        arrays["skipped"] = np.array(skipped, dtype=np.int64)
        arrays["time_ids"] = torch.stack(time_ids).numpy().astype(np.float32)  # samples x variants x 6
    if what["text"]:
        unique, caption_ids, offsets = {"": 0}, [], [0]
        for index in indices:
            for caption in dataset.cached_captions(index):
                caption_ids.append(unique.setdefault(caption, len(unique)))
            offsets.append(len(caption_ids))
        for name, value in _encode_texts(parts, dataset.tokenize, list(unique), device).items():
            arrays[TEXT_ARRAYS[name]] = value.numpy().astype(store_dtype)
        arrays["caption_ids"] = np.array(caption_ids, dtype=np.int64)
        arrays["caption_offsets"] = np.array(offsets, dtype=np.int64)
    return arrays


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer() -> str:
    """Who writes a temp directory, in its name: lets a later run tell a dead writer's leftovers from a live one."""
    return f"pid{os.getpid()}@{socket.gethostname()}"


def write_shard_atomically(target: Path, arrays: dict, replace: bool = False):
    """Write into a private temp dir with a manifest of checksums, fsync it, then rename: readers see the whole
    shard or none of it, and after a power cut the rename never points at unwritten data. `replace`: a shard
    that failed verification is in the way."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-{_writer()}-", dir=target.parent))
    try:
        files = {}
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
            files[f"{name}.npy"] = {"bytes": (tmp / f"{name}.npy").stat().st_size,
                                    ALGORITHM: file_checksum(tmp / f"{name}.npy")}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"format": FORMAT_VERSION, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if replace:
            _move_aside(target)
        os.rename(tmp, target)
        _fsync(target.parent)
    except OSError:
        if not target.is_dir():  # another run finished the same shard first: theirs is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_aside(shard: Path):
    """Out of the way in one rename (then deleted), so that the good shard replaces it in one rename too."""
    aside = shard.with_name(f"{TEMP_PREFIX}old-{shard.name}-{_writer()}-aside")
    try:
        os.rename(shard, aside)
    except FileNotFoundError:  # another run sharing the cache moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------- verifying the cache


def shard_problem(folder: Path, required: list) -> int:
    """0 if the shard has the `required` arrays and its files match its manifest, else MISSING, NO_MANIFEST or
    CORRUPT."""
    if not folder.is_dir():
        return MISSING
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        if any(f"{name}.npy" not in files for name in required):
            return CORRUPT
        for name, expected in files.items():
            path = folder / name
            if path.stat().st_size != expected["bytes"] or file_checksum(path) != expected[ALGORITHM]:
                return CORRUPT
    except FileNotFoundError as e:
        return NO_MANIFEST if Path(e.filename or "").name == MANIFEST else CORRUPT
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return CORRUPT
    return 0


def verify_shards(directory: Path, shards: int, required: list, info) -> list:
    """shard_problem of every shard, each rank checking its share; the same list on every rank. Collective."""
    status = torch.zeros(shards, dtype=torch.int64, device=info.device)
    for shard in range(info.rank, shards, info.world_size):
        status[shard] = shard_problem(shard_dir(directory, shard), required)
    if info.world_size > 1:
        dist.all_reduce(status)
    return status.tolist()


def remove_stale_temps(directory: Path, now: Optional[float] = None) -> int:
    """Remove the temp directories of writers that are gone; returns how many (see the module docstring)."""
    now, host, removed = now or time.time(), socket.gethostname(), 0
    for tmp in directory.glob(f"{TEMP_PREFIX}*"):
        writer = re.search(r"-pid(\d+)@(.+)-[a-z0-9_]+$", tmp.name)
        try:
            untouched = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        gone = writer is not None and writer.group(2) == host and not pid_runs(int(writer.group(1)))
        if gone or untouched > STALE_TEMP_S:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def _describe_problems(status: list) -> Optional[str]:
    counts = {problem: status.count(problem) for problem in (CORRUPT, NO_MANIFEST)}
    said = []
    if counts[CORRUPT]:
        n = counts[CORRUPT]
        said.append(f"{n} shard{'s' if n > 1 else ''} failed {'their' if n > 1 else 'its'} checksum")
    if counts[NO_MANIFEST]:
        n = counts[NO_MANIFEST]
        said.append(f"{n} shard{'s' if n > 1 else ''} had no checksum manifest (an older cache)")
    total = sum(counts.values())
    return f"cache: {' and '.join(said)}, and {'is' if total == 1 else 'are'} re-encoded" if said else None


# ---------------------------------------------------------------- building the cache


def build_cache(parts, dataset, sizes, what: dict, info, store_dtype, say, stop_request) -> Path:
    """Verify the cache and encode the shards that are missing or bad, each rank its share; returns the cache
    directory. A signal stops the run between shards (errors.CleanStop), the finished ones kept. Collective."""
    what = dict(what)
    directory = cache_root(what.pop("cache_dir")) / cache_key(parts, dataset, what)
    directory.mkdir(parents=True, exist_ok=True)
    if info.is_main and (removed := remove_stale_temps(directory)):
        say(f"cache: removed {removed} stale temporary shard folder{'s' if removed > 1 else ''} "
            "left by interrupted runs")
    shards = math.ceil(len(dataset.ds) / SHARD_SIZE)  # rows: an image repeated N times is encoded once
    started = time.perf_counter()
    status = verify_shards(directory, shards, required_arrays(what), info)
    if status.count(0):
        say(f"cache: verified the checksums of {status.count(0)} shards in {time.perf_counter() - started:.1f} s")
    if (problems := _describe_problems(status)) is not None:
        say(problems)
    todo = [shard for shard, problem in enumerate(status) if problem]
    encoded = _encode_in_rounds(parts, dataset, sizes, what, info, store_dtype, stop_request, directory, todo,
                                status)
    if encoded:
        say(f"cache: encoded {encoded} of {len(dataset.ds)} samples into {directory}")
    else:
        say(f"cache: all {len(dataset.ds)} samples found in {directory}; re-encoded nothing")
    return directory


def _encode_in_rounds(parts, dataset, sizes, what, info, store_dtype, stop_request, directory, todo, status) -> int:
    """Encode `todo`, one shard per rank per round; all ranks agree whether to stop before each round (ranks
    have different numbers of shards, so they loop the same number of rounds). Returns the samples encoded."""
    mine = todo[info.rank::info.world_size]
    rounds = math.ceil(len(todo) / info.world_size)
    encoded = torch.zeros(2, dtype=torch.int64, device=info.device)  # samples, shards
    for round_ in range(rounds + 1 if rounds else 0):
        if stop_request.agreed(info.device):
            dist.all_reduce(encoded)
            cached = len(status) - len(todo) + int(encoded[1])
            raise CleanStop(f"stopped by {stop_request.name} while caching: {cached} of {len(status)} shards are "
                            "cached and kept; rerun the same command to continue")
        if round_ >= len(mine):
            continue  # this rank is done: it still joins the others' agreements
        shard = mine[round_]
        indices = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(dataset.ds)))
        try:
            arrays = encode_shard(parts, dataset, indices, sizes, what, info.device, store_dtype,
                                  interrupted=lambda: stop_request.signal is not None)
        except _Interrupted:
            continue
        write_shard_atomically(shard_dir(directory, shard), arrays, replace=status[shard] != MISSING)
        encoded += torch.tensor([len(indices), 1], device=info.device)
    dist.all_reduce(encoded)
    barrier()
    return int(encoded[0])


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
            try:
                self.shards[shard] = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                                      for name in required_arrays(self.what)}
            except (OSError, ValueError, EOFError, KeyError) as e:
                # verified before training: only a change made to the cache since then gets here
                raise UserError(f"the cache shard {folder} changed during training and is unreadable "
                                f"({first_line(e)}); rerun the same command to re-encode it") from None
        return self.shards[shard]

    def __getitem__(self, index):
        shard, row = divmod(int(self.images.rows[index]), SHARD_SIZE)  # a repeated image's one cached row
        arrays = self._shard(shard)
        rng = random.Random(f"{self.images.seed}-{self.images.epoch}-{index}-cached")
        sample = {} if self.what["latents"] and self.what["text"] else dict(self.images[index])
        if self.what["latents"]:
            start, end = arrays["latent_offsets"][row:row + 2]
            variants = torch.from_numpy(np.array(arrays["latents"][start:end])).view(*arrays["latent_shapes"][row])
            flip = self.what["flip"] and rng.random() < 0.5
            sample.update(latent_dist=variants[int(flip)].float(), skipped=int(arrays["skipped"][row]),
                          time_ids=torch.from_numpy(np.array(arrays["time_ids"][row, int(flip)])))
            sample.pop("pixel_values", None)
        if self.what["text"]:
            start, end = arrays["caption_offsets"][row:row + 2]
            caption = 0 if rng.random() < self.caption_dropout else int(rng.choice(arrays["caption_ids"][start:end]))
            for output in self.what["text_outputs"]:
                value = np.array(arrays[TEXT_ARRAYS[output]][caption])
                sample[models.CACHED_TEXT[output]] = torch.from_numpy(value).float()
            sample.pop("input_ids", None)
        return sample
