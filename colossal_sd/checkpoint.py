"""Training checkpoints: write one atomically, find the newest complete one, resume from it, keep the newest K.

``output_dir/checkpoint-<step>/`` holds:

    unet/                     the UNet in diffusers' layout: sample from it with
                              UNet2DConditionModel.from_pretrained(output_dir, subfolder="checkpoint-<step>/unet");
                              it is also the weights a resume loads
    optimizer/                optimizer state through the booster, sharded (gemini, low_level_zero);
                              optimizer.bin where every rank holds the same full state (torch_ddp, none)
    lr_scheduler.pt, grad_scaler.pt, extra/<name>.pt
    rng_states.pt             python, numpy, torch (CPU and CUDA) and noise-generator states, one per rank
    training_state.json       global step, data position (epoch, batches done in it), processes, arguments,
                              and what a resume must match (images per step, resolution, base model)
    checkpoint_complete.json  written last: every file, its size and its xxh3_128 checksum

All ranks write into ``.tmp-checkpoint-<step>`` (sharded plugins write their shards themselves; the output
directory must be shared by all nodes), rank 0 adds the completion marker and renames the directory into
place. A kill mid-write leaves only the hidden temp directory. Before a resume loads anything, rank 0 verifies
the checkpoint: its marker, every file's size and checksum, and that every file can be read. ``latest`` skips
one that fails (with a log line) for the previous one; a checkpoint named explicitly is a one-line error.
Markers of older checkpoints record sizes only: those are checked by size.

Resuming from checkpoint-K moves the later checkpoints of the abandoned run into ``output_dir/abandoned/``, so
that rotation and ``latest`` only ever see the timeline being trained.
"""

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from colossal_sd import resume_match
from colossal_sd.checksums import ALGORITHM, file_checksum
from colossal_sd.data_position import start_of
from colossal_sd.distributed import barrier
from colossal_sd.errors import UserError, first_line
from colossal_sd.plugins import SHARDED_PLUGINS
from colossal_sd.preemption import StopRequest, report_clean_stop

MARKER = "checkpoint_complete.json"
STATE = "training_state.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
LORA_MODEL_WEIGHTS = "lora_run/model.safetensors"  # the boosted LoRA model, base included, for resuming only
ABANDONED = "abandoned"  # later checkpoints of a run resumed from an earlier one
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def all_checkpoints(output_dir) -> list:
    """checkpoint-<step> directories, complete or not, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _recorded_files(path: Path) -> Dict[str, dict]:
    """File name -> {"size", and the checksum where recorded} from the completion marker (raises if unreadable)."""
    files = json.loads((path / MARKER).read_text())["files"]
    return {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()}


def problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None if it is: a quick look at its marker and file sizes."""
    if not path.is_dir():
        return "no such directory"
    try:
        files = _recorded_files(path)
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except FileNotFoundError:
        return f"incomplete: no {MARKER} (its write was interrupted)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"corrupt {MARKER}"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"corrupt: {name} is missing or has the wrong size"
    return None


def verify(path: Path) -> Optional[str]:
    """Why `path` cannot be resumed from, or None: `problem`, then every file's checksum (where the marker
    records one) and a read of every file the loaders open, so that a corrupt file is found before any rank
    starts the collective load."""
    why = problem(path)
    if why is not None:
        return why
    files = _recorded_files(path)
    for name, entry in files.items():
        if ALGORITHM in entry and file_checksum(path / name) != entry[ALGORITHM]:
            return f"corrupt: {name} does not match its checksum"
    for name in files:
        why = _unreadable(path / name)
        if why is not None:
            return f"corrupt: {name} cannot be read ({why})"
    return None


def _unreadable(file: Path) -> Optional[str]:
    """Why the loaders could not read `file`, or None. Cheap: safetensors headers only, and torch files memory
    mapped, so only their pickles are read."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                f.keys()
        elif file.suffix in (".pt", ".bin"):
            torch.load(file, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(file))
        elif file.suffix == ".json":
            json.loads(file.read_text())
    except Exception as e:  # any failure to read it is a corrupt checkpoint, whatever the library raises
        return first_line(e)
    return None


def find_latest(output_dir, log: Callable[[str], None], check=verify) -> Optional[Path]:
    for path in reversed(all_checkpoints(output_dir)):
        why = check(path)
        if why is None:
            return path
        log(f"skipping {path}: {why}")
    return None


def resolve_resume(value: Optional[str], output_dir, log: Callable[[str], None], check=verify) -> Optional[Path]:
    """--resume_from_checkpoint: 'latest', a checkpoint-<step> name inside --output_dir, or a path. `check`
    (`verify`, or the quicker `problem`) says why a checkpoint cannot be used."""
    if value is None:
        return None
    if value == "latest":
        path = find_latest(output_dir, log, check)
        if path is None:
            log(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}, starting fresh")
        return path
    path = Path(value)
    if not path.exists() and _NAME.match(value):
        path = Path(output_dir) / value
    why = check(path)
    if why is not None:
        raise UserError(f"--resume_from_checkpoint {value}: {why}")
    return path


def set_aside_later(output_dir, step: int, log: Callable[[str], None]):
    """Resuming from step `step` abandons the checkpoints after it: move them into output_dir/abandoned/
    (nothing is deleted), so that rotation and `latest` only see the timeline being trained."""
    later = [p for p in all_checkpoints(output_dir) if int(_NAME.match(p.name).group(1)) > step]
    if not later:
        return
    aside = Path(output_dir) / ABANDONED
    aside.mkdir(exist_ok=True)
    moved = [_move_aside(p, aside).name for p in later]
    log(f"resuming from step {step} abandons the later checkpoints of the earlier run: moved them into {aside} "
        f"(nothing is deleted): {', '.join(moved)}")


def _move_aside(path: Path, folder: Path) -> Path:
    target, n = folder / path.name, 0
    while target.exists():  # set aside by an earlier resume
        n += 1
        target = folder / f"{path.name}-{n}"
    os.replace(path, target)
    return target


def rotate(output_dir, keep: int, log: Callable[[str], None]):
    """Delete all but the newest `keep` complete checkpoints (called once the newest one is complete)."""
    complete = [p for p in all_checkpoints(output_dir) if problem(p) is None]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed {old} (--checkpoints_total_limit {keep})")


# ---------------------------------------------------------------- the UNet: inference-ready and resumable


def save_unet(engine, model, parts, folder: Path, use_lora: bool = False):
    """The trained weights, inference-ready: a diffusers UNet folder, or in a LoRA run the LoRA file (with the
    boosted model kept beside it for resuming)."""
    weights = folder / (LORA_MODEL_WEIGHTS if use_lora else UNET_WEIGHTS)
    weights.parent.mkdir(parents=True, exist_ok=True)
    if engine.booster is None:
        if engine.dist.is_main:
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().contiguous() for k, v in engine.unwrap(model).state_dict().items()},
                      weights, metadata={"format": "pt"})
    else:
        engine.booster.save_model(model, str(weights), shard=False, use_safetensors=True)
    if engine.dist.is_main and use_lora:
        from colossal_sd.lora import save_lora_weights
        save_lora_weights(folder, engine.unwrap(model), parts.family, parts.unet.config)
    elif engine.dist.is_main:
        parts.unet.save_config(folder / "unet")


def load_unet(engine, model, folder: Path, use_lora: bool = False):
    weights = folder / (LORA_MODEL_WEIGHTS if use_lora else UNET_WEIGHTS)
    if not weights.is_file():
        raise UserError(f"checkpoint {folder} has no {weights.relative_to(folder)}: "
                        "it was written by a run with other flags (--use_lora or not)")
    if engine.booster is None:
        from safetensors.torch import load_file
        engine.unwrap(model).load_state_dict(load_file(weights))
    else:
        engine.booster.load_model(model, str(weights))


# ---------------------------------------------------------------- optimizer and random states


def optimizer_path(engine, folder: Path) -> str:
    """A directory of per-rank shards where the plugin shards the optimizer, else one file (replicated DDP
    state; Colossal-AI 0.5.0 also cannot load a sharded optimizer on a CPU accelerator)."""
    return str(folder / ("optimizer" if engine.plugin in SHARDED_PLUGINS else "optimizer.bin"))


def save_optimizer(engine, optimizer, folder: Path):
    path = optimizer_path(engine, folder)
    if engine.booster is not None:
        engine.booster.save_optimizer(optimizer, path, shard=engine.plugin in SHARDED_PLUGINS)
    elif engine.dist.is_main:
        torch.save(optimizer.state_dict(), path)


def load_optimizer(engine, optimizer, folder: Path):
    path = optimizer_path(engine, folder)
    if engine.booster is not None:
        engine.booster.load_optimizer(optimizer, path)
    else:
        optimizer.load_state_dict(torch.load(path, map_location=engine.dist.device, weights_only=False))


def rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, generator: torch.Generator):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_to_main(obj, info) -> Optional[list]:
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


# ---------------------------------------------------------------- save and resume a run


class Checkpointer:
    """Everything a run needs to continue exactly: the engine's model and optimizer, the lr scheduler, the
    grad scaler, the random states, the data position, and any `extras` (name -> object with
    state_dict()/load_state_dict(), e.g. an EMA model). `must_match` (resume_match.must_match) is recorded in
    every checkpoint and checked on resume."""

    def __init__(self, args, info, engine, model, optimizer, lr_scheduler, parts, stop_request: StopRequest,
                 extras: Optional[Dict[str, object]] = None, log: Callable[[str], None] = print,
                 before_save: Callable[[int], None] = lambda step: None, must_match: Optional[dict] = None):
        self.args, self.info, self.engine, self.before_save = args, info, engine, before_save
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.parts, self.extras, self.log = parts, dict(extras or {}), log
        self.stop_request = stop_request
        self.must_match = must_match or {}
        self.base_lrs = list(lr_scheduler.base_lrs)  # this run's, before a resume restores the checkpoint's
        self.first_step = 0

    def resume(self, generator: torch.Generator, batches_per_epoch: int, max_steps: int) -> tuple:
        """(global step, epoch, batches of it to skip) to continue from: zeros for a fresh run."""
        folder = _decided_on_main(lambda: resolve_resume(self.args.resume_from_checkpoint, self.args.output_dir,
                                                         self.log), self.info)
        if folder is None:
            return 0, 0, 0
        state = json.loads((folder / STATE).read_text())
        resume_match.check(state, self.must_match, self.args, self.info.world_size, max_steps, folder.name, self.log)
        try:
            state = self.load(folder, generator)
        except _UNREADABLE as e:  # verified moments ago: changed since, or on another node's view of the disk
            raise UserError(f"checkpoint {folder} cannot be read: {first_line(e)}") from None
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. a checkpoint of another model
            raise UserError(f"checkpoint {folder} does not fit this run: {first_line(e)}") from None
        self.first_step = state["global_step"]
        self._honour_new_schedule(state.get("args", {}))
        if self.info.is_main:
            set_aside_later(self.args.output_dir, self.first_step, self.log)
        barrier()
        self.log(f"resumed from {folder} at step {self.first_step}")
        return (self.first_step, *start_of(state["epoch"], state["batches_done_in_epoch"], batches_per_epoch))

    def _honour_new_schedule(self, old_args: dict):
        """A new learning rate or schedule applies from the resumed step on (the restored scheduler state and
        the optimizer's param groups would otherwise bring back the checkpoint's)."""
        changes = resume_match.schedule_changes(old_args, self.args, list(self.lr_scheduler.base_lrs),
                                                self.base_lrs, self.first_step)
        if changes:
            resume_match.continue_schedule(self.lr_scheduler, self.base_lrs, self.first_step)
        for change in changes:
            self.log(change)

    def after_step(self, step: int, epoch: int, batches_done: int, generator, max_steps: int) -> bool:
        """Write the periodic checkpoint; on a signal or --stop_after_steps write one and return True: stop.

        Collective: every rank calls it after every optimizer step.
        """
        reason = None
        if step < max_steps:  # at the last step the finished pipeline is saved anyway
            if self.stop_request.agreed(self.info.device):
                reason = f"stopped by {self.stop_request.name}"
            elif self.args.stop_after_steps and step - self.first_step >= self.args.stop_after_steps:
                reason = f"stopped after --stop_after_steps {self.args.stop_after_steps}"
        if step % self.args.checkpointing_steps and reason is None:
            return False
        path = self.save(step, epoch, batches_done, generator)
        self.log(f"saved {path}")
        if reason is not None:
            message = f"{reason} at step {step}; to continue, rerun with --resume_from_checkpoint {path}"
            self.log(message)
            if self.info.is_main:
                report_clean_stop(message)
        return reason is not None

    def _stateful(self) -> dict:
        """File name -> object whose state_dict() rank 0 writes as is."""
        objects = {"lr_scheduler.pt": self.lr_scheduler, "grad_scaler.pt": self.engine.scaler}
        objects.update({f"extra/{name}.pt": obj for name, obj in self.extras.items()})
        return {name: obj for name, obj in objects.items() if obj is not None}

    def save(self, step: int, epoch: int, batches_done: int, generator: torch.Generator) -> Path:
        """Write checkpoint-<step>. Collective: every rank calls it at the same step."""
        self.before_save(step)  # e.g. refuse to write non-finite weights
        final = checkpoint_path(self.args.output_dir, step)
        tmp = final.with_name(f".tmp-{final.name}")
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
            tmp.mkdir(parents=True)
        barrier()
        save_unet(self.engine, self.model, self.parts, tmp, self.args.use_lora)
        save_optimizer(self.engine, self.optimizer, tmp)
        rng_states = _gather_to_main(rng_state(generator), self.info)
        if self.info.is_main:
            self._write_main_files(tmp, step, epoch, batches_done, rng_states)
        barrier()
        if self.info.is_main:
            _seal(tmp, step)
            _move_into_place(tmp, final)
            if self.args.checkpoints_total_limit is not None:
                rotate(self.args.output_dir, self.args.checkpoints_total_limit, self.log)
        barrier()
        return final

    def _write_main_files(self, folder: Path, step, epoch, batches_done, rng_states):
        for name, obj in self._stateful().items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj.state_dict(), folder / name)
        torch.save(rng_states, folder / "rng_states.pt")
        state = {"global_step": step, "epoch": epoch, "batches_done_in_epoch": batches_done,
                 "processes": self.info.world_size, "args": vars(self.args), resume_match.KEY: self.must_match}
        (folder / STATE).write_text(json.dumps(state, indent=2, default=str))

    def load(self, folder: Path, generator: torch.Generator) -> dict:
        """Restore everything from `folder` on every rank; returns the training state (step, data position)."""
        state = json.loads((folder / STATE).read_text())
        load_unet(self.engine, self.model, folder, self.args.use_lora)
        load_optimizer(self.engine, self.optimizer, folder)
        for name, obj in self._stateful().items():
            if not (folder / name).is_file():
                raise UserError(f"checkpoint {folder} has no {name}: it was written by a run with other flags")
            obj.load_state_dict(torch.load(folder / name, map_location=self.info.device, weights_only=False))
        rng_states = torch.load(folder / "rng_states.pt", weights_only=False)
        if len(rng_states) != self.info.world_size:
            self.log(f"the checkpoint was written by {len(rng_states)} processes, this run has "
                     f"{self.info.world_size}: training continues, but not exactly as the original run would")
        restore_rng(rng_states[self.info.rank % len(rng_states)], generator)
        barrier()
        return state


_UNREADABLE = (SafetensorError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError)


def _decided_on_main(decide: Callable, info):
    """decide() on rank 0 only (verifying a checkpoint reads all of it), its answer or its UserError on every rank,
    so that every rank loads the same checkpoint."""
    if not dist.is_initialized() or info.world_size == 1:
        return decide()
    box = [None]
    if info.is_main:
        try:
            box = [(decide(), None)]
        except UserError as e:
            box = [(None, str(e))]
    dist.broadcast_object_list(box, src=0)
    answer, error = box[0]
    if error is not None:
        raise UserError(error)
    return answer


def _seal(folder: Path, step: int):
    """The completion marker: written last, it lists every file, its size and its checksum."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, ALGORITHM: file_checksum(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1))


def _move_into_place(tmp: Path, final: Path):
    """One rename: `final` is either absent, the old complete checkpoint, or the new complete one."""
    if final.exists():  # the same step again, after resuming from an earlier checkpoint
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
