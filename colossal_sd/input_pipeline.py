"""From the data flags to what the loop consumes: the dataset, its dataloader, and the batch encoder.

    --streaming               rows streamed, decoded in workers          (colossal_sd.streaming)
    --aspect_ratio_bucketing  same-bucket batches, sharded across ranks  (colossal_sd.buckets)
    --cache_latents / --cache_text_embeddings  encode once, ever          (colossal_sd.caching)
    --dataset_config          several subsets mixed into one set         (colossal_sd.dataset_config)
    --with_prior_preservation / --reg_data_dir  batches of training + class samples  (colossal_sd.prior_preservation)
"""

import gc

import numpy as np
import torch
from torch.utils.data import DataLoader

from colossal_sd import buckets, caching, data, models, prior_preservation, streaming, validation


def build(args, parts, resolution: int, seed: int, info, engine, stop_request):
    """(dataset, held-out set or None, dataloader, encode); encode(batch, device, generator) -> (latents,
    conditioning), a models.BatchEncoder. A signal while caching stops the run (errors.CleanStop) with the
    finished shards kept."""
    say = (lambda message: print(message, flush=True)) if info.is_main else (lambda message: None)
    encode = models.BatchEncoder(parts, engine.compute_dtype, args.train_text_encoder_lora)
    pin = info.device.type == "cuda"
    if args.streaming:
        dataset = streaming.build_stream(args, parts.caption_tokenizer, resolution, seed, info)
        return dataset, None, DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=data.collate,
                                         num_workers=args.dataloader_num_workers, pin_memory=pin), encode
    if args.with_prior_preservation:
        prior_preservation.make_class_images(args, parts, resolution, seed, info, engine, say)
    images = prior_preservation.build_dataset(args, parts.caption_tokenizer, resolution, seed, say)
    images, held_out = validation.split_off_validation(images, args.validation_split, seed)
    dataset, batch_sampler = images, None
    if args.aspect_ratio_bucketing:
        batch_sampler = _bucket(args, parts, resolution, seed, info, dataset, say)
    if args.cache_latents or args.cache_text_embeddings:
        dataset = _cache(args, parts, dataset, info, engine, say, stop_request)
    if batch_sampler is None:
        dataset, collate = prior_preservation.paired(dataset, images, args.prior_loss_weight, say)
        return dataset, held_out, engine.prepare_dataloader(dataset, args.train_batch_size, seed,
                                                            args.dataloader_num_workers, collate), encode
    return dataset, held_out, DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=data.collate,
                                         num_workers=args.dataloader_num_workers, pin_memory=pin), encode


def set_epoch(dataloader, epoch: int):
    """Reshuffle for a new epoch, whichever of dataset, sampler and batch sampler shuffles."""
    for part in (dataloader.dataset, dataloader.sampler, dataloader.batch_sampler):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def skip_batches(dataloader, batches: int, batch_size: int, log):
    """Start the current epoch after its first `batches` batches (a resumed run) without decoding them."""
    if not batches:
        return
    if isinstance(dataloader.batch_sampler, buckets.BucketBatchSampler):
        dataloader.batch_sampler.position = batches
    elif hasattr(dataloader.sampler, "skip"):
        dataloader.sampler.skip(batches * batch_size)
    else:  # a stream has no index to skip to
        log("streaming: the resumed run starts a fresh pass over the stream, so its data order differs from "
            "an uninterrupted run's")


def _bucket(args, parts, resolution, seed, info, dataset, say) -> buckets.BucketBatchSampler:
    step = buckets.check_step(args.bucket_step or parts.resolution_multiple, parts.resolution_multiple, resolution)
    table = buckets.make_buckets(resolution, step, args.max_aspect_ratio)
    assigned = buckets.assign_buckets(dataset.ds, dataset.image_column, dataset.root, table)  # one per row
    say("buckets (width x height: images): " + buckets.histogram(assigned, table))
    dataset.sizes = [table[b] for b in assigned]
    per_sample = [assigned[row] for row in dataset.rows]  # an image's repeats share its bucket
    return buckets.BucketBatchSampler(per_sample, args.train_batch_size, info.world_size, info.rank, seed)


def _cache(args, parts, dataset, info, engine, say, stop_request) -> caching.CachedDataset:
    what = {"latents": args.cache_latents, "text": args.cache_text_embeddings, "flip": args.random_flip,
            "text_outputs": list(parts.family.text_outputs),
            "resolution": dataset.resolution, "crop": "center",
            "buckets": sorted(set(dataset.sizes)) if dataset.sizes else None,
            **(dataset.caption_key() if args.cache_text_embeddings else {})}
    if args.cache_latents and not args.center_crop:
        say("cache: latents are cached centre-cropped (a new random crop each step cannot be cached)")
    store_dtype = np.float32 if engine.compute_dtype == torch.float32 else np.float16
    directory = caching.build_cache(parts, dataset, dataset.sizes, dict(what, cache_dir=args.cache_dir), info,
                                    store_dtype, say, stop_request)
    # Everything is cached: the encoders are not needed until saving, which reloads them from the source;
    # unless validation still encodes and samples, or the source is a single file's configs only.
    if not (args.validation_prompts or getattr(args, "validation_prompts_file", None) or args.validation_split
            or parts.single_file):
        freed = [name for name in ([*parts.text_encoders] if args.cache_text_embeddings else []) +
                 (["vae"] if args.cache_latents else [])]
        if args.cache_latents:
            parts.vae = None
        if args.cache_text_embeddings:
            parts.text_encoders = None
        if freed:
            say(f"cache: freed {', '.join(freed)} until saving (everything they encode is cached)")
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return caching.CachedDataset(directory, dataset, what, getattr(args, "caption_dropout", 0.0) or 0.0)
