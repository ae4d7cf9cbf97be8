"""Exact resume under the GPU-only plugins (gemini, low_level_zero): PASS or FAIL with the max weight difference.

    python benchmarks/gpu_resume_check.py            # every visible GPU as one process each
    python benchmarks/gpu_resume_check.py --nproc 2

For each plugin it trains the embedded tiny model for STEPS steps, uninterrupted twice (the second run measures
the run-to-run noise of CUDA kernels), then once stopped at STEPS/2 by --stop_after_steps and resumed with
--resume_from_checkpoint latest. It passes when the resumed weights match the first run to 1e-6, or to no
more than the two uninterrupted runs differ. Gemini and ZeRO write sharded optimizer state (optimizer/), so
this is the proof that sharded state resumes. Needs CUDA; CI (CPU) runs the torch_ddp/none version in
tests/test_resume.py.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
FAST = ["--resolution", "32", "--max_train_samples", "48", "--train_batch_size", "4", "--seed", "7",
        "--max_train_steps", str(STEPS), "--report_to", "none", "--logging_steps", "1"]
# (plugin, precision): ZeRO in fp32 keeps exactly the weights it saves; Gemini saves its fp32 master weights.
CASES = [("gemini", "bf16"), ("low_level_zero", "no")]


def train(out: Path, nproc: int, *extra):
    cmd = [sys.executable, "-m", "colossal_sd.launch", "--standalone", "--nproc_per_node", str(nproc),
           "stable_diffusion_colossalai_trainer.py", *FAST, "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def check(plugin: str, precision: str, nproc: int, tmp: Path) -> bool:
    flags = ["--plugin", plugin, "--mixed_precision", precision]
    base = tmp / f"{plugin}-{precision}"
    train(base / "reference", nproc, *flags)
    train(base / "again", nproc, *flags)
    train(base / "resumed", nproc, *flags, "--stop_after_steps", str(STEPS // 2))
    assert (base / "resumed" / f"checkpoint-{STEPS // 2}" / "checkpoint_complete.json").is_file()
    sharded = (base / "resumed" / f"checkpoint-{STEPS // 2}" / "optimizer").is_dir()
    log = train(base / "resumed", nproc, *flags, "--resume_from_checkpoint", "latest")
    assert f"resumed from {base / 'resumed' / f'checkpoint-{STEPS // 2}'}" in log, log[-3000:]
    noise = max_difference(base / "reference", base / "again")
    diff = max_difference(base / "reference", base / "resumed")
    ok = diff <= max(1e-6, noise)
    print(f"{'PASS' if ok else 'FAIL'} {plugin} {precision} processes={nproc}: resumed vs uninterrupted max |dw| = "
          f"{diff:.3g} (two uninterrupted runs differ by {noise:.3g}; sharded optimizer state: {sharded})",
          flush=True)
    return ok


def main():
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 1))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_resume_check needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(plugin, precision, args.nproc, Path(tmp)) for plugin, precision in CASES]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
