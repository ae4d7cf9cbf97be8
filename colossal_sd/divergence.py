"""A run whose loss or weights stop being finite stops before it writes anything, naming the checkpoint to go back to.

No per-step host sync: the loss is looked at where the loop already reduces it for its log line, and the
weights once before each checkpoint and before the final save (a NaN may appear between log lines; that check
is what keeps it out of every file). Nothing non-finite is ever written, so ``--checkpoints_total_limit``, which
only runs after a write, never deletes the newest finite checkpoint.

Under fp16 loss scaling (GradScaler, torch_ddp_fp16, Gemini and LowLevelZero fp16) a non-finite gradient norm
is a step the scaler skipped, as it should; without loss scaling it means this step's update made the weights
non-finite, and the run stops at once rather than at the next save.
"""

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from colossal_sd.checkpoint import all_checkpoints, problem
from colossal_sd.errors import UserError


def why_diverged(loss: float, grad_norm: Optional[float], loss_scaled: bool) -> Optional[str]:
    """What became non-finite in a log line's values, or None when training may go on."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm) and not loss_scaled:
        return f"the gradient norm became {grad_norm}"
    return None


def all_finite(tensors, device: torch.device) -> bool:
    """Whether every element of every rank's `tensors` is finite: reduced on the device, one host sync."""
    flags = {}
    for t in tensors:
        if t.numel():
            ok = torch.isfinite(t).all()
            flags[t.device] = ok if t.device not in flags else flags[t.device] & ok
    flag = torch.ones((), device=device)
    for ok in flags.values():  # one flag per device the weights live on (CPU-offloaded shards, GPU)
        flag = flag * ok.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def last_good_checkpoint(output_dir, step: int, resumed_from: Optional[str]) -> Optional[Path]:
    """The newest complete checkpoint written at or before `step`: every one this guard let through is finite."""
    done = [p for p in all_checkpoints(output_dir) if int(p.name.rsplit("-", 1)[1]) <= step and problem(p) is None]
    if done:
        return done[-1]
    if resumed_from not in (None, "latest") and problem(Path(resumed_from)) is None:
        return Path(resumed_from)  # resumed from a path outside output_dir, nothing saved since
    return None


def stop_message(what: str, checkpoint: Optional[Path]) -> str:
    """`what`: what became non-finite and when, e.g. "the loss became nan at step 6"."""
    if checkpoint is None:
        return f"{what}, and no checkpoint was saved before it: start again with a lower --learning_rate"
    saved_step = checkpoint.name.rsplit("-", 1)[1]
    return (f"{what}; nothing was saved after step {saved_step}: rerun with "
            f"--resume_from_checkpoint {checkpoint} and a lower --learning_rate")


class DivergenceGuard:
    """The two checks the loop calls: on each log line's values, and before anything is written."""

    def __init__(self, args, engine, optimizer, before_stop=lambda: None):
        """`before_stop`: e.g. close the progress bar, so that the error is a line of its own."""
        self.args, self.engine, self.optimizer, self.before_stop = args, engine, optimizer, before_stop
        self.loss_scaled = engine.precision == "fp16"

    def check_logged(self, step: int, values: dict):
        """`values` as logged: reduced over all ranks, so every rank stops alike."""
        what = why_diverged(values["loss"], values.get("grad_norm"), self.loss_scaled)
        if what is not None:  # a log line covers the steps since the previous one
            self._stop(f"{what} {'at' if self.args.logging_steps == 1 else 'by'} step {step}", step)

    def check_weights(self, step: int):
        """Before a checkpoint or the final save. Collective: every rank calls it at the same step."""
        if not all_finite(self.engine.local_trainable_tensors(self.optimizer), self.engine.dist.device):
            self._stop(f"the trained weights became nan or inf by step {step}", step)

    def _stop(self, what: str, step: int):
        checkpoint = last_good_checkpoint(self.args.output_dir, step, self.args.resume_from_checkpoint)
        self.before_stop()
        raise UserError(stop_message(what, checkpoint))
