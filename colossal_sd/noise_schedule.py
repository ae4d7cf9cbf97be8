"""The noise schedule a run trains on, and the samplers that go with it.

``--rescale_betas_zero_snr`` is zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed"; kohya's ``--zero_terminal_snr``): SD's betas leave a trace of the image at the last timestep,
so a model never learns to start from pure noise, which is where sampling starts, and its images stay mid-grey.
Rescaled betas (diffusers' schedulers' ``rescale_betas_zero_snr=True``) make the last timestep pure noise, and
sampling must then start there: ``timestep_spacing="trailing"``. At zero SNR an epsilon model cannot tell the
image from the noise, so the paper trains v-prediction; so do we.

The saved pipeline's scheduler and validation's sampler carry the same settings, so what the run trained is what
its samples, a UI (via the single file's metadata) and sample.py use.
"""

import inspect

from colossal_sd.errors import UserError

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def overrides(prediction_type, zero_snr: bool) -> dict:
    return {**({"prediction_type": prediction_type} if prediction_type else {}), **(ZERO_SNR if zero_snr else {})}


def training_scheduler(scheduler, prediction_type=None, zero_snr=False):
    """The training scheduler (DDPM) with --prediction_type and --rescale_betas_zero_snr applied."""
    changes = overrides(prediction_type, zero_snr)
    if zero_snr and changes.get("prediction_type", scheduler.config.prediction_type) != "v_prediction":
        raise UserError("--rescale_betas_zero_snr needs v-prediction (at zero SNR an epsilon model cannot recover "
                        "the image); add --prediction_type v_prediction")
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


def sampler(scheduler, prediction_type=None, zero_snr=False):
    """A pipeline's scheduler sampling what the run trained. One that cannot rescale its betas (PNDM) becomes
    DDIM, the paper's sampler."""
    from diffusers import DDIMScheduler

    changes = overrides(prediction_type, zero_snr)
    if not changes:
        return scheduler
    cls = type(scheduler)
    if zero_snr and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = DDIMScheduler
    return cls.from_config(scheduler.config, **changes)
