"""Seeing the model learn: sample grids for fixed prompts, and a loss on held-out images.

Both run at fixed points (every --validation_steps optimizer steps and/or every --validation_epochs epochs)
and never disturb training: they draw from their own seeded generators, and the global RNG state is
restored afterwards, so a run with validation trains exactly the same weights as one without.

- Images: global rank 0 builds a pipeline around a copy of the current weights (the EMA weights when
  --use_ema is on), generates --num_validation_images per prompt (image i from seed --validation_seed + i, or
  a --validation_prompts_file line's own --d + i; its size, steps, guidance and negative prompt likewise; see
  colossal_sd.sampling), and saves a labelled grid to ``output_dir/samples/step-<N>.png`` (``final.png``
  after training).
- Loss: every rank evaluates its share of the held-out --validation_split with the live model, at the same
  noise and timesteps each time (a fresh generator seeded from --validation_seed), so values are comparable
  across steps; the mean over all ranks is logged as ``val_loss``.
"""

import contextlib
import copy
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from colossal_sd import models, sampling
from colossal_sd.data import collate
from colossal_sd.errors import UserError
from colossal_sd.loss import denoising_loss, sample_noise, sample_timesteps
from colossal_sd.prompt_file import validation_prompts
from colossal_sd.sampling import LABEL_HEIGHT, label_grid  # noqa: F401 (the grid is drawn there, for sample.py too)


def split_off_validation(dataset, fraction: float, seed: int):
    """(training set, held-out set or None). The held-out images never reach the training loop."""
    if not fraction:
        return dataset, None
    check_split_leaves_training_data(len(dataset.ds), fraction)
    parts = dataset.ds.train_test_split(test_size=fraction, seed=seed)
    train, held_out = copy.copy(dataset), copy.copy(dataset)
    train.ds, held_out.ds = parts["train"], parts["test"]
    return train, held_out


def check_split_leaves_training_data(samples: int, fraction: float):
    """datasets holds out ceil(fraction * samples): at least one sample must be left to train on."""
    if math.ceil(fraction * samples) < samples:
        return
    if samples < 2:
        raise UserError(f"--validation_split {fraction} holds out the dataset's only sample; "
                        "drop --validation_split")
    largest = math.floor((samples - 1) / samples * 1000) / 1000  # rounded down, so that it still leaves one
    raise UserError(f"--validation_split {fraction} holds out all {samples} samples, leaving none to train on; "
                    f"use at most {largest:g}")


@contextlib.contextmanager
def preserved_rng(device):
    """Restore Python's, NumPy's and torch's global RNG state (CPU and the GPU in use) on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class Validator:
    def __init__(self, args, engine, parts, resolution, held_out, tracker):
        self.args, self.engine, self.parts = args, engine, parts
        self.resolution, self.tracker = resolution, tracker
        self.device = engine.dist.device
        self.held_out = held_out and torch.utils.data.DataLoader(
            held_out, batch_size=args.train_batch_size, collate_fn=collate,
            sampler=torch.utils.data.DistributedSampler(held_out, engine.dist.world_size, engine.dist.rank,
                                                        shuffle=False))
        self.samples_dir = os.path.join(args.output_dir, "samples")
        # --validation_prompts_file's lines (each with its own size, seed, steps...) or --validation_prompts
        self.prompts = [p.with_defaults(width=resolution, height=resolution, guidance_scale=sampling.DEFAULT_GUIDANCE)
                        for p in validation_prompts(args)]
        self._unet = None  # rank 0's copy for sampling, allocated on first use
        self.encode = models.BatchEncoder(parts, engine.compute_dtype, args.train_text_encoder_lora)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) or self.held_out is not None

    def due(self, step: int, epoch_done: int = None) -> bool:
        """At every --validation_steps step, and at the end of every --validation_epochs epoch (1-based)."""
        steps, epochs = self.args.validation_steps, self.args.validation_epochs
        return self.enabled and (bool(steps) and step % steps == 0 or
                                 epoch_done is not None and bool(epochs) and epoch_done % epochs == 0)

    def run(self, step: int, model, ema):
        """Every rank calls this at the same steps (the loss and gathering sharded weights are collective)."""
        with preserved_rng(self.device):
            if self.held_out is not None:
                self.tracker.scalars(step, {"val_loss": self.loss(model)}, prefix="validation")
            if self.prompts and self.args.use_lora:
                if self.engine.dist.is_main:
                    self.images(f"step-{step}", None, step)
            elif self.prompts:
                weights = ema.weights() if ema is not None else self.engine.full_state_dict(model)
                if self.engine.dist.is_main:
                    self.images(f"step-{step}", weights, step)

    def final(self, weights):
        """After training, on rank 0 only, from the saved weights."""
        if self.prompts and self.engine.dist.is_main:
            with preserved_rng(self.device):
                self.images("final", weights, None)

    @torch.no_grad()
    def loss(self, model) -> float:
        generator = torch.Generator(self.device).manual_seed(self.args.validation_seed + self.engine.dist.rank)
        totals = torch.zeros(2, device=self.device)
        model.eval()
        for batch in self.held_out:
            latents, conditioning = self.encode(batch, self.device, generator)
            noise = sample_noise(latents, generator)
            timesteps = sample_timesteps(self.parts.noise_scheduler, len(latents), generator, self.device)
            noisy = self.parts.noise_scheduler.add_noise(latents, noise, timesteps)
            with self.engine.autocast():
                loss = denoising_loss(model, self.parts.noise_scheduler, latents, noisy, noise, timesteps, conditioning)
            totals += torch.stack([loss.float() * len(latents), torch.tensor(float(len(latents)), device=self.device)])
        model.train()
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    @torch.no_grad()
    def images(self, name: str, weights, step):
        training = self.parts.unet.training
        self.parts.unet.eval()
        try:
            self._images(name, self.pipeline(weights), step)
        finally:
            self.parts.unet.train(training)

    def _images(self, name: str, pipeline, step):
        count = self.args.num_validation_images
        rows = [sampling.generate(pipeline, prompt, sampling.image_seeds(prompt.seed, count))[0]
                for prompt in self.prompts]
        grid = label_grid(rows, [prompt.prompt for prompt in self.prompts])
        os.makedirs(self.samples_dir, exist_ok=True)
        path = os.path.join(self.samples_dir, f"{name}.png")
        grid.save(path)
        self.tracker.image(step, "validation/samples", grid)
        self.tracker.info(f"wrote {path}")

    def pipeline(self, weights):
        """A pipeline around the frozen parts and a rank-0 UNet copy holding `weights`, in the compute dtype.
        `weights` None: the UNet being trained, as it is (LoRA adapters live inside the frozen UNet)."""
        from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

        unet = self.parts.unet
        if weights is not None:
            if self._unet is None:
                self._unet = UNet2DConditionModel.from_config(self.parts.unet.config).eval()
            self._unet.load_state_dict(weights)
            unet = self._unet.to(self.device, self.engine.compute_dtype)
            # Saving the pipeline moves the frozen parts to the CPU in fp32: bring them back
            models.place_frozen(self.parts, self.device, self.engine.compute_dtype)
        # else the live, adapted models: moving or casting them would touch what trains
        # DPM-Solver++ samples well in a few steps; it inherits the training scheduler's betas and prediction type.
        scheduler = DPMSolverMultistepScheduler.from_config(self.parts.noise_scheduler.config)
        components = dict(self.parts.components(), unet=unet, scheduler=scheduler)
        pipeline = self.parts.family.pipeline()(**components, **self.parts.family.pipeline_kwargs())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
