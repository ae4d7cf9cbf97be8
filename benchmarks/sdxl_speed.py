"""Our cached SDXL loop against its limit and its peer, side by side on the same tiny SDXL pipeline (CPU):

    python benchmarks/sdxl_speed.py                      # embedded:tiny-sdxl, 64 px, batch 8, 60 steps, 3 repeats

  ours      our trainer as script 02 runs it: --plugin torch_ddp --cache_latents --cache_text_embeddings;
  bare      the limit: a bare PyTorch loop doing only the UNet step (noise, forward, loss, backward, clip, fused
            AdamW) on random latents and text states of the same shapes (family.random_conditioning);
  diffusers diffusers' examples/text_to_image/train_text_to_image_sdxl.py v0.29.0 under `accelerate launch --cpu`.
            It precomputes text embeddings and latents too, but still decodes and crops every image every step.

All three train the same UNet on the same batch size, resolution and data (the first --samples emoji as an
imagefolder). They run alternately, --repeats times each; each one's best steady-state rate (the first
--logging_steps steps left out, as warm-up) and highest peak RSS (os.wait4) are reported. Every process runs
with --threads intra-op threads: on a CPU shared with other jobs, two OpenMP threads on two cores spin-wait for
each other and a step gets many times slower.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from measure import ROOT, run_command

# diffusers v0.29.0's own script, shipped in benchmarks/reference/ (it is not in the diffusers wheel)
DIFFUSERS_SCRIPT = Path(os.environ.get("DIFFUSERS_SDXL_SCRIPT",
                                       Path(__file__).parent / "reference" / "train_text_to_image_sdxl.py"))
TIMED_SCRIPT = Path(__file__).resolve().parent / "timed_script.py"


def write_subset(source: Path, out: Path, rows: int) -> Path:
    """The first `rows` images of an imagefolder with their metadata.jsonl: the one data set all three read."""
    out.mkdir(parents=True)
    lines = (source / "metadata.jsonl").read_text().splitlines()[:rows]
    for line in lines:
        shutil.copy(source / json.loads(line)["file_name"], out)
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def steady_rates(step_times, batch_size: int, warmup: int) -> tuple:
    """(images per wall-clock second, images per CPU second) from the end of step `warmup` to the last step."""
    if len(step_times) <= warmup + 1:
        sys.exit(f"only {len(step_times)} step times: raise --steps")
    (wall0, cpu0), (wall1, cpu1) = step_times[warmup], step_times[-1]
    images = batch_size * (len(step_times) - 1 - warmup)
    return images / (wall1 - wall0), images / (cpu1 - cpu0)


def step_times_of(log: str) -> list:
    found = re.findall(r"^STEP_TIMES (\[.*\])$", log, flags=re.M)
    if not found:
        sys.exit(f"no STEP_TIMES line in:\n{log[-3000:]}")
    return json.loads(found[-1])


# -- (b) the bare loop, in its own process so that its peak RSS is its own ----------------------------------------

def bare_loop(model: str, resolution: int, batch_size: int, steps: int):
    """Only the UNet step, on random conditioning of the real shapes. Prints STEP_TIMES."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from colossal_sd import families
    from colossal_sd.embedded import resolve

    source = resolve(model) if model.startswith("embedded:") else model
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet").train()
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    family = families.of_folder(source)
    scale = 2 ** (len(json.loads(Path(source, "vae", "config.json").read_text())["block_out_channels"]) - 1)
    latents = torch.randn(batch_size, unet.config.in_channels, resolution // scale, resolution // scale)
    conditioning = family.random_conditioning(unet.config, batch_size, resolution, "cpu")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
    times = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **conditioning,
                          return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter(), time.process_time()))
    print("STEP_TIMES " + json.dumps(times), flush=True)


# -- the three, alternated --------------------------------------------------------------------------------------

def commands(a, data: Path, tmp: str):
    """name -> function(run index) -> (images per wall s, images per CPU s, peak RSS MiB)."""
    common = ["--pretrained_model_name_or_path", a.model, "--resolution", a.resolution, "--train_batch_size",
              a.batch_size, "--max_train_steps", a.steps, "--seed", "0", "--train_data_dir", data]
    ours_flags = common + ["--plugin", "torch_ddp", "--cache_latents", "--cache_text_embeddings",
                           "--cache_dir", f"{tmp}/cache", "--logging_steps", a.logging_steps]

    def ours(i):
        log, rss = run_command([sys.executable, TIMED_SCRIPT, ROOT / "stable_diffusion_colossalai_trainer.py",
                                *ours_flags, "--output_dir", f"{tmp}/ours{i}"])
        assert i < 0 or "re-encoded nothing" in log, log[-2000:]  # every timed run reuses the cache
        return (*steady_rates(step_times_of(log), a.batch_size, a.logging_steps), rss)

    def bare(i):
        log, rss = run_command([sys.executable, __file__, "--bare_loop", "--model", a.model, "--resolution",
                                a.resolution, "--batch_size", a.batch_size, "--steps", a.steps])
        return (*steady_rates(step_times_of(log), a.batch_size, a.logging_steps), rss)

    def diffusers(i):
        model = a.model
        if model.startswith("embedded:"):
            from colossal_sd.embedded import resolve
            model = resolve(model)
        flags = [*common[:1], model, *common[2:]]
        log, rss = run_command([Path(sys.executable).parent / "accelerate", "launch", "--cpu", "--num_processes", 1,
                                "--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no",
                                TIMED_SCRIPT, DIFFUSERS_SCRIPT, *flags, "--output_dir", f"{tmp}/diffusers{i}"])
        return (*steady_rates(step_times_of(log), a.batch_size, a.logging_steps), rss)

    return {"ours": ours, "bare": bare, "diffusers": diffusers}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny-sdxl")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--logging_steps", type=int, default=10, help="our log window; also the warm-up left out")
    p.add_argument("--samples", type=int, default=128, help="images in the data set (the loops run epochs over it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every process (OMP_NUM_THREADS)")
    p.add_argument("--only", nargs="+", choices=("ours", "bare", "diffusers"), help="run only these")
    p.add_argument("--bare_loop", action="store_true", help=argparse.SUPPRESS)  # (b)'s own process
    a = p.parse_args()
    if a.bare_loop:
        return bare_loop(a.model, a.resolution, a.batch_size, a.steps)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if not DIFFUSERS_SCRIPT.is_file():
        sys.exit(f"{DIFFUSERS_SCRIPT} not found: set DIFFUSERS_SDXL_SCRIPT to diffusers v0.29.0's "
                 "examples/text_to_image/train_text_to_image_sdxl.py")
    from colossal_sd.embedded import EMBEDDED_DATASET, resolve
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", f"{tmp}/hf-datasets")  # diffusers' map() writes its cache here
        data = write_subset(Path(resolve(EMBEDDED_DATASET)), Path(tmp) / "data", a.samples)
        runs = commands(a, data, tmp)
        names = a.only or list(runs)
        start = time.perf_counter()
        if "ours" in names:
            runs["ours"](-1)  # builds the cache
        build_s = time.perf_counter() - start
        runs_of = {n: [] for n in names}  # (images per wall s, images per CPU s, peak RSS MiB) of each run
        for i in range(a.repeats):
            for name in names:
                runs_of[name].append(runs[name](i))
                wall, cpu, peak = runs_of[name][-1]
                print(f"repeat {i + 1} {name}: {wall:.2f} images/s, {cpu:.2f} images per CPU s, "
                      f"peak RSS {peak:.0f} MiB", flush=True)
    report(a, names, runs_of, build_s)


def report(a, names, runs_of, build_s):
    print(f"model {a.model}, {a.resolution} px, batch {a.batch_size}, {a.steps} steps ({a.logging_steps} left out "
          f"as warm-up), {a.samples} images, {a.threads} thread(s), 1 process, best of {a.repeats} alternated runs; "
          f"our cache built in {build_s:.0f} s (including start-up); load average {os.getloadavg()[0]:.1f}")
    for name in names:
        print(f"{name}: images/s of every run {' '.join(f'{r[0]:.2f}' for r in runs_of[name])}; images per CPU s "
              f"{' '.join(f'{r[1]:.2f}' for r in runs_of[name])}")
    if "ours" in names:
        for other in (n for n in names if n != "ours"):
            pairs = " ".join(f"{o[0] / x[0]:.2f}/{o[1] / x[1]:.2f}" for o, x in zip(runs_of["ours"], runs_of[other]))
            print(f"ours / {other} of each alternated repeat (wall/CPU): {pairs}")
    best = {n: [max(r[k] for r in runs_of[n]) for k in range(3)] for n in names}  # best rates, highest RSS
    ours = best.get("ours")
    print("| run | images/s | steps/s | images per CPU s | peak RSS MiB | ours / this: images/s | images per CPU s "
          "| peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        wall, cpu, peak = best[name]
        ratios = (f"{ours[0] / wall:.2f}x | {ours[1] / cpu:.2f}x | {ours[2] / peak:.2f}x" if ours else "- | - | -")
        print(f"| {name} | {wall:.2f} | {wall / a.batch_size:.3f} | {cpu:.2f} | {peak:.0f} | {ratios} |")

if __name__ == "__main__":
    main()
