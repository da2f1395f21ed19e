"""verify --deep: each probe's judge on recorded measurements, the real script on a GPU-less
host (every probe skips with its reason), and model choice without downloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from bench_fixtures import cache_model
from click.testing import CliRunner
from codeobject_fixtures import bundle, ids_for, make_so, needs_elf

from installer import hfcache, state, verify
from installer import verify_deep as deep
from installer.cli import cli

# --- judges on recorded measurements -------------------------------------------------------


@pytest.mark.parametrize("measured, ok", [
    ({"K": 4096, "rel_err": 4.1e-4}, True),
    ({"K": 6144, "rel_err": 5.3e-4}, True),     # the patched dispatcher sends K > 4096 to torch
    ({"K": 6144, "rel_err": 0.71}, False),      # LLMM1's 16-warp reduction on wave32: wrong sums
])
def test_llmm1_judge(measured, ok):
    passed, detail = deep.judge_llmm1(measured)
    assert passed is ok and f"K={measured['K']}" in detail and f"{measured['rel_err']:.2e}" in detail
    assert ("wrong" in detail) is not ok


@pytest.mark.parametrize("layer, kernel, ok", [
    ("per-tensor", "PerTensorTorchFP8ScaledMMLinearKernel", True),
    ("per-tensor", "ROCmFP8ScaledMMLinearKernel", True),
    ("per-channel", "ChannelWiseTorchFP8ScaledMMLinearKernel", True),
    ("per-channel", "RowWiseTorchFP8ScaledMMLinearKernel", False),   # patch 0001 not in effect
    ("per-channel", "MarlinFP8ScaledMMLinearKernel", False),          # dequantizing fallback
])
def test_fp8_kernel_judge(layer, kernel, ok):
    passed, detail = deep.judge_fp8_kernel(layer, kernel)
    assert passed is ok and kernel in detail and layer in detail


def test_fp8_gemm_judge():
    assert deep.judge_fp8_gemm({"per-tensor": 0.031, "per-channel": 0.027})[0]
    bad, detail = deep.judge_fp8_gemm({"per-tensor": 0.031, "per-channel": 0.42})
    assert not bad and "per-channel relative error 0.4200" in detail


@pytest.mark.parametrize("want, triton, module, ok", [
    ("ck", False, "flash_attn_2_cuda", True),
    ("ck", True, "flash_attn.flash_attn_triton_amd.interface_v2", False),   # Triton chosen at import
    ("triton", True, "flash_attn.flash_attn_triton_amd.interface_v2", True),
])
def test_flash_attn_backend_judge(want, triton, module, ok):
    passed, detail = deep.judge_fa_backend(want, triton, module)
    assert passed is ok and module in detail
    if not ok:
        assert "expected ck" in detail and "did not load" in detail


CASE = {"shape": "q113/k203 d64", "fwd_err": {"out": 9.8e-4}, "fwd_pt_err": {"out": 4.9e-4},
        "bwd_err": {"dq": 3.9e-3, "dk": 2.0e-3, "dv": 1.9e-3},
        "bwd_pt_err": {"dq": 1.0e-3, "dk": 9.8e-4, "dv": 9.7e-4}}


def test_flash_attn_varlen_judge_uses_upstream_factors():
    assert deep.judge_fa_varlen([CASE], "fwd")[0] and deep.judge_fa_varlen([CASE], "bwd")[0]
    wrong_fwd = {**CASE, "fwd_err": {"out": 0.25}}                    # > 4x PyTorch fp16's error
    ok, detail = deep.judge_fa_varlen([CASE, wrong_fwd], "fwd")
    assert not ok and "q113/k203 d64 out 2.50e-01" in detail
    wrong_dk = {**CASE, "bwd_err": {**CASE["bwd_err"], "dk": 0.02}}    # > 10x
    ok, detail = deep.judge_fa_varlen([wrong_dk], "bwd")
    assert not ok and "dk" in detail and "dq" not in detail


def test_generate_judge():
    assert deep.judge_generate(" Paris.", ["TRITON_ATTN", "TRITON_ATTN"], "m")[0]
    assert not deep.judge_generate("  ", ["TRITON_ATTN"], "m")[0]
    assert not deep.judge_generate("Paris", [], "m")[0]
    ok, detail = deep.judge_generate("Paris", ["TORCH_SDPA"], "m")
    assert not ok and "fallback backend TORCH_SDPA" in detail


# --- the real script on this GPU-less host ---------------------------------------------------

def test_every_deep_probe_skips_with_its_reason_without_torch():
    expect = {"archs": ["gfx1201"], "flash_attn": "ck", "model": "", "model_reason": "none cached"}
    probes = verify.run_script_probes(Path(sys.executable), expect, {"PATH": "/usr/bin:/bin"},
                                      script=verify.DEEP_SCRIPT, names=verify.DEEP_PROBES)
    assert [p.name for p in probes] == list(verify.DEEP_PROBES)
    assert all(p.status == "skip" and "needs torch" in p.detail for p in probes), probes


# stand-ins for an installed stack on a host without a GPU
STANDINS = {
    "torch/__init__.py": "__version__ = '2.13.0+rocm10.0.0'\nclass version:\n    hip = '7.15.0'\n"
                         "class cuda:\n    @staticmethod\n    def is_available(): return False\n"
                         "    @staticmethod\n    def device_count(): return 0\n",
    "vllm/__init__.py": "__version__ = '0.33.0'\n",
    "flash_attn/__init__.py": "__version__ = '2.8.4'\n",
    "flash_attn/flash_attn_interface.py": "import types\nUSE_TRITON_ROCM = False\n"
                                          "flash_attn_gpu = types.ModuleType('flash_attn_2_cuda')\n",
}


def gpu_less_prefix(root: Path) -> Path:
    for rel, text in STANDINS.items():
        (root / "standins" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "standins" / rel).write_text(text)
    bindir = root / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").write_text(f'#!/bin/sh\nPYTHONPATH="{root / "standins"}" exec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    sp = root / "venv" / "lib" / "python3.12" / "site-packages"
    make_so(sp / "vllm" / "_rocm_C.abi3.so", bundle(ids_for("gfx1201")), root)
    make_so(sp / "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so", bundle(ids_for("gfx1201")), root)
    state.write_json_atomic(root / state.RECEIPT, {
        "archs": ["gfx1201"], "components": {"flash-attention": {"status": "done"}},
        "pins": {"torch": {"torch": "2.13.0+rocm10.0.0", "rocm": "10.0.0"}, "flash-attention": {"backend": "ck"}}})
    return root


@needs_elf
def test_verify_deep_on_a_gpu_less_host_skips_every_deep_probe_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    prefix = gpu_less_prefix(tmp_path / "p")
    result = CliRunner().invoke(cli, ["verify", "--prefix", str(prefix), "--deep", "--json"])
    assert result.exit_code == 0, result.output
    probes = {p["name"]: p for p in json.loads(result.output)["probes"]}
    for name in verify.DEEP_PROBES:
        assert probes[name]["status"] == "skip", probes[name]
        assert "no GPU visible to torch on this host" in probes[name]["detail"]
    # the ordinary probes still ran first, the idle-CPU and HIP runtime ones among them
    assert probes["torch.version"]["status"] == "pass" and probes["flash_attn.backend"]["status"] == "pass"
    assert probes["torch.idle-cpu"]["status"] == "skip"
    assert list(probes).index("deep.llmm1-k4096") > list(probes).index("flash_attn.code-objects")


def test_deep_probes_run_only_with_deep_and_get_the_model_choice(tmp_path, monkeypatch):
    from test_verify import fake_prefix

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = cache_model(tmp_path / "hub", "Qwen/Qwen3-0.6B", {})
    prefix = fake_prefix(tmp_path / "p", [])
    assert not any(p.name.startswith("deep.") for p in verify.run(prefix))
    probes = verify.run(prefix, deep=True)
    assert [p.name for p in probes if p.name.startswith("deep.")] == list(verify.DEEP_PROBES)
    argv = (prefix / "argv").read_text().splitlines()     # the last script run: the deep one
    assert argv[0] == str(verify.DEEP_SCRIPT)
    sent = json.loads(argv[1])
    assert sent["model"] == "Qwen/Qwen3-0.6B" and sent["offline"] is True and snap.is_dir()
    verify.run(prefix, deep=True, model="org/other", allow_download=True)
    sent = json.loads((prefix / "argv").read_text().splitlines()[1])
    assert sent["model"] == "org/other" and sent["offline"] is False


# --- which model the generation loads --------------------------------------------------------

def test_model_choice_never_downloads_without_consent(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    model, why = hfcache.pick_for_verify(None, allow_download=False, env=env)
    assert model == "" and "pass --model NAME" in why
    assert hfcache.pick_for_verify("org/big", allow_download=False, env=env)[1].endswith("--allow-download to fetch it")
    assert hfcache.pick_for_verify("org/big", allow_download=True, env=env) == ("org/big", "")
    snap = cache_model(tmp_path / "hub", "facebook/opt-125m", {})
    assert hfcache.pick_for_verify(None, allow_download=False, env=env) == ("facebook/opt-125m", "")
    assert hfcache.locate("facebook/opt-125m", env) == snap
    assert hfcache.locate(str(snap), env) == snap          # a local folder works as well
    assert hfcache.hub_dir({"HF_HOME": "/h"}) == Path("/h/hub")
