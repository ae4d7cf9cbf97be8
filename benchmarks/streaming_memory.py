"""Peak RSS of a --streaming run over a generated parquet dataset of 1k rows and of 20k rows: it stays flat.

    python benchmarks/streaming_memory.py            # rows 1000 and 20000, 32 px, 20 steps
"""

import argparse
import io
import os
import tempfile

import numpy as np

from measure import run


def write_parquet(path, rows: int, size: int = 48):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images, captions = [], []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        captions.append(f"random picture number {i}")
    # several row groups, so the stream reads a slice at a time
    pq.write_table(pa.table({"image": images, "text": captions}), path, row_group_size=1000)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    print("| rows | parquet MiB | peak RSS (MiB) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in a.rows:
            data = f"{tmp}/data-{rows}.parquet"
            write_parquet(data, rows)
            _, rss = run(["--dataset_name", data, "--streaming", "--resolution", "32", "--train_batch_size", "8",
                          "--max_train_steps", a.steps, "--dataloader_num_workers", "2", "--report_to", "none",
                          "--seed", "0"], f"{tmp}/out-{rows}")
            print(f"| {rows} | {os.path.getsize(data) / 2**20:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
