"""What the user sees: a progress bar and log lines on global rank 0, and TensorBoard events."""

import json
import os

from tqdm.auto import tqdm


class Tracker:
    """Rank-0-only logging. Other ranks get a tracker that does nothing, so the loop never checks ranks."""

    def __init__(self, enabled: bool, total_steps: int, report_to: str, logging_dir: str, initial_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", disable=not enabled,
                        dynamic_ncols=True)
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(logging_dir, exist_ok=True)
            self.writer = SummaryWriter(logging_dir)

    def info(self, message: str):
        if self.enabled:
            self.bar.write(message)

    def hyperparameters(self, config: dict):
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def step(self, n: int = 1):
        self.bar.update(n)

    def scalars(self, step: int, values: dict):
        if not self.enabled:
            return
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self.info(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
