"""Aspect-ratio bucketing: every image trains at about resolution² pixels in the bucket nearest its shape.

A batch holds images of one bucket only (one tensor shape), so no image is squashed or cropped to a square.
"""

import math
from collections import Counter

import numpy as np
from PIL import Image

from colossal_sd.errors import UserError


def make_buckets(resolution: int, step: int, max_aspect_ratio: float) -> list:
    """(height, width) pairs, sides multiples of `step`, area at most resolution², aspect at most the limit."""
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * max_aspect_ratio) + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect_ratio:
            buckets.add((height, width))
            buckets.add((width, height))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list) -> int:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are symmetric)."""
    log_ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][1] / buckets[b][0]) - log_ratio))


def image_size(value, root=None):
    """(width, height) from the image header only; None when the image is unreadable."""
    from colossal_sd.data import open_lazily
    try:
        with open_lazily(value, root) as image:
            return image.size
    except Exception:
        return None


def assign_buckets(ds, image_column: str, root, buckets: list) -> list:
    """Bucket index of every row; an unreadable image joins the square-most bucket (its replacement is resized)."""
    square = nearest_bucket(1, 1, buckets)
    assigned = []
    for value in ds[image_column]:
        size = image_size(value, root)
        assigned.append(square if size is None else nearest_bucket(size[0], size[1], buckets))
    return assigned


def histogram(assigned: list, buckets: list) -> str:
    counts = Counter(assigned)
    return ", ".join(f"{buckets[b][1]}x{buckets[b][0]}: {counts[b]}" for b in sorted(counts))


def check_step(step: int, multiple: int, resolution: int) -> int:
    if step % multiple:
        raise UserError(f"--bucket_step {step} is not a multiple of {multiple} (the model's resolution multiple)")
    if step > resolution:
        raise UserError(f"--bucket_step {step} is larger than --resolution {resolution}")
    return step


class BucketBatchSampler:
    """Same-bucket batches, shuffled from (seed, epoch), dealt round-robin to ranks.

    Each bucket's incomplete last batch is dropped and the batch list is cut to a multiple of the world size,
    so every rank gets the same number of full batches (no rank waits on a collective) and no sample is
    seen twice in an epoch. The shuffle changes each epoch, so different samples are left out each time.

    Resumable: `state_dict()` records the epoch and how many batches this rank has been given;
    `load_state_dict()` makes the next iteration skip exactly those.
    """

    def __init__(self, assigned: list, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.assigned = np.asarray(assigned)
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise UserError(f"aspect-ratio bucketing: no bucket holds a full batch of {batch_size} for each of "
                            f"{num_replicas} processes; lower --train_batch_size or add images")

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _all_batches(self) -> list:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket in np.unique(self.assigned):
            members = rng.permutation(np.flatnonzero(self.assigned == bucket))
            full = len(members) // self.batch_size * self.batch_size
            batches += np.split(members[:full], full // self.batch_size) if full else []
        order = rng.permutation(len(batches))
        usable = len(batches) // self.num_replicas * self.num_replicas
        return [batches[i].tolist() for i in order[:usable]]

    def __len__(self):
        per_bucket = np.bincount(self.assigned) // self.batch_size
        return int(per_bucket.sum()) // self.num_replicas

    def __iter__(self):
        mine = self._all_batches()[self.rank::self.num_replicas]
        start = self.position
        for batch in mine[start:]:
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]
