"""Per-step encoding (what diffusers' train_text_to_image.py does: script 01, no cache) against our default
(script 02: cached latents and text embeddings), side by side on the same model, data, batch and resolution.

    python benchmarks/throughput.py                 # embedded tiny model and emoji data, CPU or GPU
    python benchmarks/throughput.py --steps 120 --batch_size 16

Prints steady-state images/s and peak RSS of each and their ratio. The cache is built by a first run of (b);
its time is reported apart, since every later run reuses it.
"""

import argparse
import tempfile
import time

from measure import run, steady_images_per_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny-sd")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    common = ["--pretrained_model_name_or_path", a.model, "--resolution", a.resolution, "--train_batch_size",
              a.batch_size, "--max_train_steps", a.steps, "--max_train_samples", a.batch_size * a.steps,
              "--logging_steps", max(a.steps // 6, 1), "--seed", "0", "--report_to", "none"]
    uncached = common + ["--plugin", "none"]
    with tempfile.TemporaryDirectory() as tmp:
        cached = common + ["--plugin", "torch_ddp", "--cache_latents", "--cache_text_embeddings",
                           "--cache_dir", f"{tmp}/cache"]
        start = time.perf_counter()
        build_log, _ = run(cached, f"{tmp}/build")
        build_s = time.perf_counter() - start
        log_a, rss_a = run(uncached, f"{tmp}/a")
        log_b, rss_b = run(cached, f"{tmp}/b")
    assert "re-encoded nothing" in log_b, log_b[-2000:]
    rate_a, rate_b = steady_images_per_s(log_a), steady_images_per_s(log_b)
    print(f"model {a.model}, {a.resolution} px, batch {a.batch_size}, {a.steps} steps, 1 process "
          f"(cache built once in {build_s:.0f} s, including start-up)")
    print("| run | images/s | peak RSS (MiB) |")
    print("|---|---|---|")
    print(f"| (a) 01: plain DDP, VAE + text encoder every step | {rate_a:.1f} | {rss_a:.0f} |")
    print(f"| (b) 02: torch_ddp, cached latents + text embeddings | {rate_b:.1f} | {rss_b:.0f} |")
    print(f"| (b) / (a) | {rate_b / rate_a:.2f}x | {rss_b / rss_a:.2f}x |")


if __name__ == "__main__":
    main()
