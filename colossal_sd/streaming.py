"""Datasets larger than memory: read the rows as a stream, split by node, decoded in worker processes.

Nothing is indexed or held: memory stays flat however many rows there are. The stream repeats (reshuffled
each pass) until the run has its steps, so --max_train_steps sets the length of a streaming run.
"""

import random

import torch

from colossal_sd import data

SHUFFLE_BUFFER = 1000


class StreamingImageCaptions(torch.utils.data.IterableDataset):
    """Decoded samples from a `datasets.IterableDataset`; unreadable images are skipped and counted.

    `length` is the number of samples the run will draw on this rank, so the loop's step count works as usual.
    Inside DataLoader workers, `datasets` gives each worker its own shards, so no row is decoded twice.
    """

    def __init__(self, stream, decoder: data.ImageCaptionDataset, length: int, seed: int, rank: int):
        self.stream, self.decoder, self.length, self.seed, self.rank = stream, decoder, length, seed, rank

    def __len__(self):
        return self.length

    def set_epoch(self, epoch: int):
        pass  # each pass reshuffles itself (see __iter__): the loop runs a streaming run as one epoch

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        skipped, passes = 0, 0
        while True:
            self.stream.set_epoch(passes)
            rows = 0
            for rows, row in enumerate(self.stream, 1):
                rng = random.Random(f"{self.seed}-{self.rank}-{worker_id}-{passes}-{rows}")
                sample = self.decoder.decode(row, rng, self.decoder.resolution)
                if sample is None:
                    skipped += 1
                    continue
                yield {**sample, "skipped": skipped}
                skipped = 0
            if rows == 0:  # this worker got no shard (more workers than shards): it is done
                return
            passes += 1


def build_stream(args, tokenizer, resolution: int, seed: int, info) -> StreamingImageCaptions:
    from datasets.distributed import split_dataset_by_node

    stream = data.load_source(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                              streaming=True, image_column=args.image_column, caption_column=args.caption_column,
                              caption_extension=args.caption_extension)
    stream = data.keep_columns_undecoded(stream, args.image_column, args.caption_column)
    if args.max_train_samples is not None:
        stream = stream.take(args.max_train_samples)
    stream = split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER), info.rank,
                                   info.world_size)
    root = args.train_data_dir
    decoder = data.ImageCaptionDataset(None, tokenizer, args.image_column, args.caption_column, resolution,
                                       args.center_crop, args.random_flip, seed, root,
                                       [data.CaptionOptions.from_args(args)])
    length = args.max_train_steps * args.gradient_accumulation_steps * args.train_batch_size
    return StreamingImageCaptions(stream, decoder, length, seed, info.rank)
