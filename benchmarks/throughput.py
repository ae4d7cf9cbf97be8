"""Per-step encoding (what diffusers' train_text_to_image.py does: script 01, no cache) against our default
(script 02: cached latents and text embeddings), side by side on the same model, data, batch and resolution.

    python benchmarks/throughput.py                 # embedded tiny model, 64 px, batch 8, CPU or GPU
    python benchmarks/throughput.py --steps 120 --repeats 3

Two data sets, each trained by both:
  emoji   the embedded emoji, 72 px PNGs: decoding costs almost nothing, so only the encoders are saved.
  photos  the same emoji and captions as 512 px JPEGs, the size of a typical user's photos. (a) decodes and
          resizes them every step, as diffusers' script does; (b) never decodes them after the cache is built.
Prints steady-state images/s and peak RSS of each and their ratio, best of --repeats alternated runs. Each
cache is built by a first run of (b); its time is reported apart, since every later run reuses it.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from measure import run, steady_images_per_s

PHOTO_PX = 512


def write_photo_sized_copy(source: Path, out: Path, rows: int) -> Path:
    """The first `rows` emoji upscaled to PHOTO_PX and saved as JPEG, with their captions, as an imagefolder."""
    from PIL import Image

    out.mkdir(parents=True)
    lines = (source / "metadata.jsonl").read_text().splitlines()[:rows]
    with open(out / "metadata.jsonl", "w") as metadata:
        for line in lines:
            row = json.loads(line)
            name = Path(row["file_name"]).with_suffix(".jpg").name
            with Image.open(source / row["file_name"]) as image:
                image.convert("RGB").resize((PHOTO_PX, PHOTO_PX), Image.BICUBIC).save(out / name, quality=90)
            metadata.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
    return out


def compare(common, tmp: str, repeats: int) -> dict:
    """Build the cache with (b), then run (a) and (b) alternately, which evens out a noisy, shared machine."""
    uncached = common + ["--plugin", "none"]
    cached = common + ["--plugin", "torch_ddp", "--cache_latents", "--cache_text_embeddings",
                       "--cache_dir", f"{tmp}/cache"]
    start = time.perf_counter()
    run(cached, f"{tmp}/build")
    result = {"build_s": time.perf_counter() - start, "a": [], "b": [], "rss_a": [], "rss_b": []}
    for repeat in range(repeats):
        for name, flags in (("a", uncached), ("b", cached)):
            log, rss = run(flags, f"{tmp}/{name}{repeat}")
            assert name == "a" or "re-encoded nothing" in log, log[-2000:]
            result[name].append(steady_images_per_s(log))
            result[f"rss_{name}"].append(rss)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny-sd")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each, alternated; the best rate and the highest peak RSS are reported")
    a = p.parse_args()
    samples = a.batch_size * a.steps
    common = ["--pretrained_model_name_or_path", a.model, "--resolution", a.resolution, "--train_batch_size",
              a.batch_size, "--max_train_steps", a.steps, "--max_train_samples", samples,
              "--logging_steps", max(a.steps // 6, 1), "--seed", "0", "--report_to", "none"]
    from colossal_sd.embedded import EMBEDDED_DATASET, resolve
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photo_sized_copy(Path(resolve(EMBEDDED_DATASET)), Path(tmp) / "photo-sized-data", samples)
        for name, data in (("emoji", ["--dataset_name", EMBEDDED_DATASET]), ("photos", ["--train_data_dir", photos])):
            results[name] = compare(common + data, f"{tmp}/{name}", a.repeats)
    print(f"model {a.model}, {a.resolution} px, batch {a.batch_size}, {a.steps} steps, 1 process, best of "
          f"{a.repeats} alternated runs each")
    for name, r in results.items():
        pairs = " ".join(f"{b / a:.2f}x" for a, b in zip(r["a"], r["b"]))
        print(f"{name}: cache built in {r['build_s']:.0f} s (including start-up); images/s of every run: "
              f"(a) {' '.join(f'{x:.1f}' for x in r['a'])}, (b) {' '.join(f'{x:.1f}' for x in r['b'])}; "
              f"(b) / (a) of each alternated pair: {pairs}")
    print("| data | (a) 01, encoders every step: images/s | (b) 02, cached: images/s | (b) / (a) "
          "| (a) peak RSS MiB | (b) peak RSS MiB | (b) / (a) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate_a, rate_b, rss_a, rss_b = max(r["a"]), max(r["b"]), max(r["rss_a"]), max(r["rss_b"])
        print(f"| {name} | {rate_a:.1f} | {rate_b:.1f} | {rate_b / rate_a:.2f}x | {rss_a:.0f} | {rss_b:.0f} "
              f"| {rss_b / rss_a:.2f}x |")


if __name__ == "__main__":
    main()
