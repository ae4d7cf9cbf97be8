"""Fast checks of the pure parts: the embedded tokenizer and dataset, seeds, sharding."""

import torch

from colossal_sd import distributed, embedded, plugins


def test_embedded_tokenizer_is_the_real_clip_bpe():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(embedded.resolve(embedded.EMBEDDED_MODEL), subfolder="tokenizer")
    # OpenAI CLIP's ids for this sentence
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_embedded_dataset_is_a_captioned_imagefolder():
    import json
    from pathlib import Path
    folder = Path(embedded.resolve(embedded.EMBEDDED_DATASET))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) > 1000
    assert all((folder / r["file_name"]).exists() and r["text"].startswith("an emoji of ") for r in rows[:50])


def test_embedded_vae_is_fitted_to_the_emoji_so_samples_can_show_shapes():
    from pathlib import Path
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(embedded.resolve(embedded.EMBEDDED_MODEL), subfolder="vae")
    images = embedded.load_images(sorted(Path(embedded.resolve(embedded.EMBEDDED_DATASET)).glob("*.png"))[::64],
                                   embedded.TINY_RESOLUTION)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        error = torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, images)
    mean_image_error = torch.nn.functional.mse_loss(images.mean(0, keepdim=True).expand_as(images), images)
    assert error < 0.4 * mean_image_error  # a random VAE decodes to noise, far worse than the mean image
    # what the UNet trains on: unit-variance latents, with sampling noise small against them
    assert 0.8 < (posterior.mean * vae.config.scaling_factor).std() < 1.25
    assert posterior.std.mean() < 0.2 * posterior.mean.std()


def test_rank_seeds_differ_and_repeat():
    seeds = [distributed.rank_seed(42, r) for r in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [distributed.rank_seed(42, r) for r in range(4)]


def test_ranks_get_disjoint_shards():
    engine = [plugins.Engine("none", "no", distributed.DistInfo(r, r, 2, torch.device("cpu")), 1.0)
              for r in range(2)]
    dataset = list(range(10))
    shards = [[int(i) for b in e.prepare_dataloader(dataset, 2, 0, 0, torch.tensor) for i in b] for e in engine]
    assert sorted(shards[0] + shards[1]) == dataset
    assert not set(shards[0]) & set(shards[1])
