"""Run the trainer as a user would and measure it: its log, peak RSS and steady-state images/s."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks import the package they measure


def run(flags, output_dir) -> tuple:
    """Train once; returns (log, peak RSS in MiB) of that process alone (os.wait4 gives per-child usage)."""
    return run_command([sys.executable, str(ROOT / "stable_diffusion_colossalai_trainer.py"), *map(str, flags),
                        "--output_dir", str(output_dir)])


def run_command(cmd) -> tuple:
    """Run `cmd` to the end; returns (log, peak RSS in MiB): the largest RSS of it and the children it waited for."""
    cmd = list(map(str, cmd))
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return text, usage.ru_maxrss / 1024  # Linux reports KiB


def steady_images_per_s(log: str) -> float:
    """Mean images/s over the step log lines, leaving out the first window (warm-up, allocator growth)."""
    rates = [float(m) for m in re.findall(r"^step \d+: .*?images_per_s=([\d.]+)", log, flags=re.M)]
    if len(rates) < 2:
        sys.exit("too few log lines for a steady-state rate: raise --steps or lower --logging_steps")
    return sum(rates[1:]) / len(rates[1:])
