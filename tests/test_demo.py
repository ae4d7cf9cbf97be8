"""The README's main command is a demo that visibly learns: its samples follow the prompt."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import _run, run_script

HEARTS = {"red": 0, "green": 1, "blue": 2}


def test_default_demo_draws_each_heart_in_the_colour_its_prompt_names(tmp_path):
    out = tmp_path / "out"
    proc = run_script("02_run_trainer_with_colossalai.sh", env={"OUTPUT_DIR": str(out)}, timeout=1800)
    log = proc.stdout + proc.stderr
    assert "samples=60" in log and "steps=2500" in log and "seed=0" in log  # the 60 colour-named emoji
    assert (out / "samples" / "final.png").exists()
    for colour, channel in HEARTS.items():
        folder = tmp_path / colour
        _run([sys.executable, "sample.py", "--model", str(out), "--prompt", f"an emoji of {colour} heart",
              "--num_images", "4", "--output_dir", str(folder)], None, 300, True)
        pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255
                                 for p in sorted(folder.glob("0*.png"))])
        drawn = pixels[pixels.min(1) < 0.9].mean(0)  # the heart, not the white background
        others = [c for c in range(3) if c != channel]
        assert all(drawn[channel] > drawn[c] + 0.05 for c in others), f"{colour} heart drawn as rgb {drawn}"


def test_the_demo_data_is_the_emoji_named_by_a_colour(embedded_home):
    from colossal_sd import embedded

    folder = Path(embedded.resolve(embedded.EMBEDDED_DEMO_DATASET))
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    captions = {r["text"] for r in rows}
    assert len(rows) == 60 and {f"an emoji of {c} heart" for c in HEARTS} <= captions
    assert all(c.removeprefix("an emoji of ").removeprefix("light ").split()[0] in embedded.COLOURS for c in captions)
    assert not any("skin tone" in c for c in captions)
    assert all((folder / r["file_name"]).is_file() for r in rows)
