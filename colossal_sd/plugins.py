"""The parallel engine: a Colossal-AI booster plugin, or plain PyTorch DDP, behind one small interface.

The training loop only ever calls an :class:`Engine`. Which plugin it wraps, and how that plugin does mixed
precision, accumulation and clipping, is decided here and nowhere else.

    plugin           | no            | fp16                          | bf16
    -----------------+---------------+-------------------------------+---------------------------
    none / torch_ddp | fp32          | torch.autocast + GradScaler   | torch.autocast
    torch_ddp_fp16   | (fp16)        | Booster FP16TorchMixedPrecision (CUDA only)
    gemini           | refused       | GeminiPlugin(precision=fp16)  | GeminiPlugin(precision=bf16)
    low_level_zero   | fp32 ZeRO     | LowLevelZeroPlugin(fp16)      | LowLevelZeroPlugin(bf16)

Gemini and LowLevelZero keep fp32 master weights, scale the fp16 loss and clip inside their optimizer wrappers;
the torch paths keep fp32 weights, autocast the UNet and scale the fp16 loss with a GradScaler.

Booster's own ``mixed_precision`` argument is used only for torch_ddp_fp16: it needs CUDA in Colossal-AI
0.5.0, and its bf16 class is abstract, so the other torch paths autocast themselves.
"""

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader

from colossal_sd.data_position import ResumableSampler
from colossal_sd.distributed import DistInfo
from colossal_sd.errors import UserError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_ONLY_PLUGINS = {
    "gemini": "Gemini needs CUDA streams and its CUDA Adam kernel",
    "low_level_zero": "LowLevelZero asserts a cuda/npu device",
    "torch_ddp_fp16": "Booster's fp16 mixed precision uses torch.cuda.amp",
}
PLUGIN_DEFAULT_PRECISION = {"gemini": "fp16", "torch_ddp_fp16": "fp16"}
# They split optimizer state across ranks, keep it in buffers they own, and clip inside their optimizer.
SHARDED_PLUGINS = ("gemini", "low_level_zero")


def resolve_plugin(plugin: str, cuda: bool, lora: bool = False) -> str:
    if plugin == "auto" and lora and cuda:
        return "torch_ddp_fp16"  # Gemini has no LoRA in Colossal-AI 0.5.0; fp16 base, fp32 adapters
    if plugin == "auto":
        return "gemini" if cuda else "torch_ddp"
    return plugin


def resolve_precision(plugin: str, mixed_precision: Optional[str]) -> str:
    precision = mixed_precision or PLUGIN_DEFAULT_PRECISION.get(plugin, "no")
    if plugin == "gemini" and precision == "no":
        raise UserError("--plugin gemini trains in fp16 or bf16; pass --mixed_precision fp16 or bf16")
    return precision


def check_device(plugin: str, cuda: bool, xformers: bool):
    if not cuda and plugin in GPU_ONLY_PLUGINS:
        raise UserError(f"--plugin {plugin} needs a CUDA GPU ({GPU_ONLY_PLUGINS[plugin]}); "
                        "on CPU use --plugin torch_ddp")
    if not cuda and xformers:
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; "
                        "drop it to use PyTorch SDPA attention")


@dataclass
class Engine:
    """What the loop needs from a parallel backend: wrap, autocast, backward, step, gather, dataloader."""

    plugin: str
    precision: str
    dist: DistInfo
    max_grad_norm: float
    optimizer_kind: str = "adamw"
    booster: object = None  # colossalai Booster, or None for plain DDP
    scaler: Optional[torch.amp.GradScaler] = None
    _autocast_dtype: Optional[torch.dtype] = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen VAE and text encoder run in."""
        return DTYPES[self.precision]

    # -- data
    def prepare_dataloader(self, dataset, batch_size, seed, num_workers, collate_fn) -> DataLoader:
        pin = self.dist.device.type == "cuda"
        sampler_cls = lambda ds, **kw: ResumableSampler(ds, seed=seed, **kw)  # noqa: E731
        if self.booster is not None:
            return self.booster.plugin.prepare_dataloader(
                dataset, batch_size, shuffle=True, seed=seed, pin_memory=pin, num_workers=num_workers,
                collate_fn=collate_fn, distributed_sampler_cls=sampler_cls)
        sampler = sampler_cls(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, pin_memory=pin,
                          num_workers=num_workers, collate_fn=collate_fn)

    # -- model and optimizer
    def make_optimizer(self, params, lr, betas, weight_decay, eps):
        if self.optimizer_kind == "hybrid_adam":
            from colossalai.nn.optimizer import HybridAdam
            return HybridAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        if self.optimizer_kind == "adamw_8bit":
            import bitsandbytes
            return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        # One fused kernel over all parameters, on CUDA and CPU alike: on CPU, foreach AdamW loops per tensor
        # (16 ms against 4 ms a step on the tiny UNet's 326 tensors).
        fused = self.plugin != "low_level_zero"
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                 **({"fused": True} if fused else {"foreach": True}))

    def wrap(self, model, optimizer, lr_scheduler):
        model = model.to(self.dist.device)
        if self.booster is None:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            return model, optimizer, lr_scheduler
        model, optimizer, _, _, lr_scheduler = self.booster.boost(model, optimizer, lr_scheduler=lr_scheduler)
        return model, optimizer, lr_scheduler

    def unwrap(self, model) -> torch.nn.Module:
        """The module that was wrapped (a peft model stays one)."""
        if self.booster is None:
            return model.module
        return model.unwrap(unwrap_peft=False)

    # -- one step
    def autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self._autocast_dtype)

    def no_sync(self, model, optimizer, sync: bool):
        """Skip the gradient all-reduce on micro-batches that do not end an accumulation group."""
        if sync or self.dist.world_size == 1:
            return contextlib.nullcontext()
        if self.booster is None:
            return model.no_sync()
        if self.booster.plugin.support_no_sync():
            return self.booster.no_sync(model, optimizer)
        return contextlib.nullcontext()  # gemini and ZeRO-2 accumulate inside the plugin

    def backward(self, loss, optimizer):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self.booster is None:
            loss.backward()
        else:
            self.booster.backward(loss, optimizer)

    def step(self, model, optimizer) -> Optional[torch.Tensor]:
        """Clip, step and zero the gradients. Returns the pre-clip grad norm where the engine exposes it."""
        raw = getattr(optimizer, "optim", optimizer)
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(raw)
        if self.max_grad_norm > 0 and self.plugin not in SHARDED_PLUGINS:
            if hasattr(optimizer, "clip_grad_by_norm"):
                norm = optimizer.clip_grad_by_norm(self.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(raw)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def release_optimizer_state(self, optimizer):
        """After the last step: drop the Adam moments (twice the trainable weights), so that saving, which
        reloads the encoders a cache freed, does not raise the run's peak memory."""
        if self.plugin in SHARDED_PLUGINS:
            return
        getattr(optimizer, "optim", optimizer).state.clear()
        _return_freed_memory_to_the_os()

    # -- saving
    def local_trainable_tensors(self, optimizer) -> list:
        """This rank's share of the weights the optimizer trains (fp32 masters where the plugin keeps them):
        the ranks' shares together cover every trained weight, LoRA adapters only in a LoRA run."""
        if self.plugin == "gemini":
            # Between steps Gemini's optimizer holds empty stand-ins; the weights live in chunks, a shard per rank.
            master = optimizer.module.master_weights
            return [(chunk.paired_chunk if master else chunk).payload for chunk in optimizer.chunk16_set]
        # LowLevelZero: this rank's master shards; torch paths: the parameters themselves
        return [p for group in getattr(optimizer, "optim", optimizer).param_groups for p in group["params"]]

    def full_state_dict(self, model) -> Optional[dict]:
        """The whole trainable model's fp32 state dict on global rank 0 (None elsewhere). Collective."""
        if self.booster is None or self.plugin == "torch_ddp":
            state = self.unwrap(model).state_dict() if self.dist.is_main else None
        else:
            state = self._gather_through_checkpoint_io(model)
        if state is not None:
            state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
        return state

    def _gather_through_checkpoint_io(self, model):
        """Sharded plugins know how to gather themselves: let Colossal-AI write one file, read it back."""
        from safetensors.torch import load_file

        from colossal_sd.distributed import barrier
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            shared = [path]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.booster.save_model(model, shared[0], shard=False, use_safetensors=True)
            barrier()
            return load_file(shared[0]) if self.dist.is_main else None


def _return_freed_memory_to_the_os():
    """glibc keeps small freed blocks (most Adam moments of a small model) in its heap; trimming hands them back,
    so what is allocated next (the reloaded encoders) does not grow the process past its training peak."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def build_engine(args, dist: DistInfo) -> Engine:
    cuda = dist.device.type == "cuda"
    plugin = resolve_plugin(args.plugin, cuda, args.use_lora)
    precision = resolve_precision(plugin, args.mixed_precision)
    check_device(plugin, cuda, args.enable_xformers_memory_efficient_attention)
    check_plugin_flags(plugin, args)
    engine = Engine(plugin, precision, dist, args.max_grad_norm,
                    optimizer_kind=choose_optimizer(plugin, cuda, args.use_8bit_adam, args.cpu_offload))
    if plugin in ("none", "torch_ddp") and precision != "no":
        engine._autocast_dtype = DTYPES[precision]
        if precision == "fp16":
            engine.scaler = torch.amp.GradScaler(dist.device.type)
    if plugin != "none":
        engine.booster = _make_booster(plugin, precision, args)
    return engine


def _make_booster(plugin: str, precision: str, args):
    from colossalai import booster
    class_name, kwargs = booster_plugin_spec(plugin, precision, args)
    mixed_precision = "fp16" if plugin == "torch_ddp_fp16" else None
    return booster.Booster(plugin=getattr(booster.plugin, class_name)(**kwargs), mixed_precision=mixed_precision)


def booster_plugin_spec(plugin: str, precision: str, args) -> tuple:
    """The Colossal-AI plugin class name and its keyword arguments for our flags."""
    if plugin in ("torch_ddp", "torch_ddp_fp16"):
        # Gradients live in DDP's all-reduce buckets instead of beside them: one fp32 copy of the trained
        # weights less (3.4 GB for SD 1.5's UNet).
        return "TorchDDPPlugin", {"gradient_as_bucket_view": True}
    if plugin == "low_level_zero":
        return "LowLevelZeroPlugin", {"stage": args.zero_stage or 2,
                                      "precision": "fp32" if precision == "no" else precision,
                                      "max_norm": args.max_grad_norm, "cpu_offload": args.cpu_offload}
    return "GeminiPlugin", {"precision": precision, "max_norm": args.max_grad_norm,
                            # without it Gemini steps its chunks on every backward, not once per group
                            "enable_gradient_accumulation": args.gradient_accumulation_steps > 1,
                            "search_range_m": args.gemini_search_range_m,
                            "min_chunk_size_m": args.gemini_min_chunk_size_m,
                            "max_prefetch": args.gemini_max_prefetch,
                            "enable_async_reduce": args.gemini_async_reduce,
                            **gemini_placement(args.placement, args.offload_optim_frac, args.offload_param_frac)}


def gemini_placement(placement: str, offload_optim_frac=None, offload_param_frac=None) -> dict:
    """--placement in Gemini's 0.5.0 terms. The offload fractions refine `cpu`, the only placement they mean anything to."""
    if placement != "cpu" and (offload_optim_frac is not None or offload_param_frac is not None):
        raise UserError(f"--offload_optim_frac and --offload_param_frac refine --placement cpu; "
                        f"--placement {placement} decides placement itself")
    if placement == "auto":
        return {"placement_policy": "auto"}
    if placement == "cuda":
        return {"placement_policy": "static", "offload_optim_frac": 0.0, "offload_param_frac": 0.0}
    optim = 1.0 if offload_optim_frac is None else offload_optim_frac
    param = offload_param_frac or 0.0
    if param > 0 and optim != 1.0:
        # Gemini silently ignores parameter offload unless all optimizer state is offloaded
        raise UserError("--offload_param_frac needs the whole optimizer state on the CPU: "
                        "use --offload_optim_frac 1.0 (the default)")
    return {"placement_policy": "static", "offload_optim_frac": optim, "offload_param_frac": param,
            "pin_memory": True}


PLUGIN_ONLY_FLAGS = {
    "low_level_zero": ("zero_stage", "cpu_offload"),
    "gemini": ("offload_optim_frac", "offload_param_frac"),
}


def check_plugin_flags(plugin: str, args):
    """A plugin's own flag given to another plugin would do nothing: say so instead."""
    for owner, flags in PLUGIN_ONLY_FLAGS.items():
        for flag in flags:
            if owner != plugin and getattr(args, flag) not in (None, False):
                raise UserError(f"--{flag} applies to --plugin {owner} only (this run uses {plugin})")


def choose_optimizer(plugin: str, cuda: bool, use_8bit_adam: bool, cpu_offload: bool) -> str:
    """adamw (torch, fused), hybrid_adam (Colossal-AI's CPU/GPU Adam) or adamw_8bit (bitsandbytes)."""
    if use_8bit_adam:
        if plugin not in ("none", "torch_ddp", "torch_ddp_fp16"):
            raise UserError(f"--use_8bit_adam works with --plugin torch_ddp, torch_ddp_fp16 or none, not {plugin} "
                            "(it shards or offloads its own optimizer state)")
        if not cuda:
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop it on CPU")
        return "adamw_8bit"
    if plugin == "gemini" or (plugin == "low_level_zero" and cpu_offload):
        return "hybrid_adam"
    return "adamw"
