"""Per-step encoding (what diffusers' train_text_to_image.py does: script 01, no cache) against our default
(script 02: cached latents and text embeddings), side by side on the same model, data, batch and resolution.

    python benchmarks/throughput.py                 # embedded tiny model and emoji data, CPU or GPU
    python benchmarks/throughput.py --steps 120 --batch_size 16

Prints steady-state images/s and peak RSS of each and their ratio, best of --repeats alternated runs. The cache is built by a first run of (b);
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
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each, alternated; the best rate and the highest peak RSS are reported")
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
        # Alternating (a) and (b) and keeping each one's best rate evens out a noisy, shared machine.
        rates, peaks = {"a": [], "b": []}, {"a": [], "b": []}
        for repeat in range(a.repeats):
            for name, flags in (("a", uncached), ("b", cached)):
                log, rss = run(flags, f"{tmp}/{name}{repeat}")
                assert name == "a" or "re-encoded nothing" in log, log[-2000:]
                rates[name].append(steady_images_per_s(log))
                peaks[name].append(rss)
    rate_a, rate_b = max(rates["a"]), max(rates["b"])
    rss_a, rss_b = max(peaks["a"]), max(peaks["b"])
    print(f"model {a.model}, {a.resolution} px, batch {a.batch_size}, {a.steps} steps, 1 process, best of "
          f"{a.repeats} alternated runs each (cache built once in {build_s:.0f} s, including start-up)")
    print("images/s of every run: " + ", ".join(f"({k}) {' '.join(f'{r:.1f}' for r in v)}" for k, v in rates.items()))
    print("| run | images/s | peak RSS (MiB) |")
    print("|---|---|---|")
    print(f"| (a) 01: plain DDP, VAE + text encoder every step | {rate_a:.1f} | {rss_a:.0f} |")
    print(f"| (b) 02: torch_ddp, cached latents + text embeddings | {rate_b:.1f} | {rss_b:.0f} |")
    print(f"| (b) / (a) | {rate_b / rate_a:.2f}x | {rss_b / rss_a:.2f}x |")


if __name__ == "__main__":
    main()
