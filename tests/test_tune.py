"""tune: vLLM's own block-FP8 tuner (a stand-in) run for a model's shapes, configs into the prefix."""

from __future__ import annotations

import json

import hintcheck
import pytest
from bench_fixtures import BLOCK_FP8_CONFIG, cache_model, install_fake_tuner, read_state
from click.testing import CliRunner

from installer import state, tune
from installer.cli import cli
from installer.errors import UsageError

CONFIGS = "venv/lib/python3.12/site-packages/vllm/model_executor/layers/quantization/utils/configs"
# qkv (16 + 2*8) * 128 x 1024, o 1024 x 2048, gate_up 6144 x 1024, down 1024 x 3072
SHAPES = [[4096, 1024], [1024, 2048], [6144, 1024], [1024, 3072]]


@pytest.fixture
def world(tmp_path, monkeypatch):
    prefix = tmp_path / "prefix"
    st, archive = install_fake_tuner(prefix, tmp_path / "up")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_model(tmp_path / "hub", "Qwen/Qwen3-0.6B-FP8", BLOCK_FP8_CONFIG)
    return prefix, st, tmp_path / "cache"


def test_tune_runs_vllms_tuner_for_the_models_shapes_and_installs_into_the_prefix(world):
    prefix, st, cache = world
    shipped = prefix / CONFIGS / "N=1024,K=2048,device_name=AMD_Radeon_R9700,dtype=fp8_w8a8,block_shape=[128,128].json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text('{"shipped": true}')
    result = CliRunner().invoke(cli, ["tune", "--prefix", str(prefix), "--cache-dir", str(cache),
                                      "--model", "Qwen/Qwen3-0.6B-FP8"])
    assert result.exit_code == 0, result.output

    # the tuner got this model's shapes and the arguments its own parser defines
    ran = read_state(st, "main.json")
    assert ran["shapes"] == SHAPES
    assert ran["args"] == {"tp_size": 1, "input_type": "fp8", "out_dtype": "bfloat16", "block_n": 128,
                           "block_k": 128, "batch_size": None, "save_path": ran["args"]["save_path"]}
    imported = read_state(st, "import.json")
    kernels = prefix / ".rdna4/work/tune/vllm-0.33.0/benchmarks/kernels"
    assert imported["env"]["PYTHONPATH"] == str(kernels) and imported["cwd"] == str(kernels)
    assert imported["argv"] == [str(kernels / "benchmark_w8a8_block_fp8.py")]
    assert imported["env"]["VIRTUAL_ENV"] == str(prefix / "venv")
    assert imported["env"]["ROCM_PATH"] == str(prefix / "rocm")

    # kept under PREFIX/tuned, installed where vLLM reads them, never into the source tree
    names = sorted(f"N={n},K={k},device_name=AMD_Radeon_R9700,dtype=fp8_w8a8,block_shape=[128,128].json"
                   for n, k in SHAPES)
    assert sorted(p.name for p in (prefix / CONFIGS).glob("*.json")) == names
    assert json.loads(shipped.read_text()) != {"shipped": True}
    kept = sorted((prefix / "tuned" / "w8a8_block_fp8").glob("*/N=*.json"))
    assert [p.name for p in kept] == names
    assert json.loads(next((prefix / "tuned").rglob("replaced/*.json")).read_text()) == {"shipped": True}
    assert not list(kernels.parent.parent.rglob("N=*.json")), "nothing written into the vLLM source"

    receipt = state.read_receipt(prefix)["tuned"]["w8a8_block_fp8"]
    assert sorted(receipt["files"]) == names
    assert receipt["runs"][-1]["model"] == "Qwen/Qwen3-0.6B-FP8"
    assert receipt["runs"][-1]["device_name"] == "AMD_Radeon_R9700"
    assert receipt["files"][names[0]]["installed"] == str(prefix / CONFIGS / names[0])
    assert "tuned 4 block-FP8 GEMM config(s)" in result.output


def test_tp_splits_the_shapes_and_the_receipt_survives_a_rewrite(world):
    prefix, st, cache = world
    tune.run(prefix, "Qwen/Qwen3-0.6B-FP8", cache_dir=cache, tp=2, batch_size=1)
    ran = read_state(st, "main.json")
    assert ran["shapes"] == [[2048, 1024], [1024, 1024], [3072, 1024], [1024, 1536]]
    assert ran["args"]["tp_size"] == 2 and ran["args"]["batch_size"] == 1
    pins = state.read_receipt(prefix)["pins"]
    state.write_receipt(prefix, archs=("gfx1201",), pins=pins, tools={}, installer_version="t")
    assert state.read_receipt(prefix)["tuned"]["w8a8_block_fp8"]["runs"][0]["tp"] == 2
    # a second tune replaces our own files without taking them for vLLM's shipped ones
    tune.run(prefix, "Qwen/Qwen3-0.6B-FP8", cache_dir=cache, tp=2, batch_size=1)
    assert not list((prefix / "tuned").rglob("replaced"))
    assert len(state.read_receipt(prefix)["tuned"]["w8a8_block_fp8"]["runs"]) == 2


def test_a_model_that_is_not_block_fp8_or_not_cached_is_refused(world, tmp_path):
    prefix, _, cache = world
    cache_model(tmp_path / "hub", "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8",
                {**BLOCK_FP8_CONFIG, "quantization_config": {"quant_method": "compressed-tensors"}})
    with pytest.raises(UsageError, match="not a block-FP8 model"):
        tune.run(prefix, "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", cache_dir=cache)
    result = CliRunner().invoke(cli, ["tune", "--prefix", str(prefix), "--model", "org/absent"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "neither a local folder nor in the Hugging Face cache" in result.output


def test_restore_heals_a_rebuilt_venv_and_needs_a_tune_first(world):
    prefix, _, cache = world
    runner = CliRunner()
    none = runner.invoke(cli, ["tune", "--prefix", str(prefix), "--restore"])
    assert none.exit_code == 2 and "no tuned configs recorded" in none.output
    assert "rdna4-install tune --prefix" in none.output
    # the hint, with a model of the user's: tunes, and records what --restore puts back
    model = {"MODEL": "Qwen/Qwen3-0.6B-FP8"}
    tuned = runner.invoke(cli, [*hintcheck.hint_argv(none.output, fill=model), "--cache-dir", str(cache)])
    assert tuned.exit_code == 0, tuned.output
    configs = prefix / CONFIGS
    gone = sorted(configs.glob("*.json"))
    for path in gone:      # vLLM reinstalled into a fresh venv
        path.unlink()
    healed = runner.invoke(cli, ["tune", "--prefix", str(prefix), "--restore"])
    assert healed.exit_code == 0 and "restored 4 tuned config(s)" in healed.output
    assert sorted(configs.glob("*.json")) == gone
    assert "every tuned config is in place" in runner.invoke(cli, ["tune", "--prefix", str(prefix), "--restore"]).output
    missing = runner.invoke(cli, ["tune", "--prefix", str(prefix)])
    assert missing.exit_code == 2 and "needs --model" in missing.output
    again = runner.invoke(cli, [*hintcheck.hint_argv(missing.output, fill=model), "--cache-dir", str(cache)])
    assert again.exit_code == 0 and "every tuned config is in place" not in again.output, again.output
    assert sorted(configs.glob("*.json")) == gone


def test_a_target_without_native_fp8_is_refused(world):
    prefix, _, cache = world
    receipt = json.loads((prefix / state.RECEIPT).read_text())
    (prefix / state.RECEIPT).write_text(json.dumps({**receipt, "archs": ["gfx1151"], "target": "strix-halo"}))
    result = CliRunner().invoke(cli, ["tune", "--prefix", str(prefix), "--model", "Qwen/Qwen3-0.6B-FP8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "target strix-halo has no native FP8 (fp8 = weight-only in its profile)" in result.output
    assert not (prefix / "tuned").exists()
