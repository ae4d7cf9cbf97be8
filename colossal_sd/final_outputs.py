"""What a finished run leaves in output_dir, the marker that says which run it was, and an earlier run's set aside.

A run's final outputs (the pipeline, or the LoRA files; the EMA run's raw UNet; the single-file checkpoint) end
with ``training_complete.json``, written last: its step, time, seed and arguments. When a new run starts
training, an earlier run's outputs move into ``output_dir/previous_runs/<when it finished>/``, with their
marker, and the log says so: whatever sits at the top of output_dir is this run's or nothing, and nothing is
deleted. Temporary folders of runs that died mid-write (``.tmp-*``) are removed then too; the output_dir lock
makes sure no live run owns them.
"""

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from colossal_sd import ema, lora, saving, single_file

MARKER = "training_complete.json"
PREVIOUS_RUNS = "previous_runs"
_TIME_FORMAT = "%Y-%m-%dT%H-%M-%SZ"  # a folder name: no colons


def output_names(output_dir) -> tuple:
    """Every top-level name a finished run may write into output_dir, its marker last."""
    names = (*saving.PIPELINE_FILES, ema.RAW_SUBFOLDER, single_file.single_file_path(output_dir).name,
             lora.WEIGHT_NAME, lora.KOHYA_WEIGHT_NAME, lora.MERGED_DIR)
    if (Path(output_dir) / lora.WEIGHT_NAME).exists():
        names += ("README.md",)  # the LoRA model card; without LoRA weights beside it a README is the user's
    return names + (MARKER,)


def mark_complete(output_dir, step: int, seed: int, args):
    """Written after every other final output, atomically: its presence says they are complete, and whose."""
    record = {"step": step, "finished_at": _now().strftime(_TIME_FORMAT), "seed": seed, "args": vars(args)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=output_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, Path(output_dir) / MARKER)


def finished_step(output_dir) -> Optional[int]:
    """The step of the finished run whose outputs sit at the top of output_dir, or None."""
    try:
        return int(json.loads((Path(output_dir) / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def set_aside_earlier_outputs(output_dir, log: Callable[[str], None]):
    """Before this run trains (global rank 0): remove dead runs' temporary folders, move an earlier run's outputs
    into previous_runs/. Nothing else in output_dir (checkpoints, logs, caches) is touched."""
    output_dir = Path(output_dir)
    _remove_stale_temporaries(output_dir, log)
    earlier = [output_dir / name for name in output_names(output_dir) if (output_dir / name).exists()]
    if not earlier:
        return
    folder = _previous_run_folder(output_dir, earlier)
    folder.mkdir(parents=True)
    for path in earlier:
        os.replace(path, folder / path.name)
    log(f"moved the outputs of an earlier run ({_describe(folder)}) to {folder}: "
        f"what this run saves at the end will be the only thing at the top of {output_dir}")


def _remove_stale_temporaries(output_dir: Path, log):
    stale = [p for folder in (output_dir, output_dir / ema.RAW_SUBFOLDER, output_dir / lora.MERGED_DIR)
             if folder.is_dir() for p in folder.glob(".tmp-*")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary folder(s) left by a run that died while writing: "
            + ", ".join(str(p) for p in stale))


def _previous_run_folder(output_dir: Path, earlier: List[Path]) -> Path:
    """previous_runs/<when the earlier run finished>, from its marker (or, without one, its newest file)."""
    try:
        name = json.loads((output_dir / MARKER).read_text())["finished_at"]
    except (OSError, ValueError, KeyError, TypeError):
        newest = max(p.stat().st_mtime for p in earlier)
        name = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime(_TIME_FORMAT) + "-unmarked"
    folder, n = output_dir / PREVIOUS_RUNS / name, 1
    while folder.exists():
        n += 1
        folder = output_dir / PREVIOUS_RUNS / f"{name}-{n}"
    return folder


def _describe(folder: Path) -> str:
    try:
        record = json.loads((folder / MARKER).read_text())
        return f"step {record['step']}, finished {record['finished_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"no {MARKER}: an older version wrote it, or its save was interrupted"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
