"""The training loop: one function a reader can hold in their head."""

import math
import time

import torch
import torch.distributed as dist

from colossal_sd import distributed, input_pipeline, models, plugins, saving, speed
from colossal_sd.embedded import is_embedded, resolve
from colossal_sd.loss import noise_prediction_loss
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
    try:
        _train(args, info)
    finally:
        distributed.shutdown_distributed()


def _train(args, info):
    engine = plugins.build_engine(args, info)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = distributed.agree_on_seed(args.seed, info)
    build_everything_embedded_first(args, info)

    distributed.seed_everything(seed)  # same initial state on every rank
    parts = models.load_parts(args)
    resolution = models.check_resolution(parts, args.resolution)
    models.prepare_for_training(parts, info.device, engine.compute_dtype, args.gradient_checkpointing,
                                args.enable_xformers_memory_efficient_attention)
    flops_per_sample = speed.unet_flops_per_sample(parts.unet, resolution // parts.vae_scale_factor,
                                                   parts.unet.config.cross_attention_dim, info.device)
    speed.speed_up_unet(parts.unet, info.device, args.compile)
    dataset, dataloader, encode = input_pipeline.build(args, parts, resolution, seed, info, engine)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    images_per_step = args.train_batch_size * args.gradient_accumulation_steps * info.world_size
    lr = args.learning_rate * (images_per_step if args.scale_lr else 1)

    from diffusers.optimization import get_scheduler
    optimizer = engine.make_optimizer([p for p in parts.unet.parameters() if p.requires_grad], lr,
                                      (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    unet, optimizer, lr_scheduler = engine.wrap(parts.unet, optimizer, lr_scheduler)

    tracker = Tracker(info.is_main, max_steps, args.report_to, _logging_dir(args))
    tracker.info(f"plugin={engine.plugin} precision={engine.precision} device={info.device.type} "
                 f"processes={info.world_size} samples={len(dataset)} resolution={resolution} "
                 f"batch/process={args.train_batch_size} accumulation={args.gradient_accumulation_steps} "
                 f"images/step={images_per_step} steps={max_steps} epochs={epochs} seed={seed}")
    tracker.hyperparameters(vars(args))

    # Each rank draws its own noise, so the ranks' gradients differ and averaging them means something.
    generator = torch.Generator(info.device).manual_seed(distributed.rank_seed(seed, info.rank))
    global_step, skipped = 0, torch.zeros((), device=info.device)
    window = _Window(info.device)
    peak_tflops = speed.bf16_peak_tflops(info.device)
    for epoch in range(epochs):
        input_pipeline.set_epoch(dataloader, epoch)
        for micro_step, batch in enumerate(dataloader):
            sync = (micro_step + 1) % args.gradient_accumulation_steps == 0 or micro_step + 1 == len(dataloader)
            with engine.no_sync(unet, optimizer, sync):
                latents, text = encode(batch, info.device, generator)
                with engine.autocast():
                    loss = noise_prediction_loss(unet, parts.noise_scheduler, latents, text, generator)
                engine.backward(loss / args.gradient_accumulation_steps, optimizer)
            window.add(loss.detach(), len(latents))
            skipped += batch["skipped"]
            if not sync:
                continue
            grad_norm = engine.step(unet, optimizer)
            lr_scheduler.step()
            global_step += 1
            tracker.step()
            if global_step % args.logging_steps == 0 or global_step == max_steps:
                tracker.scalars(global_step, speed.with_tflops(window.flush(lr_scheduler.get_last_lr()[0], grad_norm),
                                                               flops_per_sample, peak_tflops, info.world_size))
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break

    dist.all_reduce(skipped)
    if skipped.item():
        tracker.info(f"skipped {int(skipped.item())} unreadable images (each replaced by the next readable one)")
    state = engine.full_state_dict(unet)
    if info.is_main:
        saving.save_pipeline(args.output_dir, parts, state, args)
        tracker.info(f"saved the pipeline to {args.output_dir}")
    distributed.barrier()
    tracker.close()


def _logging_dir(args):
    import os
    return os.path.join(args.output_dir, args.logging_dir)


class _Window:
    """Loss and throughput since the last log line. Values stay on the device until logged: no per-step sync."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.micro_batches = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss, images):
        self.loss_sum += loss
        self.micro_batches += 1
        self.images += images

    def flush(self, lr, grad_norm) -> dict:
        stats = torch.stack([self.loss_sum / max(self.micro_batches, 1),
                             torch.tensor(float(self.images), device=self.device)])
        dist.all_reduce(stats)
        world = dist.get_world_size()
        values = {"loss": stats[0].item() / world, "lr": lr,
                  "images_per_s": stats[1].item() / (time.perf_counter() - self.start)}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.reset()
        return values
