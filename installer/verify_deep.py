"""Deep probes `rdna4-install verify --deep` runs inside the prefix's venv (minutes, on the card).

Executed by path with the venv's python, like verify_probes.py (whose helpers it
shares), so it imports nothing else from the installer. argv[1] is the JSON
object verify_probes takes plus "model" (a local path or a cached model name,
"" for none) and "offline" (true: no download, HF_HUB_OFFLINE=1).

Each probe is a measurement (GPU work, returning plain numbers and names) and a
judge (a pure function of those numbers): the judges are unit-tested with
recorded measurements, the measurements need the card. What each probe proves
is in docs/hardware-checklist.md.
"""

from __future__ import annotations

import json
import os
import sys

try:
    from . import verify_probes as vp
except ImportError:  # run by path: this folder is sys.path[0]
    import verify_probes as vp

PASS, FAIL, SKIP, Skip = vp.PASS, vp.FAIL, vp.SKIP, vp.Skip

ROWWISE = "RowWiseTorchFP8ScaledMMLinearKernel"
# LLMM1 / the skinny GEMM dispatcher in fp16 against an fp32 matmul: rounding at
# K = 6144 stays near 1e-3; the wave32 reduction bug gives errors of order 1.
LLMM1_TOL = 2e-2
FP8_TOL = 0.10          # e4m3 keeps 3 mantissa bits: ~3% is expected, 10% means wrong
# flash-attention's own tests/test_flash_attn_ck.py (0251105a): the output may be 4x,
# the gradients 10x as far from the fp32 reference as PyTorch's fp16 attention is
FA_OUT_FACTOR, FA_GRAD_FACTOR, FA_FLOOR = 4.0, 10.0, 1e-4
# shapes of test_flash_attn_varlen_output: batch 4, 9 query heads, 3 KV heads (gqa)
FA_CASES = [(113, 203, 64, False), (128, 217, 128, True)]   # (seqlen_q, seqlen_k, d, causal)
FALLBACK_ATTENTION = {"TORCH_SDPA", "CPU_ATTN"}


# --- judges: pure functions of recorded measurements -----------------------------------

def judge_llmm1(m: dict) -> tuple[bool, str]:
    """m: {"K", "rel_err" (vLLM's unquantized-GEMM dispatcher vs fp32 matmul)}."""
    ok = m["rel_err"] < LLMM1_TOL
    return ok, (f"n=1, m=8, K={m['K']}: relative error {m['rel_err']:.2e} vs torch.matmul "
                f"(tolerance {LLMM1_TOL:.0e})" + ("" if ok else "; the skinny GEMM result is wrong"))


def judge_fp8_kernel(layer: str, kernel: str) -> tuple[bool, str]:
    """The class vLLM's choose_scaled_mm_linear_kernel returned for a `layer` FP8 layer."""
    if kernel not in vp.NATIVE_FP8_KERNELS:
        return False, f"{layer}: {kernel} is not a native FP8 kernel (a dequantizing fallback)"
    if layer == "per-channel" and kernel == ROWWISE:
        return False, (f"{layer}: {kernel} is selected; on RDNA4 it decodes 5-24% slower than "
                       "ChannelWise (vllm#57838): the RowWise patch is not in effect")
    return True, f"{layer}: {kernel}"


def judge_fp8_gemm(errors: dict) -> tuple[bool, str]:
    """errors: {"per-tensor": rel_err, "per-channel": rel_err} of a 64x256x128 FP8 GEMM."""
    worst = max(errors.values())
    return worst < FP8_TOL, ", ".join(f"{k} relative error {v:.4f}" for k, v in errors.items()) + \
        f" vs float (tolerance {FP8_TOL})"


def judge_fa_backend(want: str, use_triton: bool, module: str) -> tuple[bool, str]:
    got = "triton" if use_triton or module != "flash_attn_2_cuda" else "ck"
    detail = f"import chose {got} ({module})"
    if got != want:
        return False, detail + f", expected {want}" + (
            "; the CK extension did not load" if want == "ck" else "")
    return True, detail


def judge_fa_varlen(cases: list[dict], kind: str) -> tuple[bool, str]:
    """cases: per shape {"shape", "<kind>_err": {tensor: err}, "<kind>_pt_err": {tensor: err}};
    kind "fwd" (tensor "out") or "bwd" (dq, dk, dv)."""
    factor = FA_OUT_FACTOR if kind == "fwd" else FA_GRAD_FACTOR
    bad, worst = [], 0.0
    for case in cases:
        for tensor, err in case[f"{kind}_err"].items():
            limit = factor * max(case[f"{kind}_pt_err"][tensor], FA_FLOOR)
            worst = max(worst, err / limit)
            if err > limit:
                bad.append(f"{case['shape']} {tensor} {err:.2e} > {limit:.2e}")
    if bad:
        return False, "; ".join(bad)
    return True, (f"{len(cases)} varlen shapes, worst error {worst:.2f} of the allowed "
                  f"{factor:.0f}x PyTorch fp16's")


def judge_generate(text: str, backends: list[str], model: str) -> tuple[bool, str]:
    if not text.strip():
        return False, f"{model}: the generation returned no text"
    if not backends:
        return False, f"{model}: no attention layer reported a backend"
    fallback = sorted(set(backends) & FALLBACK_ATTENTION)
    detail = f"{model}: attention {', '.join(sorted(set(backends)))}; text {text.strip()[:40]!r}"
    if fallback:
        return False, detail + f" (fallback backend {fallback[0]})"
    return True, detail


# --- measurements: need the card ---------------------------------------------------------

def _device(expect):
    torch = vp._torch()
    return torch, vp._gpu(torch, expect["archs"])


def _vllm():
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"needs vllm, which did not import ({type(exc).__name__})") from None


def measure_llmm1(expect, k: int) -> dict:
    torch, dev = _device(expect)
    _vllm()
    from vllm.model_executor.layers.utils import rocm_unquantized_gemm_impl

    g = torch.Generator(device=f"cuda:{dev}").manual_seed(k)
    # n == 1, m in {4, 8}, no bias: the shape vLLM 0.33.0 sends to LLMM1 (an MoE router)
    x = torch.randn(1, k, device=f"cuda:{dev}", dtype=torch.float16, generator=g)
    w = torch.randn(8, k, device=f"cuda:{dev}", dtype=torch.float16, generator=g)
    out = rocm_unquantized_gemm_impl(x, w, None).float()
    ref = torch.matmul(x.float(), w.float().t())
    torch.cuda.synchronize(dev)
    return {"K": k, "rel_err": ((out - ref).norm() / ref.norm()).item()}


def _fp8_config(layer: str):
    import torch
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils import quant_utils as qu

    # compressed_tensors_w8a8_fp8.py (0.33.0): CHANNEL -> kFp8StaticChannelSym weights with
    # dynamic per-token activations; TENSOR -> kFp8StaticTensorSym for both
    weight, act = ((qu.kFp8StaticChannelSym, qu.kFp8DynamicTokenSym) if layer == "per-channel"
                   else (qu.kFp8StaticTensorSym, qu.kFp8StaticTensorSym))
    return FP8ScaledMMLinearLayerConfig(weight_quant_key=weight, activation_quant_key=act,
                                        weight_shape=(4096, 4096), input_dtype=torch.bfloat16,
                                        out_dtype=torch.bfloat16)


def fp8_kernel_probe(expect, layer: str):
    """The kernel vLLM picks for a `layer` FP8 layer. Native FP8 targets must get a native
    one (a refusal raises: a failure); on the others vLLM's choice or refusal is reported
    as what an FP8 checkpoint would do there (verify_probes.judge_fp8_kernel)."""
    _device(expect)
    _vllm()
    from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_KERNELS, choose_scaled_mm_linear_kernel

    kind = vp.fp8_kind(expect)
    if kind == vp.NATIVE:
        return judge_fp8_kernel(layer, choose_scaled_mm_linear_kernel(
            _fp8_config(layer), _POSSIBLE_FP8_KERNELS, quantization="fp8_w8a8").__name__)
    status, detail = vp.judge_fp8_kernel(kind, *vp.choose_fp8_kernel(
        choose_scaled_mm_linear_kernel, _fp8_config(layer), _POSSIBLE_FP8_KERNELS))
    return status, f"{layer}: {detail}"


def fp8_gemm_probe(expect):
    if vp.fp8_kind(expect) != vp.NATIVE:
        raise Skip(f"target has no FP8 matrix instructions (fp8 = {vp.fp8_kind(expect)}): no FP8 GEMM to test")
    return judge_fp8_gemm(measure_fp8_gemm(expect))


def measure_fp8_gemm(expect) -> dict:
    torch, dev = _device(expect)
    fp8, on = torch.float8_e4m3fn, f"cuda:{dev}"
    g = torch.Generator(device=on).manual_seed(0)
    a = torch.randn(64, 256, device=on, dtype=torch.bfloat16, generator=g)
    b = torch.randn(256, 128, device=on, dtype=torch.bfloat16, generator=g)
    fmax, ref = torch.finfo(fp8).max, (a.float() @ b.float())
    out = {}
    for layer, dim_a, dim_b in (("per-tensor", None, None), ("per-channel", 1, 0)):
        sa = (a.abs().amax(dim=dim_a, keepdim=True) if dim_a is not None else a.abs().max()).float() / fmax
        sb = (b.abs().amax(dim=dim_b, keepdim=True) if dim_b is not None else b.abs().max()).float() / fmax
        a8, b8 = (a.float() / sa).to(fp8), (b.float() / sb).to(fp8).t().contiguous().t()
        one = torch.ones((), device=on)
        # the ChannelWise kernel's way: an unscaled FP8 GEMM, scales applied after
        got = torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32) * sa * sb
        out[layer] = ((got - ref).norm() / ref.norm()).item()
    torch.cuda.synchronize(dev)
    return out


def _attention_ref(q, k, v, causal: bool, upcast: bool):
    """Plain PyTorch attention over one sequence (b=1), KV heads repeated for GQA."""
    import torch

    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:  # bottom-right aligned, as flash-attention does for seqlen_q != seqlen_k
        sq, sk = q.shape[0], k.shape[0]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(dtype)


def measure_fa_varlen(expect) -> list[dict]:
    fa, torch, dev = _flash_attn(expect)
    on, batch, heads, kv_heads = f"cuda:{dev}", 4, 9, 3
    torch.random.manual_seed(0)
    cases = []
    for sq, sk, d, causal in FA_CASES:
        # varlen: the batch packed into one sequence dimension, lengths by cu_seqlens
        lq = [sq - 7 * i for i in range(batch)]
        lk = [sk - 5 * i for i in range(batch)]
        q = torch.randn(sum(lq), heads, d, device=on, dtype=torch.float16, requires_grad=True)
        k = torch.randn(sum(lk), kv_heads, d, device=on, dtype=torch.float16, requires_grad=True)
        v = torch.randn(sum(lk), kv_heads, d, device=on, dtype=torch.float16, requires_grad=True)
        cu_q = torch.tensor([0] + lq, device=on).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lk, device=on).cumsum(0).to(torch.int32)
        out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal)
        bq, bk = cu_q.tolist(), cu_k.tolist()
        refs = {}
        for upcast in (True, False):
            refs[upcast] = torch.cat([_attention_ref(q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]],
                                                     v[bk[i]:bk[i + 1]], causal, upcast)
                                      for i in range(batch)])
        dout = torch.randn_like(out)
        grads = {}
        for key, o in (("fa", out), ("ref", refs[True]), ("pt", refs[False])):
            grads[key] = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(o, (q, k, v), dout)))
        err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
        cases.append({
            "shape": f"q{sq}/k{sk} d{d}{' causal' if causal else ''}",
            "fwd_err": {"out": err(out, refs[True])}, "fwd_pt_err": {"out": err(refs[False], refs[True])},
            "bwd_err": {t: err(grads["fa"][t], grads["ref"][t]) for t in ("dq", "dk", "dv")},
            "bwd_pt_err": {t: err(grads["pt"][t], grads["ref"][t]) for t in ("dq", "dk", "dv")},
        })
    torch.cuda.synchronize(dev)
    return cases


def _flash_attn(expect):
    """(flash_attn, torch, device index); the card first: the CK extension's import loads HIP."""
    if expect.get("flash_attn", "none") == "none":
        raise Skip("flash-attention is not part of this install")
    torch, dev = _device(expect)
    import flash_attn

    return flash_attn, torch, dev


def measure_fa_backend(expect) -> tuple[bool, str]:
    _flash_attn(expect)
    from flash_attn import flash_attn_interface as fai

    return (bool(getattr(fai, "USE_TRITON_ROCM", False)),
            getattr(getattr(fai, "flash_attn_gpu", None), "__name__", "?"))


def measure_generate(expect) -> tuple[str, list[str], str]:
    _device(expect)
    model = expect.get("model") or ""
    if not model:
        raise Skip(expect.get("model_reason") or "no model: pass --model NAME (a local path or a cached model)")
    if expect.get("offline", True):
        os.environ["HF_HUB_OFFLINE"] = "1"   # no download without the user's consent
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model stays in this process
    _vllm()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=512, gpu_memory_utilization=0.5, enforce_eager=True)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    text = out[0].outputs[0].text

    def backends(module):  # vLLM's Attention layers keep the class they were given
        return [m.get_attn_backend().get_name() for m in module.modules()
                if getattr(m, "attn_backend", None) is not None and hasattr(m, "get_attn_backend")]

    names = [n for worker in llm.apply_model(backends) for n in worker]
    return text, names, model


PROBES = [
    ("deep.llmm1-k4096", lambda e: judge_llmm1(measure_llmm1(e, 4096))),
    ("deep.llmm1-k6144", lambda e: judge_llmm1(measure_llmm1(e, 6144))),
    ("deep.fp8-kernel-per-tensor", lambda e: fp8_kernel_probe(e, "per-tensor")),
    ("deep.fp8-kernel-per-channel", lambda e: fp8_kernel_probe(e, "per-channel")),
    ("deep.fp8-gemm", fp8_gemm_probe),
    ("deep.flash_attn-backend", lambda e: judge_fa_backend(e["flash_attn"], *measure_fa_backend(e))),
    ("deep.flash_attn-varlen", None),   # forward and backward share one measurement
    ("deep.vllm-generate", lambda e: judge_generate(*measure_generate(e))),
]
# what the script reports, in order (verify marks the rest "not reached" after a crash)
NAMES = [n for name, fn in PROBES for n in ([name] if fn else [f"{name}-fwd", f"{name}-bwd"])]


def main(argv: list[str]) -> int:
    expect = json.loads(argv[1]) if len(argv) > 1 else {}
    expect.setdefault("archs", [])
    expect.setdefault("flash_attn", "none")
    for name, fn in PROBES:
        if fn is not None:
            vp.probe(name, fn, expect)
            continue
        try:
            cases = measure_fa_varlen(expect)
        except Skip as exc:
            for kind in ("fwd", "bwd"):
                vp.emit(f"{name}-{kind}", SKIP, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a crash in the forward fails both
            for kind in ("fwd", "bwd"):
                vp.emit(f"{name}-{kind}", FAIL, f"{type(exc).__name__}: {exc}")
            continue
        for kind in ("fwd", "bwd"):
            vp.probe(f"{name}-{kind}", judge_fa_varlen, cases, kind)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
