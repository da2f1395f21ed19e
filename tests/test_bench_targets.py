"""bench per target profile: a strix-halo prefix serves its profile's BF16 model, is offered
the unified-memory serving profile and not the FP8-KV one, and sees the RDNA4 figures
labelled as context; an RDNA4 prefix keeps the reference run."""

from __future__ import annotations

import hintcheck
import pytest
from bench_fixtures import install_fake_vllm, read_state, wait_dead
from click.testing import CliRunner
from detect_fixtures import fake_sysfs

from installer import bench, buildenv, profiles, state, targetprofile
from installer.cli import cli
from installer.errors import RecipeError, UsageError

GIB = 1024 ** 3
STRIX = targetprofile.load_all()["strix-halo"]
KV_8B_BF16 = 2 * 32 * 8 * 128 * 2     # 16-bit KV bytes per token of Llama-3.1-8B


def strix_prefix(path, *, recorded_target=True, mode="ok"):
    st = install_fake_vllm(path, mode)
    receipt = state.read_receipt(path)
    receipt["archs"] = ["gfx1151"]
    if recorded_target:
        receipt["target"] = "strix-halo"
    state.write_json_atomic(path / state.RECEIPT, receipt)
    return st


def strix_sysfs(root, *, vram_used=0, gtt_total=64 * GIB, gtt_used=0, with_dgpu=False):
    """A Strix Halo iGPU (1002:1586, 512 MiB carve-out) with amdgpu's GTT files, optionally
    beside an RX 9070 XT with 16 GiB free."""
    pci = [{"address": "0000:c5:00.0", "device": 0x1586, "class": 0x030000, "driver": "amdgpu",
            "vram": 512 * 1024 ** 2}]
    if with_dgpu:
        pci.append({"address": "0000:03:00.0", "device": 0x7550, "class": 0x030000, "driver": "amdgpu",
                    "vram": 16 * GIB})
    fake_sysfs(root, pci=pci)
    dev = root / "sys/bus/pci/devices/0000:c5:00.0"
    for name, value in (("vram_used", vram_used), ("gtt_total", gtt_total), ("gtt_used", gtt_used)):
        (dev / f"mem_info_{name}").write_text(f"{value}\n")
    if with_dgpu:
        dgpu = root / "sys/bus/pci/devices/0000:03:00.0"
        for name in ("vram_used", "gtt_used"):
            (dgpu / f"mem_info_{name}").write_text("0\n")
        (dgpu / "mem_info_gtt_total").write_text(f"{64 * GIB}\n")
    return root


# --- defaults from the profile -------------------------------------------------------------

@pytest.mark.parametrize("recorded_target", [True, False])   # False: a receipt from before targets
def test_a_strix_halo_prefix_defaults_to_its_profiles_bf16_model(tmp_path, recorded_target):
    strix_prefix(tmp_path / "p", recorded_target=recorded_target)
    d = bench.defaults(tmp_path / "p")
    assert (d.model, d.quantization) == (STRIX.serving["bench_model"], "bf16")
    assert d.serve_args == ("--dtype", "bfloat16") and d.target.name == "strix-halo"
    # a model of the user's own is served as given: its quantization is its config's business
    other = bench.defaults(tmp_path / "p", "Qwen/Qwen3-8B-AWQ")
    assert (other.model, other.quantization, other.serve_args) == ("Qwen/Qwen3-8B-AWQ", "", ())


def test_an_rdna4_prefix_keeps_the_reference_model_without_flags(tmp_path):
    install_fake_vllm(tmp_path / "p")
    d = bench.defaults(tmp_path / "p")
    assert (d.model, d.quantization, d.serve_args, d.target.name) == (bench.REFERENCE_MODEL, "fp8", (), "rdna4")


def test_every_profile_quantization_has_serve_flags_and_bad_ones_are_refused(tmp_path):
    assert set(bench.QUANT_SERVE_ARGS) == set(targetprofile.BENCH_QUANTIZATIONS)
    bad = tmp_path / "targets" / "odd.toml"
    bad.parent.mkdir()
    bad.write_text('[target]\nname = "odd"\narchs = ["gfx1100"]\n[serving]\nbench_quantization = "int3"\n')
    with pytest.raises(RecipeError, match="bench_quantization must be one of"):
        targetprofile.load_file(bad)


def test_a_strix_halo_run_serves_bf16_and_labels_the_rdna4_figures_as_context(tmp_path):
    prefix = tmp_path / "p"
    st = strix_prefix(prefix)
    result = bench.run(prefix, ready_timeout=20, num_prompts=10)
    serve = read_state(st, "serve.json")["argv"]
    assert serve[:2] == ["serve", STRIX.serving["bench_model"]] and serve[6:] == ["--dtype", "bfloat16"]
    client = read_state(st, "client.json")["argv"]
    assert client[client.index("--model") + 1] == STRIX.serving["bench_model"]
    assert wait_dead(read_state(st, "pids.json")) == []
    assert (result.target, result.quantization) == ("strix-halo", "bf16")

    lines = bench.format_comparison(result).splitlines()
    assert lines[0].split() == ["metric", "this", "run", "rdna4-seed"]
    row = next(line for line in lines if line.startswith("output throughput"))
    assert row.split()[-3:] == ["251.37", "248.12", "tok/s"]
    note = next(line for line in lines if line.startswith("rdna4-seed:"))
    assert f"RX 9070 XT (gfx1201), {bench.REFERENCE_MODEL}, request rate 10 in fp8" in note
    assert "shown for context only: a different GPU, model and quantization than this run" in note
    assert f"(strix-halo: {STRIX.serving['bench_model']} in bf16)" in note
    assert not any(line.startswith("reference:") for line in lines)


# --- serving profiles per target ----------------------------------------------------------

def test_which_serving_profiles_fit_which_target():
    targets = targetprofile.load_all()
    assert profiles.offered(targets["rdna4"]) == ("seed", "rdna4-16g")
    assert profiles.offered(None) == ("seed", "rdna4-16g")          # a prefix from before targets
    assert profiles.offered(targets["strix-halo"]) == ("seed", "strix-halo")
    with pytest.raises(UsageError, match="does not fit target strix-halo: an FP8 KV cache needs native FP8"):
        profiles.resolve("rdna4-16g", bench.REFERENCE_MODEL, target=targets["strix-halo"], vram_bytes=16 * GIB)
    with pytest.raises(UsageError, match="does not fit target rdna4: it sizes a KV cache in unified memory"):
        profiles.resolve("strix-halo", bench.REFERENCE_MODEL, target=targets["rdna4"], vram_bytes=16 * GIB)


def test_strix_halo_profile_sizes_a_16bit_kv_cache_in_bytes_without_fp8_or_offloading():
    p = profiles.strix_halo(gpu_mappable=64 * GIB, weights=profiles.BF16_8B_WEIGHTS, kv_per_token=KV_8B_BF16)
    args = dict(zip(p.serve_args[::2], p.serve_args[1::2]))
    # 64 * 0.9 - 15 - 1.5 = 41.1 GiB of KV at 128 KiB a token: 336,691 tokens, 292 requests -> 256
    assert args == {"--kv-cache-memory-bytes": str(int(41.1 * GIB)), "--max-num-seqs": "256",
                    "--max-num-batched-tokens": "8192"}
    assert p.sizing["kv_tokens"] == int(41.1 * GIB) // KV_8B_BF16
    assert "--kv-cache-dtype" not in p.serve_args and "--kv-offloading-size" not in p.serve_args
    big = profiles.strix_halo(gpu_mappable=120 * GIB, weights=profiles.BF16_8B_WEIGHTS, kv_per_token=KV_8B_BF16)
    assert dict(zip(big.serve_args[::2], big.serve_args[1::2]))["--kv-cache-memory-bytes"] == str(48 * GIB)
    with pytest.raises(UsageError, match="leaves no room for a KV cache"):
        profiles.strix_halo(gpu_mappable=16 * GIB, weights=profiles.BF16_8B_WEIGHTS, kv_per_token=KV_8B_BF16)


def test_what_the_igpu_can_map_is_carve_out_plus_gtt_bounded_by_ram(tmp_path):
    root = strix_sysfs(tmp_path / "sys", vram_used=256 * 1024 ** 2, gtt_total=64 * GIB, gtt_used=4 * GIB,
                       with_dgpu=True)
    # the dGPU (not a strix-halo arch) is not counted; 256 MiB carve-out + 60 GiB GTT free
    assert profiles.gpu_mappable(STRIX.archs, 100 * GIB, root) == 256 * 1024 ** 2 + 60 * GIB
    # GTT pages come from RAM: with 20 GiB available that is the bound
    assert profiles.gpu_mappable(STRIX.archs, 20 * GIB, root) == 256 * 1024 ** 2 + 20 * GIB
    (root / "sys/bus/pci/devices/0000:c5:00.0/mem_info_gtt_total").unlink()
    assert profiles.gpu_mappable(STRIX.archs, 20 * GIB, root) is None
    with pytest.raises(UsageError, match="cannot read what the GPU can map"):
        profiles.resolve("strix-halo", "m", target=STRIX, sysfs_root=root, ram_bytes=20 * GIB)


def test_the_fp8_kv_profile_is_refused_on_strix_halo_and_the_hint_runs(tmp_path, monkeypatch):
    prefix = tmp_path / "p"
    st = strix_prefix(prefix)
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(strix_sysfs(tmp_path / "sys")))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(buildenv, "available_memory", lambda *a: 100 * GIB)
    refused = CliRunner().invoke(cli, ["bench", "--prefix", str(prefix), "--profile", "rdna4-16g"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "does not fit target strix-halo: an FP8 KV cache needs native FP8" in refused.output
    command = hintcheck.hint_argv(refused.output)
    assert command[0] == "bench" and command[-2:] == ["--profile", "strix-halo"]
    assert not (prefix / "bench").exists() or not list((prefix / "bench").glob("*.json"))

    ran = CliRunner().invoke(cli, command + ["--ready-timeout", "20", "--num-prompts", "10"])
    assert ran.exit_code == 0, ran.output
    model = STRIX.serving["bench_model"]
    want = profiles.strix_halo(512 * 1024 ** 2 + 64 * GIB, profiles.BF16_8B_WEIGHTS, KV_8B_BF16).serve_args
    vllm = prefix / "venv" / "bin" / "vllm"
    assert f"strix-halo: {vllm} serve {model} {' '.join(want)} --dtype bfloat16" in ran.output
    assert "no FP8 KV cache" in ran.output and "assumed: an 8B model, 15 GiB of weights" in ran.output
    serve = read_state(st, "serve.json")["argv"]
    assert tuple(serve[6:]) == (*want, "--dtype", "bfloat16")
    assert wait_dead(read_state(st, "pids.json")) == []
    assert next(line for line in ran.output.splitlines() if line.startswith("metric")).split() == \
        ["metric", "strix-halo", "rdna4-seed"]
    assert any(line.startswith("rdna4-seed:") and "context only" in line for line in ran.output.splitlines())


def test_the_report_benches_the_serving_profiles_that_fit_the_target(tmp_path):
    from installer import report

    strix_prefix(tmp_path / "strix")
    install_fake_vllm(tmp_path / "rdna4")
    assert dict(report.steps(tmp_path / "strix", model=None, tune_model=None, bench=True))["bench"][-4:] == \
        ["--profile", "seed", "--profile", "strix-halo"]
    assert dict(report.steps(tmp_path / "rdna4", model=None, tune_model=None, bench=True))["bench"][-4:] == \
        ["--profile", "seed", "--profile", "rdna4-16g"]
