"""The denoising objective: noise a latent at a random timestep, predict the noise (or velocity)."""

import torch
import torch.nn.functional as F


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type}")


def noise_prediction_loss(unet, noise_scheduler, latents, encoder_hidden_states, generator):
    """MSE between the UNet's prediction and the scheduler's target, noise and timesteps drawn from `generator`."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
