"""bench --profile: the seed and rdna4-16g server settings, sized from free VRAM, against the fake vllm."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import RESULT, install_fake_vllm, read_state, wait_dead
from click.testing import CliRunner
from detect_fixtures import fake_sysfs

from installer import bench, buildenv, profiles
from installer.cli import cli
from installer.errors import UsageError

GIB = 1024 ** 3
KV_8B = 2 * 32 * 8 * 128     # FP8 KV bytes per token of Llama-3.1-8B


def test_rdna4_16g_sizes_the_batch_from_free_vram_and_offloads_into_ram():
    p = profiles.rdna4_16g(free_vram=16 * GIB, ram_available=32 * GIB, weights=int(8.5 * GIB), kv_per_token=KV_8B)
    args = dict(zip(p.serve_args[::2], p.serve_args[1::2]))
    # (16 * 0.9 - 8.5 - 1.5) GiB / 64 KiB = 72,089 tokens = 62 requests of 1152 -> 60 (multiple of 4)
    assert args == {"--kv-cache-dtype": "fp8", "--gpu-memory-utilization": "0.90", "--max-num-seqs": "60",
                    "--max-num-batched-tokens": "2048", "--kv-offloading-size": "16",
                    "--kv-offloading-backend": "native"}
    assert p.sizing["kv_tokens"] == 72089
    big = profiles.rdna4_16g(free_vram=32 * GIB, ram_available=256 * GIB, weights=int(8.5 * GIB), kv_per_token=KV_8B)
    big_args = dict(zip(big.serve_args[::2], big.serve_args[1::2]))
    assert big_args["--max-num-batched-tokens"] == "8192" and big_args["--kv-offloading-size"] == "64"
    assert int(big_args["--max-num-seqs"]) > 60


def test_little_ram_means_no_offloading_and_no_vram_room_is_an_error():
    p = profiles.rdna4_16g(free_vram=16 * GIB, ram_available=6 * GIB, weights=int(8.5 * GIB), kv_per_token=KV_8B)
    assert "--kv-offloading-size" not in p.serve_args and "no KV offloading" in p.notes[-1]
    with pytest.raises(UsageError, match="leaves no room for a KV cache"):
        profiles.rdna4_16g(free_vram=8 * GIB, ram_available=32 * GIB, weights=int(8.5 * GIB), kv_per_token=KV_8B)


def test_free_vram_is_read_from_amdgpu_sysfs(tmp_path):
    root = fake_sysfs(tmp_path / "sys", pci=[
        {"address": "0000:03:00.0", "device": 0x7590, "class": 0x030000, "driver": "amdgpu", "vram": 16 * GIB}])
    assert profiles.free_vram(root) is None          # no mem_info_vram_used: unknown, not "all free"
    (root / "sys/bus/pci/devices/0000:03:00.0/mem_info_vram_used").write_text(f"{GIB}\n")
    assert profiles.free_vram(root) == 15 * GIB
    with pytest.raises(UsageError, match="free VRAM"):
        profiles.resolve("rdna4-16g", bench.REFERENCE_MODEL, sysfs_root=tmp_path / "nothing")


def test_profiles_run_side_by_side_with_the_same_flags_printed_for_vllm_serve(tmp_path, monkeypatch):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix)
    root = fake_sysfs(tmp_path / "sys", pci=[
        {"address": "0000:03:00.0", "device": 0x7590, "class": 0x030000, "driver": "amdgpu", "vram": 16 * GIB}])
    (root / "sys/bus/pci/devices/0000:03:00.0/mem_info_vram_used").write_text("0\n")
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(buildenv, "available_memory", lambda *a: 32 * GIB)
    result = CliRunner().invoke(cli, ["bench", "--prefix", str(prefix), "--profile", "seed", "--profile",
                                      "rdna4-16g", "--ready-timeout", "20", "--num-prompts", "10"])
    assert result.exit_code == 0, result.output
    want = profiles.rdna4_16g(16 * GIB, 32 * GIB, profiles.REFERENCE_WEIGHTS, KV_8B).serve_args
    vllm = prefix / "venv" / "bin" / "vllm"
    assert f"rdna4-16g: {vllm} serve {bench.REFERENCE_MODEL} {' '.join(want)}" in result.output
    assert f"seed: {vllm} serve {bench.REFERENCE_MODEL}\n" in result.output
    # the last server started was rdna4-16g's, with exactly the printed flags, and it is stopped
    serve = read_state(st, "serve.json")["argv"]
    assert tuple(serve[6:]) == want and "--kv-offloading-size" in serve
    assert wait_dead(read_state(st, "pids.json")) == []
    saved = sorted(p.name for p in (prefix / "bench").glob("*.json"))
    assert len(saved) == 2 and sum(n.endswith("-seed.json") for n in saved) == 1 \
        and sum(n.endswith("-rdna4-16g.json") for n in saved) == 1
    header = next(line for line in result.output.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "seed", "rdna4-16g", "reference"]
    row = next(line for line in result.output.splitlines() if line.startswith("output throughput"))
    assert row.split()[-4:] == ["251.37", "251.37", "248.12", "tok/s"]


def test_a_crashing_profile_server_is_stopped_and_reported(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix, "crash")
    with pytest.raises(Exception, match="exited with code 3"):
        bench.run_profiles(prefix, ["seed"], ready_timeout=20, echo=lambda *_: None)
    assert wait_dead(read_state(st, "pids.json")) == []


def test_a_baseline_sits_beside_the_new_run(tmp_path):
    before = tmp_path / "before.json"
    before.write_text(json.dumps({**RESULT, "output_throughput": 180.5}))
    prefix = tmp_path / "p"
    install_fake_vllm(prefix)
    out = CliRunner().invoke(cli, ["bench", "--prefix", str(prefix), "--baseline", str(before),
                                   "--ready-timeout", "20", "--num-prompts", "10"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("output throughput"))
    assert row.split()[-4:] == ["180.50", "251.37", "248.12", "tok/s"]
    assert next(line for line in out.output.splitlines() if line.startswith("metric")).split() == \
        ["metric", "baseline", "this", "run", "reference"]
