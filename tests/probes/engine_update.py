"""Run under torchrun: one optimizer step of the engine with SGD(lr=1) on fixed samples; rank 0 saves the update.

With plain SGD at lr 1 the update is exactly the gradient the engine hands the optimizer (accumulated, averaged
across ranks, clipped), so tests can compare gradients across process counts, batch sizes and accumulation.

    python -m torch.distributed.run --nproc_per_node N engine_update.py CASES.json
    CASES.json: [{"flags": [trainer flags], "batch": B, "accumulation": A, "out": "update.pt"}, ...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import parse_arguments  # noqa: E402
from colossal_sd import distributed, plugins  # noqa: E402
from colossal_sd.embedded import EMBEDDED_MODEL, resolve  # noqa: E402


def fixed_sample(index, config):
    """Noisy latent, timestep, text and target of sample `index`: the same whichever rank or batch it lands in."""
    g = torch.Generator().manual_seed(1000 + index)
    size = config.sample_size // 2
    latent = torch.randn(1, config.in_channels, size, size, generator=g)
    timestep = torch.randint(0, 1000, (1,), generator=g)
    text = torch.randn(1, 8, config.cross_attention_dim, generator=g)
    return latent, timestep, text, torch.randn(latent.shape, generator=g)


def micro_batch(config, rank, world, batch, micro):
    first = (micro * world + rank) * batch
    samples = [fixed_sample(i, config) for i in range(first, first + batch)]
    return [torch.cat(column) for column in zip(*samples)]


def one_update(case, info):
    from diffusers import UNet2DConditionModel
    args = parse_arguments.parse_args(case["flags"])
    engine = plugins.build_engine(args, info)
    unet = UNet2DConditionModel.from_pretrained(resolve(EMBEDDED_MODEL), subfolder="unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    model, optimizer, _ = engine.wrap(unet, torch.optim.SGD(unet.parameters(), lr=1.0), None)
    accumulation = case["accumulation"]
    for micro in range(accumulation):
        latent, t, text, target = micro_batch(unet.config, info.rank, info.world_size, case["batch"], micro)
        with engine.no_sync(model, optimizer, micro + 1 == accumulation):
            loss = F.mse_loss(model(latent, t, text).sample, target)
            engine.backward(loss / accumulation, optimizer)
    engine.step(model, optimizer)
    after = engine.unwrap(model).state_dict()
    if info.is_main:
        torch.save({k: before[k] - after[k] for k in before}, case["out"])


def main():
    info = distributed.init_distributed()
    for case in json.loads(Path(sys.argv[1]).read_text()):
        one_update(case, info)
    distributed.shutdown_distributed()


if __name__ == "__main__":
    main()
