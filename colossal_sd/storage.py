"""The disks the run writes to: checked before any heavy work, and a failed write told in one line.

Pre-flight, right after start-up: --output_dir, the latent cache and the TensorBoard folder must be creatable
and writable (a probe file is written, fsynced and removed: a read-only mount or a path under a regular file is
found now, not after hours of training), and --output_dir must not be where the final save would overwrite the
base model. Once the models are loaded, a warning says when the output disk looks too small for one checkpoint
and the final save.

Later, a disk that fills up (or turns read-only) while a checkpoint or the pipeline is written ends the run with
one line: the writes go to temporary folders that are renamed into place, so what was saved before is intact.
"""

import errno
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from colossal_sd import embedded, final_outputs
from colossal_sd.caching import cache_root
from colossal_sd.errors import UserError

FP32 = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trainable parameter
REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}


# ---------------------------------------------------------------- pre-flight


def check_paths(args, info):
    """Every folder the run writes to, checked on every rank (each node sees its own mounts); the problem the
    lowest rank found is raised on all of them. Collective."""
    problem = base_model_problem(args) or next(filter(None, (writable_problem(Path(path), flag)
                                                             for flag, path in folders_written(args))), None)
    if info.world_size > 1:
        # not all_gather_object: in torch 2.5 gloo it can hang the process group's destruction that follows
        first = torch.tensor(info.rank if problem else info.world_size, device=info.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        box = [problem]
        if int(first) < info.world_size:
            dist.broadcast_object_list(box, src=int(first))
        problem = box[0] if int(first) < info.world_size else None
    if problem:
        raise UserError(problem)


def folders_written(args) -> list:
    """(flag, folder) for each folder this run writes into."""
    folders = [("--output_dir", args.output_dir)]
    if args.cache_dir:
        folders.append(("--cache_dir", args.cache_dir))
    elif args.cache_latents or args.cache_text_embeddings:
        folders.append(("the latent cache", cache_root(None)))
    if args.report_to != "none":
        folders.append(("--logging_dir", os.path.join(args.output_dir, args.logging_dir)))
    return folders


def writable_problem(folder: Path, flag: str) -> Optional[str]:
    """Why `folder` cannot be created or written to, or None: really tried, with a probe file."""
    probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        return f"{flag} {folder} is not writable: {_why(e, folder)}"
    return None


def _why(e: OSError, folder: Path) -> str:
    if isinstance(e, FileExistsError) or (folder.exists() and not folder.is_dir()):
        return "it is a regular file, not a folder"
    if e.errno == errno.ENOTDIR:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        return f"{blocker} is a regular file, not a folder" if blocker else "a part of the path is not a folder"
    return REASONS.get(e.errno, e.strerror or type(e).__name__)


def base_model_problem(args) -> Optional[str]:
    """A run moves output_dir's final outputs aside and saves its own there: refuse where the base model lies."""
    name = args.pretrained_model_name_or_path
    if embedded.is_embedded(name) or not Path(name).expanduser().exists():
        return None  # a hub id is read from the hub's cache, which the run never writes to
    base, out = Path(name).expanduser().resolve(), Path(args.output_dir).expanduser().resolve()
    if base == out:
        return (f"--output_dir {args.output_dir} is the base model's folder (--pretrained_model_name_or_path): "
                "saving would overwrite the base model; choose another --output_dir")
    written = [out / name for name in final_outputs.output_names(out)]  # saved over, or moved aside first
    if any(base == w or w in base.parents for w in written):
        return (f"--output_dir {args.output_dir}: saving would overwrite the base model {name} "
                "(--pretrained_model_name_or_path); choose another --output_dir")
    return None


# ---------------------------------------------------------------- free space


def space_needed(unet_params: int, frozen_params: int, trainable_params: int, ema: bool, lora: bool,
                 single_file: bool) -> int:
    """Bytes for one checkpoint (fp32 UNet, AdamW's two fp32 states per trainable parameter, an EMA copy) plus
    the final save (fp32 pipeline, the raw UNet beside an EMA one, the single file; a LoRA run saves its
    adapters only). An estimate: a rough figure is all a warning needs."""
    checkpoint = (unet_params * (2 if ema else 1) + trainable_params * ADAM_STATES) * FP32
    if lora:
        final = trainable_params * FP32
    else:
        pipeline = (unet_params + frozen_params) * FP32
        final = pipeline * (2 if single_file else 1) + (unet_params * FP32 if ema else 0)
    return checkpoint + final


def disk_warning(folder, needed: int, disk_usage=shutil.disk_usage) -> Optional[str]:
    """A warning when the disk holding `folder` has less than `needed` bytes free, else None."""
    free = disk_usage(str(folder)).free
    if free >= needed:
        return None
    return (f"warning: {folder} has {_size(free)} free, but one checkpoint plus the final save need about "
            f"{_size(needed)}: free some space, or the run may fail when it saves")


def warn_if_short_of_space(args, parts, info):
    """After loading the models, before training: the estimate from their parameter counts."""
    if not info.is_main:
        return
    unet = _params(parts.unet)
    trainable = unet // 20 if args.use_lora else unet  # adapters are a few percent of the UNet at most
    needed = space_needed(unet, sum(_params(module) for module in parts.frozen().values()), trainable, args.use_ema,
                          args.use_lora, args.save_single_file)
    warning = disk_warning(args.output_dir, needed)
    if warning:
        print(warning, flush=True)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------- a write that fails later


@contextmanager
def write_failures_as_one_line(args):
    """A full or read-only disk met while writing becomes one line instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        message = write_failure(e, args)
        if message is None:
            raise
        raise UserError(message) from None


def write_failure(e: BaseException, args) -> Optional[str]:
    """The one line for an exception that is a failed write to one of the run's folders, else None.

    Libraries report a full disk differently: an OSError (Python), "(os error 28)" (safetensors, in Rust), or a
    bare "unexpected pos" from torch.save's zip writer; the latter is taken for a full disk only when the output
    disk is (nearly) full.
    """
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(e))):
        code = int(match.group(1))
    if code is None and isinstance(e, RuntimeError) and "inline_container" in str(e) and _nearly_full(args):
        code = errno.ENOSPC
    where = getattr(e, "filename", None)
    ours = where is None or any(_inside(where, folder) for _, folder in folders_written(args))
    if code not in REASONS or (code in (errno.EACCES, errno.EPERM) and not (where and ours)):
        return None  # permission denied reading an input is that input's error, not a write's
    fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return (f"{REASONS[code]} while writing {where or args.output_dir}; {fix}, then rerun (with "
            "--resume_from_checkpoint latest to continue from the last checkpoint: what was saved before is intact)")


def _nearly_full(args) -> bool:
    try:
        return shutil.disk_usage(args.output_dir).free < 64 * 2**20
    except OSError:
        return False


def _inside(path, folder) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
