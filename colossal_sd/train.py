"""The training loop: one function a reader can hold in their head."""

import math
import time

import torch
import torch.distributed as dist

from colossal_sd import config_file, data, distributed, ema, final_outputs, input_pipeline, lora, models, plugins
from colossal_sd import resume_match, run_lock, saving, single_file, speed, storage, validation
from colossal_sd.checkpoint import Checkpointer
from colossal_sd.divergence import DivergenceGuard
from colossal_sd.embedded import is_embedded, resolve
from colossal_sd.fingerprint import base_model_fingerprint
from colossal_sd.loss import LossOptions, drop_captions, training_loss
from colossal_sd.preemption import StopRequest, signalled_during_final_save
from colossal_sd.tracking import Tracker


def build_everything_embedded_first(args, info):
    """Build embedded assets once per node before every rank reads them."""
    if info.local_rank == 0:
        for name in (args.pretrained_model_name_or_path, args.dataset_name):
            if is_embedded(name):
                resolve(name)
    distributed.barrier()


def train(args):
    info = distributed.init_distributed()
    stop_request = StopRequest()  # from the start: a signal at any point is a flag, never a traceback
    try:
        storage.check_paths(args, info)  # before any heavy work: an unwritable --output_dir is one line now
        say = (lambda message: print(message, flush=True)) if info.is_main else (lambda message: None)
        with run_lock.hold(args.output_dir, info, say), storage.write_failures_as_one_line(args):
            _train(args, info, stop_request)
    finally:
        stop_request.close()
        distributed.shutdown_distributed()


def _train(args, info, stop_request):
    engine = plugins.build_engine(args, info)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = distributed.agree_on_seed(args.seed, info)
    if info.is_main:  # output_dir/training_config.toml: what reruns this run
        config_file.save_effective_config(args, seed)
    build_everything_embedded_first(args, info)

    distributed.seed_everything(seed)  # same initial state on every rank
    parts = models.load_parts(args)
    base_model = base_model_fingerprint(parts)  # before a resume or caching changes or frees any part
    storage.warn_if_short_of_space(args, parts, info)
    resolution = models.check_resolution(parts, args.resolution)
    models.prepare_for_training(parts, info.device, engine.compute_dtype, args.gradient_checkpointing,
                                args.enable_xformers_memory_efficient_attention)
    flops_per_sample = speed.unet_flops_per_sample(parts, resolution // parts.vae_scale_factor)
    speed.speed_up_unet(parts.unet, info.device, args.compile)
    dataset, held_out, dataloader, encode = input_pipeline.build(args, parts, resolution, seed, info, engine,
                                                                     stop_request)
    loss_options = LossOptions.from_args(args).checked(parts.noise_scheduler)
    empty_caption = parts.empty_ids

    batches_per_epoch = len(dataloader)  # the sampler shortens len(dataloader) in an epoch resumed midway
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    images_per_step = args.train_batch_size * args.gradient_accumulation_steps * info.world_size
    lr = args.learning_rate * (images_per_step if args.scale_lr else 1)

    from diffusers.optimization import get_scheduler
    trainable = lora.add_lora(engine, parts, args) if args.use_lora else parts.unet
    optimizer = engine.make_optimizer([p for p in trainable.parameters() if p.requires_grad], lr,
                                      (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    unet, optimizer, lr_scheduler = engine.wrap(trainable, optimizer, lr_scheduler)
    ema_model = ema.maybe_create(args, engine, unet)

    tracker = Tracker(info.is_main, max_steps, args.report_to, _logging_dir(args))
    tracker.info(f"model={parts.family.name} plugin={engine.plugin} precision={engine.precision} "
                 f"device={info.device.type} "
                 f"processes={info.world_size} samples={len(dataset)} resolution={resolution} "
                 f"batch/process={args.train_batch_size} accumulation={args.gradient_accumulation_steps} "
                 f"images/step={images_per_step} steps={max_steps} epochs={epochs} seed={seed}")
    tracker.hyperparameters(vars(args))
    if args.use_lora:
        tracker.info(lora.describe(trainable, args))
    validator = validation.Validator(args, engine, parts, resolution, held_out, tracker)

    # Each rank draws its own noise, so the ranks' gradients differ and averaging them means something.
    generator = torch.Generator(info.device).manual_seed(distributed.rank_seed(seed, info.rank))
    guard = DivergenceGuard(args, engine, optimizer, before_stop=tracker.close)
    checkpointer = Checkpointer(args, info, engine, unet, optimizer, lr_scheduler, parts, stop_request,
                                log=tracker.info, before_save=guard.check_weights,
                                extras={"ema": ema_model} if ema_model is not None else None,
                                must_match=resume_match.must_match(images_per_step, resolution, base_model))
    global_step, start_epoch, start_batch = checkpointer.resume(generator, batches_per_epoch, max_steps)
    if info.is_main:
        final_outputs.set_aside_earlier_outputs(args.output_dir, tracker.info)
    tracker.step(global_step)
    skipped, stopped = torch.zeros((), device=info.device), False
    window = _Window(info.device, loss_scaled=engine.precision == "fp16")
    peak_tflops = speed.bf16_peak_tflops(info.device)
    for epoch in range(start_epoch, epochs):
        input_pipeline.set_epoch(dataloader, epoch)
        first = start_batch if epoch == start_epoch else 0
        input_pipeline.skip_batches(dataloader, first, args.train_batch_size, tracker.info)
        for micro_step, batch in enumerate(dataloader, start=first):
            accumulation = _group_size(micro_step, args.gradient_accumulation_steps, batches_per_epoch)
            sync = (micro_step + 1) % args.gradient_accumulation_steps == 0 or micro_step + 1 == batches_per_epoch
            with engine.no_sync(unet, optimizer, sync):
                if "input_ids" in batch:  # cached text embeddings drop their captions in the dataset
                    batch["input_ids"] = drop_captions(batch["input_ids"].to(info.device, non_blocking=True),
                                                       empty_caption, args.caption_dropout, generator)
                latents, conditioning = encode(batch, info.device, generator)
                with engine.autocast():
                    loss, loss_parts = training_loss(unet, parts.noise_scheduler, latents, conditioning, generator,
                                                     loss_options)
                engine.backward(loss / accumulation, optimizer)
            window.add(loss.detach(), len(latents), loss_parts)
            skipped += batch["skipped"]
            if not sync:
                continue
            grad_norm = engine.step(unet, optimizer)
            lr_scheduler.step()
            ema.update(ema_model, args.use_ema, engine, unet)
            global_step += 1
            tracker.step()
            if global_step % args.logging_steps == 0 or global_step == max_steps:
                logged = window.flush(lr_scheduler.get_last_lr()[0], grad_norm)
                tracker.scalars(global_step, speed.with_tflops(logged, flops_per_sample, peak_tflops, info.world_size))
                guard.check_logged(global_step, logged)
            if validator.due(global_step, epoch + 1 if micro_step + 1 == batches_per_epoch else None):
                validator.run(global_step, unet, ema_model)
            stopped = checkpointer.after_step(global_step, epoch, micro_step + 1, generator, max_steps)
            if global_step >= max_steps or stopped:
                break
        if global_step >= max_steps or stopped:
            break
    if stopped:
        tracker.close()
        return

    guard.check_weights(global_step)
    tracker.info(f"saving the {'LoRA weights' if args.use_lora else 'pipeline'} to {args.output_dir}")
    engine.release_optimizer_state(optimizer)
    dist.all_reduce(skipped)
    if skipped.item():
        tracker.info(f"skipped {int(skipped.item())} unreadable images (each replaced by the next readable one)")
    state = None if args.use_lora else engine.full_state_dict(unet)
    if info.is_main and args.use_lora:
        lora.save_lora_outputs(engine.unwrap(unet), parts, args,
                               {"resolution": resolution, "steps": max_steps, "seed": seed,
                                "plugin": engine.plugin, "precision": engine.precision})
        tracker.info(f"saved the LoRA weights to {args.output_dir}")
    elif info.is_main:
        state = ema.save_raw_and_average(ema_model, state, args.output_dir, parts)
        saving.save_pipeline(args.output_dir, parts, state, args)
        tracker.info(f"saved the pipeline to {args.output_dir}")
        if args.save_single_file:
            tracker.info(f"saved the single-file checkpoint {single_file.save_single_file(args.output_dir)}")
    if info.is_main:
        final_outputs.mark_complete(args.output_dir, global_step, seed, args)
    if not signalled_during_final_save(stop_request, info, args.output_dir, tracker.info):
        validator.final(state)
    distributed.barrier()
    tracker.close()


def _group_size(micro_step, accumulation_steps, micro_steps_per_epoch):
    """Micro-batches in this one's accumulation group: the epoch's last group may be short, and its mean loss
    must not be scaled down for that."""
    group_start = micro_step - micro_step % accumulation_steps
    return min(accumulation_steps, micro_steps_per_epoch - group_start)


def _logging_dir(args):
    import os
    return os.path.join(args.output_dir, args.logging_dir)


class _Window:
    """Loss and throughput since the last log line. Values stay on the device until logged: no per-step sync.

    Under fp16 loss scaling a non-finite loss is a step the scaler skips: it is counted (`skipped_losses`) and
    left out of the mean, which becomes nan only when every loss of the window was non-finite. The loss's parts
    (prior preservation's instance_loss and prior_loss) are averaged alike."""

    def __init__(self, device, loss_scaled: bool = False):
        self.device, self.loss_scaled = device, loss_scaled
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.part_sums = {}
        self.skipped = torch.zeros((), device=self.device)
        self.micro_batches = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss, images, parts=None):
        parts = parts or {}
        if self.loss_scaled:
            finite = torch.isfinite(loss)
            loss = torch.where(finite, loss, 0.0)
            parts = {name: torch.where(finite, value, 0.0) for name, value in parts.items()}
            self.skipped += ~finite
        self.loss_sum += loss
        for name, value in parts.items():
            self.part_sums[name] = self.part_sums.get(name, 0.0) + value
        self.micro_batches += 1
        self.images += images

    def flush(self, lr, grad_norm) -> dict:
        counted = self.micro_batches - self.skipped
        names = sorted(self.part_sums)  # the same on every rank: every rank's batches are alike
        stats = torch.stack([self.loss_sum, counted, torch.tensor(float(self.images), device=self.device),
                             self.skipped, *(self.part_sums[name] for name in names)])
        dist.all_reduce(stats)
        loss_sum, counted, images, skipped, *part_sums = stats.tolist()
        values = {"loss": loss_sum / counted if counted else math.nan, "lr": lr,
                  "images_per_s": images / (time.perf_counter() - self.start)}
        values.update({name: total / counted if counted else math.nan for name, total in zip(names, part_sums)})
        if skipped:
            values["skipped_losses"] = skipped
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.reset()
        return values
