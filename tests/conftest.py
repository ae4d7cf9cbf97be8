import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small and fast: every CLI test trains the embedded tiny model at 32 px on a few dozen images.
FAST = ["--resolution", "32", "--max_train_samples", "48", "--train_batch_size", "4", "--max_train_steps", "3",
        "--logging_steps", "1", "--seed", "7"]


@pytest.fixture(scope="session", autouse=True)
def embedded_home(tmp_path_factory):
    """Tests build the embedded model and data themselves, exactly as a new user's first run does."""
    home = os.environ.get("COLOSSAL_SD_TEST_HOME") or str(tmp_path_factory.mktemp("colossal_sd_home"))
    os.environ["COLOSSAL_SD_HOME"] = home
    from colossal_sd import embedded
    embedded.resolve(embedded.EMBEDDED_MODEL)
    embedded.resolve(embedded.EMBEDDED_DATASET)
    embedded.resolve(embedded.EMBEDDED_DEMO_DATASET)
    return Path(home)


@pytest.fixture(scope="session")
def tiny_sd(embedded_home):
    """The embedded model's pipeline directory."""
    from colossal_sd import embedded
    return Path(embedded.resolve(embedded.EMBEDDED_MODEL))


@pytest.fixture(scope="session")
def tiny_sdxl(embedded_home):
    """The embedded SDXL model's pipeline directory (built on first use)."""
    from colossal_sd import embedded
    return Path(embedded.resolve(embedded.EMBEDDED_SDXL_MODEL))


def _env(extra=None):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def trainer_command(*args, nproc=None, launcher="torch.distributed.run"):
    """The trainer as users run it: plain python (nproc None) or a torchrun launcher with nproc processes."""
    if nproc is None:
        cmd = [sys.executable, "stable_diffusion_colossalai_trainer.py"]
    else:
        cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node", str(nproc),
               "stable_diffusion_colossalai_trainer.py"]
    return cmd + [str(a) for a in args]


def run_trainer(*args, nproc=None, env=None, timeout=600, check=True):
    return _run(trainer_command(*args, nproc=nproc), env, timeout, check)


def start_trainer(*args, nproc=None, launcher="torch.distributed.run"):
    """A running trainer whose log lines (stdout, stderr merged) the test reads as they come."""
    return subprocess.Popen(trainer_command(*args, nproc=nproc, launcher=launcher), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_script(script, *args, env=None, timeout=900, check=True):
    return _run(["bash", script, *[str(a) for a in args]], env, timeout, check)


def _run(cmd, env, timeout, check):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def load_pipeline(path):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)


def sample(pipeline, size=32, seed=0):
    import torch
    return pipeline("an emoji of a cat", num_inference_steps=2, height=size, width=size, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


def unet_weights(path):
    from safetensors.torch import load_file
    return load_file(Path(path) / "unet" / "diffusion_pytorch_model.safetensors")


def write_imagefolder(folder: Path, images: dict, captions: dict):
    """images: file name -> PIL image or raw bytes; captions: file name -> caption (str or list)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        if isinstance(image, bytes):
            (folder / name).write_bytes(image)
        else:
            image.save(folder / name)
    with open(folder / "metadata.jsonl", "w") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


@pytest.fixture
def single_rank(monkeypatch):
    """The log window's all-reduce as one rank sees it: the identity. A real one-process gloo group can hang
    this process when it is destroyed (its worker thread waits for the GIL that the destructor holds); the
    2-process CLI tests cover the real reduction."""
    import torch.distributed as dist
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: None)
