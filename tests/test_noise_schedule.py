"""--rescale_betas_zero_snr: zero terminal SNR in training, trailing timesteps in every sampler that follows."""

import json

import numpy as np
import pytest
import torch

from colossal_sd import loss, noise_schedule
from colossal_sd.errors import UserError
from conftest import FAST, load_pipeline, run_trainer, sample
from test_bad_input import assert_one_line_error
from test_quality_units import hand_snr, sd_scheduler


def test_zero_snr_makes_the_last_timestep_pure_noise_and_min_snr_stays_finite_for_v():
    scheduler = noise_schedule.training_scheduler(sd_scheduler("epsilon"), "v_prediction", zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0 and sd_scheduler().alphas_cumprod[-1] > 0
    t = torch.tensor([5, 200, 999])
    snr = hand_snr(scheduler, t)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    weights = loss.min_snr_weights(scheduler, t, 5.0)
    assert torch.isfinite(weights).all() and weights[2] == 0  # pure noise: nothing to learn about the image
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=0)


def test_zero_snr_refuses_epsilon():
    with pytest.raises(UserError, match="add --prediction_type v_prediction"):
        noise_schedule.training_scheduler(sd_scheduler("epsilon"), None, zero_snr=True)


def test_samplers_follow_with_trailing_timesteps():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    for given, expected in ((PNDMScheduler(), "DDIMScheduler"), (EulerDiscreteScheduler(), "EulerDiscreteScheduler")):
        scheduler = noise_schedule.sampler(given, "v_prediction", zero_snr=True)
        assert type(scheduler).__name__ == expected
        assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
        scheduler.set_timesteps(4)
        assert scheduler.timesteps[0] == 999  # sampling starts from the pure noise the model learnt


def test_a_zero_snr_run_saves_a_pipeline_that_samples_from_pure_noise(tmp_path):
    out = tmp_path / "out"
    run_trainer(*FAST, "--rescale_betas_zero_snr", "--prediction_type", "v_prediction", "--output_dir", out)
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["rescale_betas_zero_snr"] and saved["timestep_spacing"] == "trailing"
    assert saved["prediction_type"] == "v_prediction"
    assert np.isfinite(sample(load_pipeline(out))).all()


def test_zero_snr_with_epsilon_is_one_clear_line(tmp_path):
    proc = run_trainer(*FAST, "--rescale_betas_zero_snr", "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, "--rescale_betas_zero_snr needs v-prediction")
