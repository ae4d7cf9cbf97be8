"""Print `RESULT {json}` lines from plugin_memory.py runs as a markdown table."""

import json
import sys

COLUMNS = ("unet", "resolution", "plugin", "placement", "precision", "batch", "grad_ckpt", "peak_gib", "train_peak_gib",
           "steps_per_s", "images_per_s",
           "first_loss", "last_loss", "loss_ok")


def cell(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(path):
    rows = [json.loads(line.split(" ", 1)[1]) for line in open(path) if line.startswith("RESULT ")]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        if "failed" in row:
            print(f"| failed: {row['failed']} |")
        else:
            print("| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
