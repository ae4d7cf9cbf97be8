"""An exponential moving average of the UNet's weights, kept on global rank 0.

Our own rather than diffusers' ``EMAModel``: in diffusers 0.29.0 its ``step`` calls ``transformers.deepspeed``,
which transformers 4.51.3 no longer has (AttributeError). The decay schedule is diffusers' default one,
``min(decay, (1 + t) / (10 + t))`` at update ``t`` (the first update copies the weights), so results match
diffusers' script.

Where the weights come from (:func:`full_weights`), per plugin:

- ``none``, ``torch_ddp``, ``torch_ddp_fp16``: parameters are replicated; rank 0 reads its own, no traffic.
- ``low_level_zero`` (ZeRO-2): only gradients and optimizer state are sharded; every rank holds the whole
  working model, so again rank 0 reads its own (in the working precision).
- ``gemini``: parameters live in chunks sharded across ranks; ``GeminiDDP.state_dict(only_rank_0=True)``
  gathers them to rank 0 in memory. This is collective, so every rank calls it on every update.
"""

from typing import Dict, Optional

import torch

RAW_SUBFOLDER = "unet_raw"  # with --use_ema, the un-averaged UNet weights, beside the (averaged) pipeline


def full_weights(engine, model) -> Optional[Dict[str, torch.Tensor]]:
    """The trainable model's current weights, whole, on global rank 0 (None elsewhere). Collective under gemini."""
    if engine.plugin == "gemini":
        state = model.state_dict(only_rank_0=True)
        return state if engine.dist.is_main else None
    if not engine.dist.is_main:
        return None
    return {name: p for name, p in engine.unwrap(model).named_parameters() if p.requires_grad}


class EMA:
    """Shadow fp32 copies of named weights, updated in place after each optimizer step."""

    def __init__(self, weights: Dict[str, torch.Tensor], decay: float, offload_to_cpu: bool = False):
        self.decay = decay
        self.updates = 0
        self.device = torch.device("cpu") if offload_to_cpu else None
        self.shadow = {name: w.detach().to(self.device or w.device, torch.float32, copy=True)
                       for name, w in weights.items()}

    def current_decay(self) -> float:
        """diffusers' EMAModel.get_decay with its defaults: 0 for the first update, then warming up to `decay`."""
        t = self.updates - 1
        return 0.0 if t <= 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, weights: Dict[str, torch.Tensor]):
        self.updates += 1
        keep = self.current_decay()
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        fresh = [weights[n].detach().to(s.device, torch.float32) for n, s in zip(names, shadow)]
        torch._foreach_lerp_(shadow, fresh, 1.0 - keep)

    def state_dict(self) -> dict:
        """For checkpoints: the shadow weights (on CPU) and the update count the decay depends on."""
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {n: s.detach().cpu() for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def weights(self) -> Dict[str, torch.Tensor]:
        """The averaged weights as a CPU fp32 state dict, ready to save or to load into a UNet."""
        return {n: s.detach().to("cpu", torch.float32) for n, s in self.shadow.items()}


def maybe_create(args, engine, model) -> Optional[EMA]:
    """An EMA on rank 0 when --use_ema is on; every rank must call this (gemini gathers)."""
    if not args.use_ema:
        return None
    weights = full_weights(engine, model)
    return EMA(weights, args.ema_decay, args.ema_offload_to_cpu) if weights is not None else None


def update(ema: Optional[EMA], use_ema: bool, engine, model):
    """After an optimizer step, on every rank (gemini gathers)."""
    if not use_ema:
        return
    weights = full_weights(engine, model)
    if ema is not None:
        ema.update(weights)


def save_raw_and_average(ema: Optional[EMA], raw_state: dict, output_dir, parts) -> dict:
    """With EMA on: write the raw UNet to output_dir/unet_raw and return the averaged state to save as the
    pipeline's UNet. Without: the raw state, unchanged. Rank 0 only."""
    if ema is None:
        return raw_state
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from colossal_sd.saving import atomic_directory
    unet = UNet2DConditionModel.from_config(parts.unet.config)
    unet.load_state_dict(raw_state)
    atomic_directory(Path(output_dir) / RAW_SUBFOLDER, lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
    return {**raw_state, **ema.weights()}
