"""Where in the data a run stands, and a sampler that can start mid-epoch without decoding what it skips."""

import itertools

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can drop the first indices of the current epoch.

    A resumed run must see exactly the batches the interrupted run had not yet seen. Skipping sampler
    indices, rather than iterating over batches and throwing them away, costs nothing: no image is decoded.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = 0

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        self.skipped = 0  # a skip only ever applies to the epoch the run resumes in

    def skip(self, samples: int):
        self.skipped = samples

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skipped, None)

    def __len__(self):
        return super().__len__() - self.skipped


def start_of(epoch: int, batches_done: int, batches_per_epoch: int) -> tuple:
    """(epoch, batches to skip in it) for a run that stopped after `batches_done` batches of `epoch`."""
    if batches_done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, batches_done
