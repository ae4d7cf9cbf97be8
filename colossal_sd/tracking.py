"""What the user sees: a progress bar and log lines on global rank 0, and TensorBoard / wandb events."""

import json
import os

from tqdm.auto import tqdm

REPORT_TO = ("tensorboard", "wandb", "all", "none")


def wanted(report_to: str, tracker: str) -> bool:
    return report_to in (tracker, "all")


class Tracker:
    """Rank-0-only logging. Other ranks get a tracker that does nothing, so the loop never checks ranks."""

    def __init__(self, enabled: bool, total_steps: int, report_to: str, logging_dir: str, initial_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="steps", disable=not enabled,
                        dynamic_ncols=True)
        if enabled and wanted(report_to, "tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(logging_dir, exist_ok=True)
            self.writer = SummaryWriter(logging_dir)
        if enabled and wanted(report_to, "wandb"):
            import wandb
            os.makedirs(logging_dir, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "colossal-sd"), dir=logging_dir)

    def info(self, message: str):
        if self.enabled:
            self.bar.write(message)

    def hyperparameters(self, config: dict):
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        if self.wandb is not None:
            self.wandb.config.update({k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                                      for k, v in config.items()})

    def step(self, n: int = 1):
        self.bar.update(n)

    def scalars(self, step: int, values: dict, prefix: str = "train"):
        if not self.enabled:
            return
        if prefix == "train":
            values = dict(values, **gpu_memory())
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self.info(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def image(self, step, tag: str, image):
        """A PIL image; step None means after training (logged at the last step)."""
        if not self.enabled:
            return
        step = self.bar.n if step is None else step
        if self.writer is not None:
            import numpy as np
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def gpu_memory() -> dict:
    """Peak GPU memory of this process since the start, where there is a GPU."""
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
