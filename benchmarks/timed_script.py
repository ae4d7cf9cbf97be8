"""Run a training script unchanged, timing its "Steps" progress bar: `python timed_script.py SCRIPT ARGS...`.

diffusers' example scripts log no per-step time; each optimizer step ends in `progress_bar.update(1)` of a tqdm bar
named "Steps", so that call's wall-clock time is recorded. At exit it prints one line `STEP_TIMES [t0, t1, ...]`
(perf_counter seconds), which sdxl_speed.py turns into a steady-state rate like our trainer's log.
"""

import atexit
import json
import runpy
import sys
import time

import tqdm.auto

STEP_TIMES = []
_update = tqdm.auto.tqdm.update


def _timed_update(self, n=1):
    if getattr(self, "desc", "") == "Steps":
        STEP_TIMES.append(time.perf_counter())
    return _update(self, n)


tqdm.auto.tqdm.update = _timed_update
atexit.register(lambda: print("STEP_TIMES " + json.dumps(STEP_TIMES), flush=True))

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
