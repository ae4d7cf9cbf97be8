"""SIGTERM and SIGINT (SLURM, Kubernetes, Ctrl-C) ask the run to stop at the next step boundary.

The signal only sets a flag, from the start of the run to its end; the loop checks it after each optimizer
step, all ranks agree on it (a signal may reach one rank and not the others), and the run writes a checkpoint
and exits 0. A signal during the final save lets the save finish, then the run says so and exits 0.

Under torchrun the launcher forwards SIGTERM/SIGINT to the workers and gives them 30 s before SIGKILL
(torch 2.5 elastic agent), then exits with an error of its own; `colossal_sd.launch` turns that into exit 0
when rank 0 reports, through the file named by ``STOPPED_FILE_ENV``, that it stopped cleanly.
"""

import os
import signal

import torch
import torch.distributed as dist

STOPPED_FILE_ENV = "COLOSSAL_SD_STOPPED_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame):
        # A repeated signal changes nothing: under torchrun, Ctrl-C reaches a worker twice (from the terminal
        # and forwarded by the launcher).
        self.signal = self.signal or signum

    def agreed(self, device) -> bool:
        """Whether any rank got a signal. Collective: every rank calls it at the same step."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "another rank's signal"

    def close(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def signalled_during_final_save(stop_request: StopRequest, info, output_dir, log) -> bool:
    """After the final save: whether a signal came while it ran. It was only a flag, so the save completed; say
    so, and that the run ends here. Collective: every rank calls it."""
    if not stop_request.agreed(info.device):
        return False
    message = (f"got {stop_request.name} while saving the final outputs: the save completed first, "
               f"everything is in {output_dir}")
    log(message)
    if info.is_main:
        report_clean_stop(message)
    return True


def report_clean_stop(message: str):
    """Tell `colossal_sd.launch` (if it started us) that this run stopped on purpose, with a checkpoint."""
    path = os.environ.get(STOPPED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(message + "\n")
