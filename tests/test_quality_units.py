"""The maths of the loss options and EMA, against hand computations; validation's pure parts."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from colossal_sd import ema, loss, validation
from colossal_sd.errors import UserError
from parse_arguments import parse_args


def sd_scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def hand_snr(scheduler, t):
    a = scheduler.alphas_cumprod[t].double()
    return a / (1 - a)


@pytest.mark.parametrize("prediction_type,denominator", [("epsilon", 0), ("v_prediction", 1)])
def test_min_snr_weights(prediction_type, denominator):
    scheduler = sd_scheduler(prediction_type)
    t = torch.tensor([5, 200, 999])
    snr = hand_snr(scheduler, t)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + denominator)
    torch.testing.assert_close(loss.min_snr_weights(scheduler, t, 5.0).double(), expected, rtol=1e-4, atol=0)
    # low noise (t=5) is down-weighted; at high noise epsilon keeps weight 1 and v gets snr/(snr+1) < 1
    weights = loss.min_snr_weights(scheduler, t, 5.0)
    assert weights[0] < 0.1 and (weights[2] == 1 if denominator == 0 else weights[2] < 0.01)


def test_weighted_mse_weights_each_sample():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    assert loss.weighted_mse(prediction, target).item() == pytest.approx((1 + 4) / 2)
    assert loss.weighted_mse(prediction, target, torch.tensor([0.5, 0.25])).item() == pytest.approx((0.5 + 1) / 2)


def test_noise_offset_adds_one_value_per_image_and_channel():
    latents = torch.zeros(2, 4, 3, 3)
    noise = loss.sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.1)
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(2, 4, 3, 3, generator=g) + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, expected)
    plain = loss.sample_noise(latents, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)))


def test_timesteps_stay_in_the_range():
    scheduler = sd_scheduler()
    t = loss.sample_timesteps(scheduler, 2000, torch.Generator().manual_seed(0), "cpu",
                              loss.LossOptions(min_timestep=100, max_timestep=103))
    assert set(t.tolist()) == {100, 101, 102}
    with pytest.raises(UserError, match="within the scheduler's 1000"):
        loss.LossOptions(max_timestep=1001).checked(scheduler)


def test_caption_dropout_replaces_the_drawn_captions_by_the_empty_one():
    ids, empty = torch.arange(8).reshape(4, 2), torch.tensor([-1, -1])
    assert loss.drop_captions(ids, empty, 0.0, None) is ids
    dropped = loss.drop_captions(ids, empty, 0.5, torch.Generator().manual_seed(1))
    drop = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < drop.sum() < 4
    assert torch.equal(dropped[drop], empty.expand(int(drop.sum()), 2))
    assert torch.equal(dropped[~drop], ids[~drop])


class RecordingUNet(torch.nn.Module):
    """Predicts zeros and remembers its input."""

    def forward(self, noisy_latents, timesteps, encoder_hidden_states=None, return_dict=False):
        self.seen = (noisy_latents, timesteps)
        return (torch.zeros_like(noisy_latents),)


def test_input_perturbation_noises_the_input_but_not_the_target():
    scheduler, unet = sd_scheduler(), RecordingUNet()
    latents = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    options = loss.LossOptions(input_perturbation=0.1)
    value = loss.noise_prediction_loss(unet, scheduler, latents, None, torch.Generator().manual_seed(0), options)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    perturbed = noise + 0.1 * torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(unet.seen[0], scheduler.add_noise(latents, perturbed, t))
    assert torch.equal(unet.seen[1], t)
    assert value.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-6)  # target is the clean noise


def test_every_loss_flag_reaches_the_loss_options():
    args = parse_args(["--snr_gamma", "5", "--noise_offset", "0.05", "--input_perturbation", "0.1",
                       "--min_timestep", "10", "--max_timestep", "900"])
    assert loss.LossOptions.from_args(args) == loss.LossOptions(5.0, 0.05, 0.1, 10, 900)


@pytest.mark.parametrize("argv,message", [
    (["--caption_dropout", "1"], "--caption_dropout must be in [0, 1)"),
    (["--validation_split", "-0.1"], "--validation_split must be in [0, 1)"),
    (["--min_timestep", "500", "--max_timestep", "400"], "--min_timestep < --max_timestep"),
    (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1) (got 1.5)"),
    (["--snr_gamma", "0"], "--snr_gamma must be a finite number > 0"),
    (["--num_validation_images", "0"], "must be at least 1"),
])
def test_bad_quality_flags(argv, message):
    import re
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(argv)


# ---------------------------------------------------------------- EMA


def test_ema_follows_diffusers_decay_schedule():
    w = [torch.tensor([float(i)]) for i in (1, 2, 3, 4)]
    average = ema.EMA({"w": w[0]}, decay=0.2)
    for value in w:
        average.update({"w": value})
    # update 1 copies; then decay min(0.2, (1+t)/(10+t)) for t = 1, 2, 3 -> 2/11, 0.2, 0.2
    expected = 1.0
    expected = 2 / 11 * expected + 9 / 11 * 2
    expected = 0.2 * expected + 0.8 * 3
    expected = 0.2 * expected + 0.8 * 4
    assert average.weights()["w"].item() == pytest.approx(expected)


def test_ema_state_dict_round_trip_and_offload():
    average = ema.EMA({"w": torch.ones(2, dtype=torch.bfloat16)}, 0.9, offload_to_cpu=True)
    assert average.shadow["w"].dtype == torch.float32 and average.shadow["w"].device.type == "cpu"
    average.update({"w": torch.zeros(2)})
    average.update({"w": torch.zeros(2)})
    restored = ema.EMA({"w": torch.full((2,), 7.0)}, 0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 2 and restored.decay == 0.9
    assert torch.equal(restored.weights()["w"], average.weights()["w"])


class FakeEngine(SimpleNamespace):
    def unwrap(self, model):
        return model


def test_full_weights_reads_replicated_parameters_on_rank_0_only():
    model = torch.nn.Linear(2, 2)
    main = FakeEngine(plugin="torch_ddp", dist=SimpleNamespace(is_main=True))
    other = FakeEngine(plugin="low_level_zero", dist=SimpleNamespace(is_main=False))
    assert set(ema.full_weights(main, model)) == {"weight", "bias"}
    assert ema.full_weights(other, model) is None


def test_full_weights_gathers_gemini_on_every_rank():
    calls = []

    class GeminiLike:
        def state_dict(self, only_rank_0):
            calls.append(only_rank_0)
            return {"w": torch.ones(1)}

    for is_main in (True, False):
        got = ema.full_weights(FakeEngine(plugin="gemini", dist=SimpleNamespace(is_main=is_main)), GeminiLike())
        assert (got is not None) == is_main
    assert calls == [True, True]  # collective: every rank takes part


# ---------------------------------------------------------------- validation


def test_label_grid_has_a_labelled_row_per_prompt():
    from PIL import Image
    rows = [[Image.new("RGB", (32, 32), "red")] * 3, [Image.new("RGB", (32, 32), "blue")] * 3]
    grid = validation.label_grid(rows, ["a", "b"], 64)
    assert grid.size == (192, 2 * (64 + validation.LABEL_HEIGHT))
    band = np.asarray(grid)[:validation.LABEL_HEIGHT]
    assert (band < 128).any()  # the label is drawn
    assert tuple(np.asarray(grid)[validation.LABEL_HEIGHT + 5, 5]) == (255, 0, 0)


def test_validation_leaves_the_global_rng_alone():
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with validation.preserved_rng(torch.device("cpu")):
        torch.rand(5), random.random(), np.random.rand()
    assert (torch.rand(1), random.random(), np.random.rand()) == expected


def test_held_out_split_is_disjoint_from_training():
    import datasets
    data = SimpleNamespace(ds=datasets.Dataset.from_dict({"i": list(range(40))}))
    train, held_out = validation.split_off_validation(data, 0.1, seed=0)
    assert len(held_out.ds) == 4 and len(train.ds) == 36
    assert not set(train.ds["i"]) & set(held_out.ds["i"])
    assert validation.split_off_validation(data, 0.0, 0) == (data, None)
