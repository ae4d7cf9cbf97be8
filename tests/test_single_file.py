"""Single-file checkpoints: export in the original SD layout, train from one, never run a .ckpt's code."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, run_trainer, unet_weights
from test_bad_input import assert_one_line_error

from colossal_sd import single_file
from colossal_sd.embedded import EMBEDDED_MODEL
from colossal_sd.errors import UserError

MODELS = ("unet", "vae", "text_encoder")


class PlantedCode:
    """Unpickling this creates a marker file: what a malicious .ckpt would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def configs_only(pipeline: Path, target: Path) -> Path:
    """What diffusers' from_single_file caches of a hub pipeline: configs and tokenizer, no weights. Its
    model_index.json names a safety checker, as SD 1.5's does."""
    shutil.copytree(pipeline, target, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((target / "model_index.json").read_text())
    if index["_class_name"] == "StableDiffusionPipeline":
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def assert_same_models(a, b):
    for name in MODELS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full fine-tune of the embedded model that also writes the single file."""
    out = tmp_path_factory.mktemp("single") / "my-model"
    proc = run_trainer(*FAST, "--save_single_file", "--output_dir", out)
    return out, proc.stdout + proc.stderr


def test_single_file_is_written_atomically_in_the_original_layout(trained):
    out, log = trained
    path = out / "my-model.safetensors"
    assert f"saved the single-file checkpoint {path}" in log
    assert not list(out.glob(".tmp-*"))
    weights = load_file(path)
    prefixes = {key.split(".")[0] for key in weights}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in weights
    assert weights["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # a 1x1 conv in LDM
    assert all(w.dtype == torch.float32 for w in weights.values())  # the saved pipeline's precision


def test_diffusers_from_single_file_gives_back_the_saved_pipeline(trained):
    from diffusers import StableDiffusionPipeline

    out, _ = trained
    saved = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded = StableDiffusionPipeline.from_single_file(str(out / "my-model.safetensors"), config=str(out),
                                                        local_files_only=True)
    assert_same_models(saved, reloaded)


def test_training_from_a_single_file_matches_training_from_the_directory(trained, tmp_path, tiny_sd):
    """Same weights, seed and data: a .safetensors base model trains to the very same UNet as the directory."""
    out, _ = trained
    base = single_file.save_single_file(tiny_sd, tmp_path / "tiny.safetensors")
    run_trainer(*FAST, "--pretrained_model_name_or_path", base, "--single_file_config", EMBEDDED_MODEL,
                "--output_dir", tmp_path / "out")
    expected, got = unet_weights(out), unet_weights(tmp_path / "out")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_ckpt_that_runs_code_is_refused_unless_allowed(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    marker = tmp_path / "code-ran"
    ldm = load_file(single_file.save_single_file(tiny_sd, tmp_path / "tiny.safetensors"))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm, "callbacks": PlantedCode(marker)}, ckpt)
    config = configs_only(tiny_sd, tmp_path / "configs")
    args = ["--pretrained_model_name_or_path", ckpt, "--single_file_config", config, *FAST]

    proc = run_trainer(*args, "--output_dir", tmp_path / "refused", check=False, timeout=180)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--allow_unsafe_pickle")
    assert not marker.exists()

    run_trainer(*args, "--max_train_steps", "1", "--allow_unsafe_pickle", "--output_dir", tmp_path / "allowed")
    assert marker.exists()
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "allowed", local_files_only=True)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    for name in ("vae", "text_encoder"):  # frozen: exactly the file's weights
        assert all(torch.equal(v, getattr(base, name).state_dict()[k])
                   for k, v in getattr(saved, name).state_dict().items())


def test_a_plain_ckpt_loads_with_weights_only(tmp_path):
    weights = {"model.diffusion_model.out.2.bias": torch.arange(4.0)}
    torch.save({"state_dict": weights, "global_step": 3}, tmp_path / "plain.ckpt")
    loaded = single_file.read_checkpoint(tmp_path / "plain.ckpt")
    assert loaded.keys() == weights.keys()
    assert torch.equal(loaded["model.diffusion_model.out.2.bias"], torch.arange(4.0))


@pytest.mark.parametrize("generation, guess", [
    ("sd1", "stable-diffusion-v1-5"), ("sd2", "stable-diffusion-2-1"), ("sdxl", "stable-diffusion-xl-base-1.0")])
def test_without_a_config_the_guess_comes_from_the_local_cache_only(generation, guess, tmp_path):
    from argparse import Namespace

    args = Namespace(single_file_config=None, cache_dir=str(tmp_path), pretrained_model_name_or_path="sd.safetensors")
    with pytest.raises(UserError, match=f"pass --single_file_config .*{guess}"):
        single_file.config_source(args, single_file.LAYOUTS[generation])


def test_layout_for_sd1_block_structure_is_the_one_diffusers_reads():
    """SD 1.x's structure (4 levels, 2 layers each, attention in the first three) at toy width: diffusers' own
    reader of original checkpoints maps every exported tensor back to where it came from, and so does ours."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    layout = single_file.LAYOUTS["sd1"]
    models = {"unet": unet, "vae": vae}
    configs = {name: dict(model.config) for name, model in models.items()}
    layout = single_file.Layout("toy", "", layout.parts[:2], layout.architectures)
    ldm = layout.to_original({name: model.state_dict() for name, model in models.items()}, configs)
    for model, converted in ((unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
                             (vae, convert_ldm_vae_checkpoint(ldm, dict(vae.config)))):
        original = model.state_dict()
        assert converted.keys() == original.keys()
        assert all(torch.equal(converted[k].reshape(original[k].shape), original[k]) for k in original)
    back = layout.from_original(ldm, {name: model.state_dict() for name, model in models.items()}, configs)
    for name, model in models.items():
        assert all(torch.equal(back[name][k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args, expected", [
    (["--single_file_config", "x"], "goes with a single-file"),
    (["--allow_unsafe_pickle"], "only applies to a .ckpt"),
    (["--pretrained_model_name_or_path", "/no/such/model.safetensors"], "does not exist"),
])
def test_single_file_flags_misused_are_one_clear_line(args, expected, tmp_path):
    proc = run_trainer(*args, "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, expected)


# ---------------------------------------------------------------- SD 2.x and SDXL

REFERENCE = Path(__file__).parent / "reference"  # diffusers v0.29.0's own conversion scripts (see its README)
REFERENCE_SCRIPTS = {"sd2": str(REFERENCE / "convert_diffusers_to_original_stable_diffusion.py"),
                     "sdxl": str(REFERENCE / "convert_diffusers_to_original_sdxl.py")}
PIPELINES = {"sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def build_tiny_sd2(tiny_sd: Path, out: Path) -> Path:
    """SD 2.x's structure at toy width: a 4-level UNet with 2 layers per block, linear attention projections and
    more heads in the deeper blocks; an OpenCLIP-shaped text encoder (exact GELU, 23 layers as diffusers keeps of
    OpenCLIP-H); a 4-level VAE; a v-prediction scheduler, as SD 2.1 768's."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    config = CLIPTextConfig.from_pretrained(tiny_sd / "text_encoder")
    config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=23, num_attention_heads=2,
                       hidden_act="gelu", projection_dim=32))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                attention_head_dim=(1, 1, 2, 2), use_linear_projection=True, cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory, tiny_sd):
    return build_tiny_sd2(tiny_sd, tmp_path_factory.mktemp("sd2") / "tiny-sd2")


@pytest.fixture(scope="module")
def tiny_sdxl(embedded_home):
    from colossal_sd import embedded
    return Path(embedded.resolve(embedded.EMBEDDED_SDXL_MODEL))


@pytest.fixture(scope="module")
def exported(tiny_sd2, tiny_sdxl, tmp_path_factory):
    """{generation: (pipeline folder, our single file of it)}."""
    out = tmp_path_factory.mktemp("exported")
    return {name: (folder, single_file.save_single_file(folder, out / f"{name}.safetensors"))
            for name, folder in (("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


@pytest.mark.parametrize("generation", ["sd2", "sdxl"])
def test_file_holds_every_tensor_diffusers_conversion_script_writes(generation, exported, tmp_path):
    import subprocess
    import sys

    folder, ours = exported[generation]
    reference = tmp_path / "reference.safetensors"
    subprocess.run([sys.executable, REFERENCE_SCRIPTS[generation], "--model_path", str(folder),
                    "--checkpoint_path", str(reference), "--use_safetensors"], check=True, capture_output=True)
    expected, got = load_file(reference), load_file(ours)
    assert not expected.keys() - got.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_sd2_file_carries_openclip_h_blocks_ui_loaders_expect(exported):
    """diffusers keeps 23 blocks; the file has the 24th (a copy of the 23rd, as kohya writes), a projection and
    logit_scale, which A1111 and ComfyUI load and SD 2.x never uses (it reads the penultimate block)."""
    weights = load_file(exported["sd2"][1])
    prefix = "cond_stage_model.model."
    assert torch.equal(weights[prefix + "transformer.resblocks.23.attn.in_proj_weight"],
                       weights[prefix + "transformer.resblocks.22.attn.in_proj_weight"])
    assert not any(key.startswith(prefix + "transformer.resblocks.24.") for key in weights)
    assert torch.equal(weights[prefix + "text_projection"], torch.ones(32, 32))
    assert weights[prefix + "logit_scale"].item() == 1


@pytest.mark.parametrize("generation, architecture, prediction", [
    ("sd2", "stable-diffusion-v2-768-v", "v"), ("sdxl", "stable-diffusion-xl-v1-base", "epsilon")])
def test_metadata_states_architecture_and_prediction_type(generation, architecture, prediction, exported):
    folder, path = exported[generation]
    metadata = single_file.read_metadata(path)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == prediction
    assert metadata["modelspec.title"] == folder.name and metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.sai_model_spec"]


@pytest.mark.parametrize("generation", ["sd2", "sdxl"])
def test_diffusers_from_single_file_gives_back_the_pipeline(generation, exported):
    import diffusers

    folder, path = exported[generation]
    cls = getattr(diffusers, PIPELINES[generation])
    saved = cls.from_pretrained(folder, local_files_only=True)
    reloaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in single_file.LAYOUTS[generation].components:
        left, right = getattr(saved, name).state_dict(), getattr(reloaded, name).state_dict()
        assert left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), name


@pytest.mark.parametrize("generation", ["sd2", "sdxl"])
def test_our_reader_recognises_the_generation_and_gives_back_every_tensor(generation, exported):
    """SDXL is read into its diffusers parts the same way, ready for SDXL training."""
    import diffusers

    folder, path = exported[generation]
    checkpoint = single_file.read_checkpoint(path)
    assert single_file.detect_family(checkpoint) == generation
    base = single_file.BaseSingleFile(str(path), checkpoint, single_file.LAYOUTS[generation], str(folder), None)
    models = single_file.build_models(base, {})
    saved = getattr(diffusers, PIPELINES[generation]).from_pretrained(folder, local_files_only=True)
    assert set(models) == set(single_file.LAYOUTS[generation].components)
    for name, model in models.items():
        expected = getattr(saved, name).state_dict()
        assert model.state_dict().keys() == expected.keys(), name
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items()), name


def without_metadata(path: Path, target: Path) -> Path:
    from safetensors.torch import save_file
    save_file(load_file(path), target)
    return target


def test_training_from_an_sd2_file_matches_its_folder_and_its_metadata_decides_v(exported, tmp_path):
    """The config pipeline here says epsilon; the file's metadata says v, and v is what both runs train."""
    from diffusers import DDIMScheduler

    folder, path = exported["sd2"]
    config = configs_only(folder, tmp_path / "configs")
    DDIMScheduler.from_pretrained(config, subfolder="scheduler", prediction_type="epsilon").save_pretrained(
        config / "scheduler")
    args = [*FAST, "--resolution", "64"]
    run_trainer(*args, "--pretrained_model_name_or_path", folder, "--output_dir", tmp_path / "folder")
    run_trainer(*args, "--pretrained_model_name_or_path", path, "--single_file_config", config,
                "--save_single_file", "--output_dir", tmp_path / "file")
    expected, got = unet_weights(tmp_path / "folder"), unet_weights(tmp_path / "file")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    saved = json.loads((tmp_path / "file" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    written = single_file.read_metadata(single_file.single_file_path(tmp_path / "file"))
    assert written["modelspec.architecture"] == "stable-diffusion-v2-768-v"


def test_an_sd2_file_that_does_not_say_what_it_predicts_asks_for_the_flag(exported, tmp_path):
    bare = without_metadata(exported["sd2"][1], tmp_path / "bare.safetensors")
    proc = run_trainer(*FAST, "--pretrained_model_name_or_path", bare, "--output_dir", tmp_path / "out",
                       check=False, timeout=180)
    assert_one_line_error(proc, "pass --prediction_type v_prediction")


def test_a_file_and_a_config_of_different_generations_are_refused(exported, tmp_path, tiny_sd):
    proc = run_trainer(*FAST, "--pretrained_model_name_or_path", exported["sdxl"][1], "--single_file_config",
                       tiny_sd, "--output_dir", tmp_path / "out", check=False, timeout=180)
    assert_one_line_error(proc, "is an SDXL single file, but --single_file_config")


@pytest.mark.skipif("text_encoders" not in getattr(__import__("colossal_sd.models").models.StableDiffusionParts,
                                                   "__dataclass_fields__", {}),
                    reason="SDXL training (parts.text_encoders) is not merged yet")
def test_training_from_an_sdxl_file_matches_its_folder(exported, tmp_path):
    folder, path = exported["sdxl"]
    run_trainer(*FAST, "--pretrained_model_name_or_path", folder, "--output_dir", tmp_path / "folder")
    run_trainer(*FAST, "--pretrained_model_name_or_path", path, "--single_file_config",
                configs_only(folder, tmp_path / "configs"), "--save_single_file", "--output_dir", tmp_path / "file")
    expected, got = unet_weights(tmp_path / "folder"), unet_weights(tmp_path / "file")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    written = single_file.read_metadata(single_file.single_file_path(tmp_path / "file"))
    assert written["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
