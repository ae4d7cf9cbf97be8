"""--config FILE (TOML or YAML), the run's own output_dir/training_config.toml, and CONFIG= for the scripts."""

import re
import tomllib

import pytest
import torch

from conftest import FAST, run_script, run_trainer, unet_weights
from test_bad_input import assert_one_line_error


def write(path, text):
    path.write_text(text)
    return path


def parse(*argv):
    from parse_arguments import parse_args
    return parse_args([str(a) for a in argv])


def refused(*argv) -> str:
    from colossal_sd.errors import UserError
    with pytest.raises(UserError) as e:
        parse(*argv)
    return str(e.value)


def first_log_line(proc) -> str:
    return next(line for line in (proc.stdout + proc.stderr).splitlines() if "images/step=" in line)


# --- the file becomes the flags' own tokens (fast)

def test_yaml_values_go_through_the_flags_own_types(tmp_path):
    config = write(tmp_path / "run.yaml", "learning_rate: 1e-3\nuse_lora: true\ngemini_async_reduce: false\n"
                                          "validation_prompts: [a cat, a dog]\nmax_train_steps: 2\ncache_dir: null\n")
    args = parse("--config", config)
    assert args.learning_rate == 0.001 and isinstance(args.learning_rate, float)  # YAML read "1e-3" as a string
    assert args.use_lora and args.gemini_async_reduce is False and args.max_train_steps == 2
    assert args.validation_prompts == ["a cat", "a dog"] and args.cache_dir is None  # null: the default


def test_value_tokens_per_kind_of_flag():
    from colossal_sd.config_file import value_tokens
    from parse_arguments import build_parser
    actions = {a.dest: a for a in build_parser()._actions}
    assert value_tokens("learning_rate", 1e-3, actions["learning_rate"]) == ["--learning_rate=0.001"]
    assert value_tokens("use_lora", True, actions["use_lora"]) == ["--use_lora"]
    assert value_tokens("use_lora", False, actions["use_lora"]) == []
    assert value_tokens("gemini_async_reduce", False, actions["gemini_async_reduce"]) == ["--no-gemini_async_reduce"]
    assert value_tokens("validation_prompts", ["a", "b"], actions["validation_prompts"]) == \
        ["--validation_prompts", "a", "b"]
    assert value_tokens("seed", None, actions["seed"]) == []
    assert value_tokens("output_dir", "-odd", actions["output_dir"]) == ["--output_dir=-odd"]


def test_command_line_wins_over_the_file(tmp_path):
    config = write(tmp_path / "run.toml", 'learning_rate = 0.5\nvalidation_prompts = ["a", "b"]\nseed = 3\n')
    args = parse("--config", config, "--learning_rate", "0.25", "--validation_prompts", "c")
    assert (args.learning_rate, args.validation_prompts, args.seed) == (0.25, ["c"], 3)


@pytest.mark.parametrize("name,text,expected", [
    ("run.toml", "learning_rat = 1e-4\n", "run.toml: unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    ("run.toml", "seed = 1\nresolution = 32 32\nrank = 2\n", "run.toml: Expected newline or end of document after a "
                                                         "statement (at line 2, column 17)"),
    ("run.yaml", "seed: 1\nvalidation_prompts: [a\nresolution: 32\n", "run.yaml: line 3, column 11: expected ','"),
    ("run.toml", 'max_train_steps = "two"\n', "run.toml: key 'max_train_steps': invalid int value: 'two'"),
    ("run.yaml", "lr_scheduler: linearly\n", "run.yaml: key 'lr_scheduler': invalid choice: 'linearly'"),
    ("run.yaml", "use_lora: sometimes\n", "run.yaml: key 'use_lora' is a switch: set it to true or false"),
    ("run.yaml", "seed: yes\n", "run.yaml: key 'seed' takes a string or a number, not True"),
    ("run.toml", 'config = "other.toml"\n', "run.toml: a config file cannot name another --config"),
    ("run.toml", "resolution = [32, 64]\n", "run.toml: key 'resolution' takes one value, not a list"),
    ("run.toml", "learning_rate = -1\n", "--learning_rate must be a finite number > 0 (got -1.0) (set in"),
    ("run.yaml", "- learning_rate\n", "run.yaml: must map flag names to values"),
    ("run.json", "{}", "use a .toml, .yaml or .yml file"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, text, expected):
    assert expected in refused("--config", write(tmp_path / name, text))


def test_saved_config_rereads_to_the_same_arguments(tmp_path):
    from colossal_sd.config_file import SAVED_CONFIG, save_effective_config
    args = parse("--use_lora", "--validation_prompts", 'a "quoted" \\ prompt', "an émoji ❤\x7f",
                 "--learning_rate", "3e-5", "--no-gemini_async_reduce", "--max_grad_norm", "0",
                 "--output_dir", tmp_path / "out")
    save_effective_config(args, seed=123456789)
    saved = tmp_path / "out" / SAVED_CONFIG
    again = parse("--config", saved)
    assert dict(vars(again), config=None) == dict(vars(args), seed=123456789, config=None)
    assert tomllib.loads(saved.read_text())["seed"] == 123456789


def test_the_scripts_list_what_the_file_sets(tmp_path):
    from colossal_sd.config_file import flags_set
    config = write(tmp_path / "run.yaml", "max_train_steps: 2\ncache_latents: false\nstreaming: true\nseed: null\n")
    assert flags_set(config) == ["--max_train_steps", "--cache_latents=false", "--streaming=true"]


def test_script_defaults_stand_back_for_the_file_and_variables_win_over_it(tmp_path):
    # PYTHON prints the trainer command instead of running it (but lists the config file with the real python)
    fake = write(tmp_path / "python", "#!/usr/bin/env bash\n"
                 f'[ "$2" = colossal_sd.config_file ] && exec {__import__("sys").executable} "$@"\necho "$@"\n')
    fake.chmod(0o755)
    config = write(tmp_path / "run.toml", 'max_train_steps = 2\nplugin = "torch_ddp"\ncache_latents = false\n'
                                          'train_data_dir = "my/images"\nrank = 8\nlearning_rate = 5e-5\n')
    command = run_script("02_run_trainer_with_colossalai.sh", env={"PYTHON": str(fake), "CONFIG": str(config)})
    words = command.stdout.split()
    assert words[words.index("--config") + 1] == str(config)
    for flag in ("--max_train_steps", "--plugin", "--cache_latents", "--validation_prompts", "--learning_rate"):
        assert flag not in words  # the file's instead (its own data: no emoji prompts)
    assert "--cache_text_embeddings" in words  # a default the file leaves alone
    words = run_script("03_run_trainer_with_colossalai_lora.sh", env={"PYTHON": str(fake), "CONFIG": str(config),
                                                                      "MAX_TRAIN_STEPS": "9"}).stdout.split()
    assert "--rank" not in words and words[words.index("--max_train_steps") + 1] == "9"


# --- through the trainer, as users run it

def test_unknown_key_is_refused_in_one_line_before_anything_loads(tmp_path):
    config = write(tmp_path / "run.toml", "max_train_step = 3\n")
    proc = run_trainer("--config", config, "--output_dir", tmp_path / "out", check=False, timeout=120)
    assert_one_line_error(proc, "unknown key 'max_train_step'; did you mean 'max_train_steps'?")
    assert not (tmp_path / "out").exists()


def test_toml_config_trains_with_its_values(tmp_path):
    out = tmp_path / "out"
    config = write(tmp_path / "run.toml", f'output_dir = "{out}"\nresolution = 32\nmax_train_samples = 48\n'
                                          'train_batch_size = 2\nmax_train_steps = 2\nlogging_steps = 1\nseed = 5\n'
                                          'report_to = "none"\n')
    proc = run_trainer("--config", config)
    line = first_log_line(proc)
    assert "images/step=2 " in line and "steps=2 " in line and "seed=5" in line
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_yaml_config_trains_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.yaml", "learning_rate: 1e-3\nmax_train_steps: 5\nreport_to: none\n")
    proc = run_trainer("--config", config, *FAST, "--output_dir", tmp_path / "out")  # FAST: 3 steps
    assert "steps=3 " in first_log_line(proc)
    assert re.search(r"step 1: .*lr=0\.001\b", proc.stdout + proc.stderr)


def test_rerunning_the_saved_config_gives_bit_identical_weights(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    unseeded = FAST[:FAST.index("--seed")]  # a random seed: the saved one must be the seed actually used
    proc = run_trainer(*unseeded, "--report_to", "none", "--output_dir", first)
    seed = int(re.search(r"seed=(\d+)", first_log_line(proc)).group(1))
    saved = first / "training_config.toml"
    assert tomllib.loads(saved.read_text())["seed"] == seed
    run_trainer("--config", saved, "--output_dir", second)
    a, b = unet_weights(first), unet_weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_script_takes_the_config_files_values_over_its_defaults(tmp_path):
    out = tmp_path / "out"
    config = write(tmp_path / "run.yaml", f"output_dir: {out}\nmax_train_steps: 2\ntrain_batch_size: 4\n"
                                          "resolution: 32\nmax_train_samples: 48\nvalidation_split: 0\n"
                                          "validation_prompts: [an emoji of red heart]\nreport_to: none\n")
    proc = run_script("02_run_trainer_with_colossalai.sh", env={"CONFIG": str(config), "CACHE": "0"})
    line = first_log_line(proc)
    assert "steps=2 " in line and "batch/process=4 " in line  # the script's defaults: 300 steps, batch 8
    assert tomllib.loads((out / "training_config.toml").read_text())["max_train_steps"] == 2
