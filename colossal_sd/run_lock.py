"""One live run per --output_dir: ``output_dir/.lock`` names the run that holds it.

Two runs on one output directory (a requeued job while the old one still lives) would delete each other's
temporary folders and rotate each other's checkpoints. Global rank 0 takes the lock before anything is written
and tells every rank the verdict, so a refused run exits on all ranks with one line.

The lock is a JSON file (host, pid, the pid's start time, start and heartbeat times), created with O_EXCL so
that of two runs starting together exactly one wins. A heartbeat thread rewrites it every `HEARTBEAT_S`
(atomic replace). A lock is stale, and taken over with a log line, when its holder is gone: on this host its
pid no longer runs (or is another process now: the start time differs); on another host its heartbeat is
older than `STALE_AFTER_HEARTBEATS` periods. Another host's lock with a recent heartbeat is watched until it
beats (a live run: refused), goes or turns stale, so a job requeued on another node the moment its node died
starts within minutes instead of failing. A run SIGKILLed leaves its lock behind; the next run takes it over.
The lock is removed at exit, errors and signals included.
"""

import json
import os
import socket
import threading
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from colossal_sd.errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_HEARTBEATS = 4
TAKEOVER_GUARD_STALE_S = 60.0  # a takeover takes milliseconds; a guard this old was left by a killed taker


def _pid_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: its lock is stale


def pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def this_run() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "started": now, "heartbeat": now}


def holder_is_gone(holder: dict, now: float, host: str) -> bool:
    """Whether the run named in a lock has ended (see the module docstring)."""
    if holder.get("host") == host:
        pid = holder.get("pid")
        if not isinstance(pid, int) or not pid_runs(pid):
            return True
        start = _pid_start(pid)
        return (start is None and Path("/proc").is_dir()) or (holder.get("pid_start") not in (None, start))
    return now - float(holder.get("heartbeat", 0)) > STALE_AFTER_HEARTBEATS * HEARTBEAT_S


def describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return f"an unreadable lock file, last written {_iso(holder['heartbeat'])}"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{_iso(float(holder.get('started', 0)))}")


def _write_new(path: Path, record: dict) -> bool:
    """Create the lock file if it does not exist (atomic: O_EXCL); False if another run has it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> Optional[dict]:
    """The holder's record, None if there is no lock; an unreadable one (being written, or its writer was
    killed mid-write) counts as another host's, with its file's time as heartbeat."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    try:
        return {"unreadable": True, "heartbeat": path.stat().st_mtime}
    except FileNotFoundError:
        return None


@contextmanager
def _takeover_guard(path: Path):
    """Only one run at a time may replace a stale lock: two takers would otherwise both win."""
    guard = path.with_name(path.name + ".takeover")
    try:
        if time.time() - guard.stat().st_mtime > TAKEOVER_GUARD_STALE_S:
            guard.unlink()
    except FileNotFoundError:
        pass
    if not _write_new(guard, this_run()):
        yield False
        return
    try:
        yield True
    finally:
        guard.unlink(missing_ok=True)


def acquire(output_dir, log: Callable[[str], None]) -> tuple:
    """(our record, None) once we hold the lock, or (None, the one-line refusal)."""
    path = Path(output_dir) / LOCK_NAME
    record, waited = this_run(), False
    for _ in range(100):  # retries only while another run is mid-write or mid-takeover
        if _write_new(path, record):
            return record, None
        holder = _read(path)
        if holder is None:  # released between our two looks
            continue
        if holder.get("unreadable") and time.time() - holder["heartbeat"] < 5:  # being written right now
            time.sleep(0.1)
            continue
        if not holder_is_gone(holder, time.time(), record["host"]):
            if holder.get("host") == record["host"] or waited:
                return None, (f"{output_dir} is in use by another run ({describe(holder)}); wait for it, "
                              "or use another --output_dir")
            _wait_while_unchanged(path, holder, log)
            waited = True
            continue
        with _takeover_guard(path) as ours:
            if ours and _read(path) == holder:  # still the stale one: no other taker replaced it meanwhile
                path.unlink(missing_ok=True)
                if _write_new(path, record):
                    log(f"took over the lock {path} of a run that is gone ({describe(holder)})")
                    return record, None
        time.sleep(0.1)
    return None, f"could not take the lock {path}: other runs keep taking it; use another --output_dir"


def _wait_while_unchanged(path: Path, holder: dict, log: Callable[[str], None]):
    """Another host's lock with a recent heartbeat: its run may live, or its node may just have died (a job
    requeued at once on another node). Watch it until it beats (alive), goes, or its heartbeat turns stale."""
    stale_at = float(holder.get("heartbeat", 0)) + STALE_AFTER_HEARTBEATS * HEARTBEAT_S
    log(f"{path} is held by another host's run ({describe(holder)}): waiting up to "
        f"{max(0, stale_at - time.time()):.0f} s for its heartbeat")
    while time.time() <= stale_at and _read(path) == holder:
        time.sleep(min(2.0, HEARTBEAT_S / 10))


def _is_ours(path: Path, record: dict) -> bool:
    holder = _read(path)
    return bool(holder) and all(holder.get(k) == record[k] for k in ("host", "pid", "started"))


def _heartbeat(path: Path, record: dict, stop: threading.Event):
    while not stop.wait(HEARTBEAT_S):
        if not _is_ours(path, record):
            return  # taken over (this run was frozen past the stale limit): never overwrite the new holder
        record = dict(record, heartbeat=time.time())
        tmp = path.with_name(f"{LOCK_NAME}.{record['pid']}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:  # a full disk: the next beat tries again; the run itself reports the disk
            with suppress(OSError):
                tmp.unlink()


def release(path: Path, record: dict):
    if _is_ours(path, record):
        path.unlink(missing_ok=True)


@contextmanager
def hold(output_dir, info, log: Callable[[str], None]):
    """Hold the output directory's lock for the run. Collective: rank 0 decides, every rank learns the verdict,
    and a refused run raises the same UserError on every rank."""
    record, refusal = acquire(output_dir, log) if info.is_main else (None, None)
    box = [refusal]
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(box[0])
    if record is None:  # not rank 0
        yield
        return
    path, stop = Path(output_dir) / LOCK_NAME, threading.Event()
    for leftover in path.parent.glob(f"{LOCK_NAME}.*.tmp"):  # a heartbeat killed mid-write: ours to clean now
        leftover.unlink(missing_ok=True)
    beat = threading.Thread(target=_heartbeat, args=(path, record, stop), daemon=True, name="lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        release(path, record)
