"""verify per target profile: a target without native FP8 (strix-halo, gfx1151) gets its FP8
path reported as information, not claimed native and not failed; RDNA4 keeps its checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_verify import ALL_PASS, fake_prefix

from installer import state, targetprofile, verify
from installer import verify_deep as deep
from installer import verify_probes as vp

# vLLM 0.33.0 kernels/linear/__init__.py:740-743, what choose_scaled_mm_linear_kernel raises
# when no FP8 kernel of the platform's list qualifies (gfx1151)
REFUSAL = ("Failed to find a kernel that can implement the ScaledMM linear layer. Reasons: \n"
           "requires setting `VLLM_ROCM_USE_AITER=1` and `VLLM_ROCM_USE_AITER_LINEAR=1`.\n"
           "requires CDNA3+ (gfx942/gfx950) or RDNA4 (gfx12x)\n"
           "requires a platform with torch FP8 scaled-MM support.")


# --- the judges ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, is_rocm, fp8, status, words", [
    ("native", True, True, "pass", "FP8 supported (torch.float8_e4m3fn)"),
    ("native", True, False, "fail", "supports_fp8() is False"),
    ("native", False, False, "fail", "not ROCm"),
    # vLLM 0.33.0 says True on every RDNA: on strix-halo that is no FP8 claim, and no failure
    ("weight-only", True, True, "pass", "vLLM counts every RDNA GPU"),
    ("weight-only", True, False, "pass", "no FP8 matrix instructions (fp8 = weight-only)"),
    ("weight-only", False, False, "fail", "not ROCm"),
])
def test_platform_judge(kind, is_rocm, fp8, status, words):
    got, detail = vp.judge_platform(kind, "RocmPlatform" if is_rocm else "CpuPlatform", is_rocm, fp8,
                                    "torch.float8_e4m3fn" if fp8 else "")
    assert got == status and words in detail


@pytest.mark.parametrize("kind, kernel, status, words", [
    ("native", "PerTensorTorchFP8ScaledMMLinearKernel", "pass", "(native FP8)"),
    ("native", "MarlinFP8ScaledMMLinearKernel", "fail", "not a native FP8 kernel"),
    # gfx1151 on vLLM 0.33.0: no kernel at all, the checkpoint does not load
    ("weight-only", None, "info", "FP8 (per-tensor/per-channel) checkpoints fail to load"),
    ("none", None, "info", "serve BF16 or AWQ/GPTQ int4"),
    # a later vLLM with a ROCm W8A16 kernel: weight-only, said so
    ("weight-only", "MarlinFP8ScaledMMLinearKernel", "info", "weight-only: MarlinFP8ScaledMMLinearKernel dequantizes"),
    # a native FP8 kernel on hardware without FP8 would fail at run time
    ("weight-only", "PerTensorTorchFP8ScaledMMLinearKernel", "fail", "no FP8 matrix instructions"),
])
def test_fp8_kernel_judge_per_target(kind, kernel, status, words):
    got, detail = vp.judge_fp8_kernel(kind, kernel, REFUSAL if kernel is None else "")
    assert got == status and words in detail
    assert "native FP8)" not in detail or kind == "native"
    if kernel is None:
        assert "[vLLM: Failed to find a kernel that can implement the ScaledMM linear layer." in detail


def test_choose_fp8_kernel_turns_vllms_refusal_into_a_reason():
    class Kernel:
        pass

    def picks(config, kernels, quantization):
        assert quantization == "fp8_w8a8"
        return Kernel

    def refuses(config, kernels, quantization):
        raise ValueError(REFUSAL)

    assert vp.choose_fp8_kernel(picks, object(), {}) == ("Kernel", "")
    assert vp.choose_fp8_kernel(refuses, object(), {}) == (None, REFUSAL)


def test_deep_fp8_gemm_skips_without_native_fp8():
    with pytest.raises(vp.Skip, match="no FP8 matrix instructions"):
        deep.fp8_gemm_probe({"archs": ["gfx1151"], "fp8": "weight-only"})


# --- the real probe script against a stand-in torch and vLLM --------------------------------

FAKE_TORCH = '''
import os
__version__ = "2.13.0+rocm10.0.0"
bfloat16 = "bfloat16"
class version:
    hip = "7.15"
class _Props:
    gcnArchName = os.environ["FAKE_ARCH"] + ":sramecc-:xnack-"
class cuda:
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    get_device_properties = staticmethod(lambda i: _Props())
'''
# vLLM 0.33.0's names: vllm/platforms current_platform; kernels/linear
# choose_scaled_mm_linear_kernel and _POSSIBLE_FP8_KERNELS; the layer config and quant keys
FAKE_VLLM = {
    "__init__.py": '__version__ = "0.33.0"\n',
    "platforms/__init__.py": '''
import os
class RocmPlatform:
    def is_rocm(self): return True
    def supports_fp8(self): return True      # 0.33.0: on_cdna() or on_rdna()
    def fp8_dtype(self): return "torch.float8_e4m3fn"
current_platform = RocmPlatform()
''',
    "model_executor/__init__.py": "",
    "model_executor/kernels/__init__.py": "",
    "model_executor/kernels/linear/__init__.py": f'''
import os
_POSSIBLE_FP8_KERNELS = {{}}
class PerTensorTorchFP8ScaledMMLinearKernel:
    pass
def choose_scaled_mm_linear_kernel(config, kernels, quantization):
    if os.environ["FAKE_ARCH"].startswith("gfx12"):
        return PerTensorTorchFP8ScaledMMLinearKernel
    raise ValueError({REFUSAL!r})
''',
    "model_executor/kernels/linear/scaled_mm/__init__.py": "",
    "model_executor/kernels/linear/scaled_mm/ScaledMMLinearKernel.py": '''
class FP8ScaledMMLinearLayerConfig:
    def __init__(self, **kw): self.__dict__.update(kw)
''',
    "model_executor/layers/__init__.py": "",
    "model_executor/layers/quantization/__init__.py": "",
    "model_executor/layers/quantization/utils/__init__.py": "",
    "model_executor/layers/quantization/utils/quant_utils.py": 'kFp8StaticTensorSym = "static-tensor"\n',
}


def _script_probes(tmp_path, arch, expect_fp8=None):
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text(FAKE_TORCH)
    for rel, text in FAKE_VLLM.items():
        path = site / "vllm" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    expect = {"archs": [arch], "torch": "", "rocm": "", "flash_attn": "none"}
    if expect_fp8:
        expect["fp8"] = expect_fp8
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "FAKE_ARCH": arch}
    return {p.name: p for p in verify.run_script_probes(Path(sys.executable), expect, env)}


def test_strix_halo_reports_the_fp8_path_as_information(tmp_path):
    probes = _script_probes(tmp_path, "gfx1151", "weight-only")
    assert probes["vllm.platform"].status == "pass", probes["vllm.platform"].detail
    assert "no FP8 matrix instructions" in probes["vllm.platform"].detail
    kernel = probes["vllm.fp8-kernel"]
    assert kernel.status == "info", kernel.detail
    assert "fail to load" in kernel.detail and "native FP8)" not in kernel.detail
    scaled = probes["torch.fp8-scaled-mm"]
    assert scaled.status == "skip" and "no FP8 matrix instructions (fp8 = weight-only)" in scaled.detail
    assert not verify.failed([probes[n] for n in ("vllm.platform", "vllm.fp8-kernel", "torch.fp8-scaled-mm")])


def test_rdna4_still_requires_native_fp8_from_the_same_stand_ins(tmp_path):
    probes = _script_probes(tmp_path, "gfx1201")
    assert probes["vllm.platform"].status == "pass"
    assert probes["vllm.fp8-kernel"].status == "pass"
    assert probes["vllm.fp8-kernel"].detail == "PerTensorTorchFP8ScaledMMLinearKernel (native FP8)"


def test_without_the_profile_a_gfx1151_refusal_is_a_failure(tmp_path):
    # the data decides: the same GPU judged as a native-FP8 target fails loudly
    probes = _script_probes(tmp_path, "gfx1151")
    assert probes["vllm.fp8-kernel"].status == "fail"
    assert "ValueError: Failed to find a kernel" in probes["vllm.fp8-kernel"].detail


# --- verify.run: the profile comes from the receipt ----------------------------------------

def _strix_lines():
    by = {d["name"]: d for d in ALL_PASS}
    by["vllm.fp8-kernel"] = {"name": "vllm.fp8-kernel", "status": "info", "detail": vp.NO_FP8_KERNEL}
    # an APU target also measures device memory (judged against sysfs: this host has no APU)
    by["torch.device-memory"] = {"name": "torch.device-memory", "status": "pass",
                                 "detail": json.dumps({"total": 64 << 30, "free": 60 << 30})}
    return [json.dumps(by[name]) for name, _ in vp.PROBES if name in by]


@pytest.mark.parametrize("recorded_target", ["strix-halo", None])   # None: a receipt from before targets
def test_a_strix_halo_prefix_passes_the_profiles_fp8_kind_and_shows_info(tmp_path, recorded_target):
    prefix = fake_prefix(tmp_path / "p", _strix_lines(), archs=("gfx1151",), flash_attention="none")
    if recorded_target:
        receipt = state.read_receipt(prefix)
        state.write_json_atomic(prefix / state.RECEIPT, {**receipt, "target": recorded_target})
    probes = verify.run(prefix)
    expect = json.loads((prefix / "argv").read_text().splitlines()[1])
    assert expect["fp8"] == "weight-only" == targetprofile.load_all()["strix-halo"].fp8
    by = {p.name: p for p in probes}
    assert by["vllm.fp8-kernel"].status == "info"
    table = verify.format_table(probes)
    assert next(line for line in table.splitlines() if line.startswith("vllm.fp8-kernel")).split()[1] == "info"
    assert table.splitlines()[-1].endswith(", 1 for information")
    assert not any(p.status == "fail" for p in probes if p.name != "vllm.code-objects")


def test_an_rdna4_prefix_sends_no_fp8_kind(tmp_path):
    prefix = fake_prefix(tmp_path / "p", [json.dumps(d) for d in ALL_PASS], archs=("gfx1201",))
    receipt = state.read_receipt(prefix)
    state.write_json_atomic(prefix / state.RECEIPT, {**receipt, "target": "rdna4"})
    verify.run(prefix)
    assert "fp8" not in json.loads((prefix / "argv").read_text().splitlines()[1])


def test_the_receipts_target_is_read_or_derived_from_its_archs():
    profiles = targetprofile.load_all()
    assert targetprofile.of_receipt({"target": "strix-halo", "archs": ["gfx1151"]}, None, profiles).name == "strix-halo"
    assert targetprofile.of_receipt({"archs": ["gfx1151"]}, None, profiles).name == "strix-halo"
    assert targetprofile.of_receipt({"archs": ["gfx1201"]}, None, profiles).name == "rdna4"
    # a --gpu-arch override outside the recorded target follows the arch
    assert targetprofile.of_receipt({"target": "strix-halo", "archs": ["gfx1151"]}, ("gfx1200",),
                                    profiles).name == "rdna4"
    assert targetprofile.of_receipt({"archs": ["gfx906"]}, None, profiles) is None
