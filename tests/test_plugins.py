"""Every plugin, placement and precision either maps onto Colossal-AI 0.5.0 correctly or refuses in one line;
accumulation, clipping and global-rank-0 writing hold across processes and nodes."""

import inspect
import json
import socket
import subprocess
import sys

import pytest
import torch

import parse_arguments
from colossal_sd import plugins
from colossal_sd.errors import UserError
from conftest import FAST, ROOT, _env, load_pipeline, run_script, run_trainer

PROBE = ROOT / "tests" / "probes" / "engine_update.py"
NO_CLIP = ["--max_grad_norm", "0"]


def args_for(*flags):
    return parse_arguments.parse_args(list(flags))


# -- the factory, per plugin, placement and precision --------------------------------------------------------------

@pytest.mark.parametrize("placement,offload,expected", [
    ("cuda", [], {"placement_policy": "static", "offload_optim_frac": 0.0, "offload_param_frac": 0.0}),
    ("cpu", [], {"placement_policy": "static", "offload_optim_frac": 1.0, "offload_param_frac": 0.0,
                 "pin_memory": True}),
    ("cpu", ["--offload_optim_frac", "1", "--offload_param_frac", "0.5"],
     {"placement_policy": "static", "offload_optim_frac": 1.0, "offload_param_frac": 0.5, "pin_memory": True}),
    ("cpu", ["--offload_optim_frac", "0.25"],
     {"placement_policy": "static", "offload_optim_frac": 0.25, "offload_param_frac": 0.0, "pin_memory": True}),
    ("auto", [], {"placement_policy": "auto"})])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gemini_spec_follows_placement_precision_and_flags(placement, offload, expected, precision):
    from colossalai.booster.plugin import GeminiPlugin
    args = args_for("--plugin", "gemini", "--placement", placement, "--mixed_precision", precision,
                    "--max_grad_norm", "0.5", "--gradient_accumulation_steps", "2", "--gemini_max_prefetch", "2",
                    "--no-gemini_async_reduce", *offload)
    name, kwargs = plugins.booster_plugin_spec("gemini", precision, args)
    assert name == "GeminiPlugin"
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["precision"] == precision and kwargs["max_norm"] == 0.5
    assert kwargs["enable_gradient_accumulation"] and kwargs["max_prefetch"] == 2
    assert kwargs["enable_async_reduce"] is False
    assert set(kwargs) <= set(inspect.signature(GeminiPlugin.__init__).parameters)


@pytest.mark.parametrize("precision,expected", [("no", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")])
@pytest.mark.parametrize("stage_flags,stage", [([], 2), (["--zero_stage", "1"], 1)])
def test_low_level_zero_spec(precision, expected, stage_flags, stage):
    from colossalai.booster.plugin import LowLevelZeroPlugin
    args = args_for("--plugin", "low_level_zero", "--cpu_offload", "--max_grad_norm", "2", *stage_flags)
    name, kwargs = plugins.booster_plugin_spec("low_level_zero", precision, args)
    assert (name, kwargs) == ("LowLevelZeroPlugin", {"stage": stage, "precision": expected, "max_norm": 2.0,
                                                     "cpu_offload": True})
    assert set(kwargs) <= set(inspect.signature(LowLevelZeroPlugin.__init__).parameters)


@pytest.mark.parametrize("plugin", ["torch_ddp", "torch_ddp_fp16"])
def test_torch_ddp_spec(plugin):
    from colossalai.booster.plugin import TorchDDPPlugin
    name, kwargs = plugins.booster_plugin_spec(plugin, "fp16", args_for())
    assert (name, kwargs) == ("TorchDDPPlugin", {"gradient_as_bucket_view": True})
    assert set(kwargs) <= set(inspect.signature(TorchDDPPlugin.__init__).parameters)


@pytest.mark.parametrize("plugin,cuda,expected", [("auto", True, "gemini"), ("auto", False, "torch_ddp"),
                                                  ("low_level_zero", True, "low_level_zero")])
def test_auto_plugin(plugin, cuda, expected):
    assert plugins.resolve_plugin(plugin, cuda) == expected


@pytest.mark.parametrize("plugin,flag,expected", [
    ("gemini", None, "fp16"), ("gemini", "bf16", "bf16"), ("torch_ddp_fp16", None, "fp16"),
    ("torch_ddp", None, "no"), ("torch_ddp", "bf16", "bf16"), ("none", "fp16", "fp16"),
    ("low_level_zero", None, "no"), ("low_level_zero", "bf16", "bf16")])
def test_precision_defaults(plugin, flag, expected):
    assert plugins.resolve_precision(plugin, flag) == expected


@pytest.mark.parametrize("plugin,cuda,flags,expected", [
    ("gemini", True, [], "hybrid_adam"), ("low_level_zero", True, ["--cpu_offload"], "hybrid_adam"),
    ("low_level_zero", True, [], "adamw"), ("torch_ddp", False, [], "adamw"),
    ("torch_ddp", True, ["--use_8bit_adam"], "adamw_8bit"), ("none", True, ["--use_8bit_adam"], "adamw_8bit")])
def test_optimizer_choice(plugin, cuda, flags, expected):
    args = args_for(*flags)
    assert plugins.choose_optimizer(plugin, cuda, args.use_8bit_adam, args.cpu_offload) == expected


@pytest.mark.parametrize("check,message", [
    (lambda: plugins.resolve_precision("gemini", "no"), "fp16 or bf16"),
    (lambda: plugins.choose_optimizer("gemini", True, True, False), "torch_ddp, torch_ddp_fp16 or none"),
    (lambda: plugins.choose_optimizer("torch_ddp", False, True, False), "needs a CUDA GPU"),
    (lambda: plugins.gemini_placement("cuda", 0.5, None), "refine --placement cpu"),
    (lambda: plugins.gemini_placement("cpu", 0.5, 0.5), "--offload_optim_frac 1.0"),
    (lambda: plugins.check_plugin_flags("gemini", args_for("--zero_stage", "1")), "low_level_zero only"),
    (lambda: plugins.check_plugin_flags("torch_ddp", args_for("--offload_param_frac", "1")), "gemini only"),
    (lambda: args_for("--offload_optim_frac", "1.5"), r"must be in \[0, 1\]")])
def test_impossible_combinations_refuse_in_one_line(check, message):
    with pytest.raises(UserError, match=message):
        check()


# -- accumulation and clipping, measured on the update itself ------------------------------------------------------

def _probe(tmp_path, nproc, cases):
    for case in cases:
        case["out"] = str(tmp_path / f"{case['name']}.pt")
    spec = tmp_path / f"cases-{nproc}.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(PROBE), str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {case["name"]: torch.load(case["out"]) for case in cases}


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("updates")
    one = [{"name": "batch4", "flags": ["--plugin", "torch_ddp", *NO_CLIP], "batch": 4, "accumulation": 1},
           {"name": "batch4_loose_clip", "flags": ["--plugin", "torch_ddp", "--max_grad_norm", "1e6"],
            "batch": 4, "accumulation": 1}]
    two = [{"name": f"{plugin}_accumulated", "flags": ["--plugin", plugin, *NO_CLIP], "batch": 1, "accumulation": 2}
           for plugin in ("torch_ddp", "none")]
    two += [{"name": "fp16_accumulated", "flags": ["--plugin", "torch_ddp", "--mixed_precision", "fp16", *NO_CLIP],
             "batch": 1, "accumulation": 2},
            {"name": "clipped", "flags": ["--plugin", "torch_ddp", "--max_grad_norm", "1e-3"], "batch": 1,
             "accumulation": 2}]
    return {**_probe(tmp, 1, one), **_probe(tmp, 2, two)}


def _norm(update):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())).item()


@pytest.mark.parametrize("plugin", ["torch_ddp", "none"])
def test_two_ranks_batch1_accumulation2_equals_one_rank_batch4(updates, plugin):
    reference, accumulated = updates["batch4"], updates[f"{plugin}_accumulated"]
    assert _norm(reference) > 1e-3
    for key in reference:
        torch.testing.assert_close(accumulated[key], reference[key], rtol=1e-4, atol=1e-6)


def test_fp16_loss_scaling_is_undone_before_the_step(updates):
    reference, scaled = updates["batch4"], updates["fp16_accumulated"]
    difference = {k: scaled[k].float() - reference[k] for k in reference}
    assert _norm(difference) < 0.05 * _norm(reference)


def test_clipping_changes_the_update_only_when_the_norm_exceeds_it(updates):
    reference = updates["batch4"]
    assert _norm(reference) > 1e-2
    for key in reference:  # a limit far above the norm leaves the update alone
        torch.testing.assert_close(updates["batch4_loose_clip"][key], reference[key], rtol=0, atol=0)
    clipped = updates["clipped"]
    assert _norm(clipped) == pytest.approx(1e-3, rel=1e-3)
    scale = 1e-3 / _norm(reference)
    # same direction, shorter (weights are fp32, so an update this small is resolved only to ~1e-8 per element)
    assert _norm({k: clipped[k] - reference[k] * scale for k in reference}) < 1e-2 * _norm(clipped)


# -- the trainer across processes and nodes ------------------------------------------------------------------------

def test_two_processes_accumulate_and_count_optimizer_steps(tmp_path):
    out = tmp_path / "out"
    proc = run_trainer(*FAST, "--gradient_accumulation_steps", "2", "--output_dir", out, nproc=2)
    log = proc.stdout + proc.stderr
    assert "processes=2" in log and "accumulation=2" in log and "images/step=16" in log and "steps=3" in log
    assert [line.split(":")[0] for line in log.splitlines() if line.startswith("step ")] == \
        ["step 1", "step 2", "step 3"]
    assert log.count("saved the pipeline") == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_together_and_write_once(tmp_path):
    out = tmp_path / "out"
    env = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RDZV_ID": f"test-{tmp_path.name}", "OUTPUT_DIR": str(out)}
    nodes = [subprocess.Popen(["bash", "02_run_trainer_with_colossalai.sh", *FAST], cwd=ROOT, env=_env(env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    combined = "".join(logs)
    assert combined.count("saved the pipeline") == 1 and combined.count("processes=2") == 1
    assert load_pipeline(out) is not None


def test_cpu_adamw_is_fused_and_its_state_is_freed_before_saving():
    from colossal_sd.distributed import DistInfo
    engine = plugins.Engine("none", "no", DistInfo(0, 0, 1, torch.device("cpu")), 1.0)
    layer = torch.nn.Linear(4, 4)
    optimizer = engine.make_optimizer(layer.parameters(), 1e-3, (0.9, 0.999), 0.0, 1e-8)
    assert optimizer.defaults["fused"]  # one kernel per step on CPU too, not a loop over tensors
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert optimizer.state  # Adam moments exist while training
    engine.release_optimizer_state(optimizer)
    assert not optimizer.state  # and are gone before saving reloads the encoders
