"""Run a training script unchanged, timing its step progress bar: `python timed_script.py SCRIPT ARGS...`.

diffusers' example scripts log no per-step time, and our log gives wall-clock rates only. Each optimizer step of
both ends in `update(1)` of a tqdm bar named "Steps" (diffusers) or "steps" (ours), so that call's wall-clock
time and the process's CPU time (all its threads) are recorded. At exit it prints one line
`STEP_TIMES [[wall_s, cpu_s], ...]`, which sdxl_speed.py turns into steady-state rates.
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
    if str(getattr(self, "desc", "")).lower() == "steps":
        STEP_TIMES.append((time.perf_counter(), time.process_time()))
    return _update(self, n)


tqdm.auto.tqdm.update = _timed_update
atexit.register(lambda: print("STEP_TIMES " + json.dumps(STEP_TIMES), flush=True))

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
