"""The denoising objective: noise a latent at a random timestep, predict the noise (or velocity).

The options (min-SNR weighting, noise offset, input perturbation, timestep range, caption dropout) follow
diffusers' ``train_text_to_image.py``. With prior preservation (colossal_sd.prior_preservation) a batch is B
training samples then B class samples, and the loss is the training half's plus --prior_loss_weight times the
class half's, each half min-SNR-weighted by its own timesteps (diffusers #5791 weighs the halves' losses with the
whole batch's weights). Every random draw comes from the caller's ``generator``, so a run is
reproducible and a resumed run draws exactly what the uninterrupted one would have; an option left off draws
nothing.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossOptions:
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # exclusive; None: the scheduler's num_train_timesteps
    prior_loss_weight: Optional[float] = None  # None: batches are not paired with class samples

    @classmethod
    def from_args(cls, args) -> "LossOptions":
        from colossal_sd.prior_preservation import pairs
        return cls(args.snr_gamma, args.noise_offset, args.input_perturbation, args.min_timestep, args.max_timestep,
                   args.prior_loss_weight if pairs(args) else None)

    def checked(self, noise_scheduler) -> "LossOptions":
        total = noise_scheduler.config.num_train_timesteps
        if (self.max_timestep or 0) > total or self.min_timestep >= total:
            from colossal_sd.errors import UserError
            raise UserError(f"--min_timestep/--max_timestep must lie within the scheduler's {total} timesteps")
        return self


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type}")


def sample_timesteps(noise_scheduler, batch_size, generator, device, options=LossOptions()):
    """Uniform integer timesteps in [min_timestep, max_timestep)."""
    high = options.max_timestep or noise_scheduler.config.num_train_timesteps
    return torch.randint(options.min_timestep, high, (batch_size,), generator=generator, device=device)


def sample_noise(latents, generator, noise_offset=0.0):
    """Gaussian noise; a noise offset adds one shared value per image and channel, so the model learns to
    shift overall brightness (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                            device=latents.device, dtype=latents.dtype)
    return noise


def perturb(noise, generator, input_perturbation):
    """The noise actually added to the latents: the target stays the unperturbed noise
    (input perturbation, https://arxiv.org/abs/2301.11706)."""
    if not input_perturbation:
        return noise
    return noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device,
                                                    dtype=noise.dtype)


def min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    """Per-sample loss weights of min-SNR-gamma (https://arxiv.org/abs/2303.09556).

    For epsilon the weight is min(SNR, gamma) / SNR. A v-prediction loss is already (SNR + 1) times an
    epsilon-equivalent one, so its weight is min(SNR, gamma) / (SNR + 1).
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def per_sample_mse(prediction, target):
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))


def weighted_mse(prediction, target, weights=None):
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    return (per_sample_mse(prediction, target) * weights).mean()


def training_loss(unet, noise_scheduler, latents, conditioning, generator, options=LossOptions()):
    """(the loss to minimise, the parts of it to log: {} or the instance and prior losses, detached)."""
    if options.prior_loss_weight is None:
        return noise_prediction_loss(unet, noise_scheduler, latents, conditioning, generator, options), {}
    prediction, target, timesteps = _predict(unet, noise_scheduler, latents, conditioning, generator, options)
    loss, instance, prior = prior_preservation_loss(prediction, target, timesteps, noise_scheduler,
                                                    options.snr_gamma, options.prior_loss_weight)
    return loss, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}


def noise_prediction_loss(unet, noise_scheduler, latents, conditioning, generator, options=LossOptions()):
    """MSE between the UNet's prediction and the scheduler's target, noise and timesteps drawn from `generator`.
    `conditioning`: the model's keyword arguments (models.BatchEncoder), or the text embeddings alone."""
    prediction, target, timesteps = _predict(unet, noise_scheduler, latents, conditioning, generator, options)
    weights = None if options.snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, options.snr_gamma)
    return weighted_mse(prediction, target, weights)


def _predict(unet, noise_scheduler, latents, conditioning, generator, options):
    """(prediction, target, timesteps) at freshly drawn noise and timesteps."""
    noise = sample_noise(latents, generator, options.noise_offset)
    timesteps = sample_timesteps(noise_scheduler, latents.shape[0], generator, latents.device, options)
    noisy_latents = noise_scheduler.add_noise(latents, perturb(noise, generator, options.input_perturbation),
                                              timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    return _unet_prediction(unet, noisy_latents, timesteps, conditioning), target, timesteps


def prior_preservation_loss(prediction, target, timesteps, noise_scheduler, snr_gamma, prior_loss_weight):
    """(loss, instance loss, prior loss) of a batch of B training samples then B class samples. Each half's
    min-SNR weights are its own samples' (diffusers #5791 multiplies a half's losses by the whole batch's)."""
    per_sample = per_sample_mse(prediction, target)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    instance, prior = per_sample.chunk(2)
    instance, prior = instance.mean(), prior.mean()
    return instance + prior_loss_weight * prior, instance, prior


def _unet_prediction(unet, noisy_latents, timesteps, conditioning):
    if not isinstance(conditioning, dict):
        conditioning = {"encoder_hidden_states": conditioning}
    return unet(noisy_latents, timesteps, **conditioning, return_dict=False)[0]


def denoising_loss(unet, noise_scheduler, latents, noisy_latents, noise, timesteps, conditioning, snr_gamma=None):
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    prediction = _unet_prediction(unet, noisy_latents, timesteps, conditioning)
    weights = None if snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return weighted_mse(prediction, target, weights)


def drop_captions(input_ids, empty_ids, probability, generator):
    """Replace each caption by the empty one with `probability`: the unconditional half of classifier-free
    guidance."""
    if not probability:
        return input_ids
    drop = torch.rand(input_ids.shape[0], generator=generator, device=generator.device) < probability
    drop = drop.view(-1, *[1] * (input_ids.ndim - 1))  # one row of ids per caption, or one per text encoder
    return torch.where(drop.to(input_ids.device), empty_ids.to(input_ids.device), input_ids)
