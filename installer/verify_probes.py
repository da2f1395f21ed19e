"""Probes `rdna4-install verify` runs inside the prefix's venv.

Executed by path with the venv's python, so it imports nothing from the
installer (which is not installed there). argv[1] is a JSON object:
{"archs": [...], "torch": "<pinned torch version or ''>", "rocm": "<pinned ROCm
version or ''>", "flash_attn": "ck" | "triton" | "none"}. Each probe prints one
JSON line {"name", "status", "detail"} as soon as it finishes, so a hard crash
(a segfault in a HIP library) still leaves the earlier results.

`torch.tp2` starts this script twice more (`--allreduce-rank SPEC`) as the two
ranks of a torch.distributed group: the probe runs in the venv, outside the
installer, so it starts them itself rather than through installer/proc.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"
NATIVE = "native"   # the target profile's [verify] fp8 kind with FP8 matrix instructions

# vLLM 0.33.0 vllm/model_executor/kernels/linear/__init__.py:468-476 lists the
# ROCm FP8 scaled-mm kernels in priority order. All of them multiply in FP8
# (hipBLASLt torch._scaled_mm, wvSplitKQ, AITER). For a per-tensor layer only
# ROCmFP8ScaledMMLinearKernel (scaled_mm/rocm.py:74, needs VLLM_ROCM_USE_SKINNY_GEMM)
# and PerTensorTorchFP8ScaledMMLinearKernel (scaled_mm/pytorch.py:82) can
# implement it. Anything else (Marlin/Humming W8A16 dequantize the weights)
# means FP8 is not running natively.
NATIVE_FP8_KERNELS = {
    "ROCmFP8ScaledMMLinearKernel",
    "PerTensorTorchFP8ScaledMMLinearKernel",
    "RowWiseTorchFP8ScaledMMLinearKernel",
    "ChannelWiseTorchFP8ScaledMMLinearKernel",
    "AiterHipbMMPerTokenFp8ScaledMMLinearKernel",
    "AiterPreshuffledPerTokenFp8ScaledMMLinearKernel",
    "AiterPerTokenFp8ScaledMMLinearKernel",
}

# What vLLM 0.33.0 does with an FP8 checkpoint on a GPU without FP8 matrix
# instructions (gfx1151, RDNA 3.5), read in the 0.33.0 sdist:
# - vllm/platforms/rocm.py:1255-1256: supports_fp8() is on_cdna() or on_rdna(), and
#   on_rdna() covers every gfx11/gfx12 (rocm.py:217, 232), so it is True on gfx1151 too:
#   it does not tell FP8-capable hardware apart here.
# - A per-tensor/per-channel FP8 linear layer (fp8.py:347 init_fp8_linear_kernel; a
#   compressed-tensors checkpoint takes the W8A8 scheme since gfx1151's capability 115 >= 89,
#   compressed_tensors.py:896-903, compressed_tensors_w8a8_fp8.py:83-85) picks from the ROCm
#   list kernels/linear/__init__.py:468-476. On gfx1151 none qualifies: the AITER kernels need
#   VLLM_ROCM_USE_AITER and an aiter build (scaled_mm/aiter.py:129-147, 222-245);
#   ROCmFP8ScaledMMLinearKernel needs CDNA3+ or gfx12x (scaled_mm/rocm.py:89-90); the torch
#   _scaled_mm kernels need gfx942/gfx950/gfx12x/gfx1250 (scaled_mm/pytorch.py:31-34, 46-47).
#   choose_scaled_mm_linear_kernel then raises "Failed to find a kernel ..."
#   (kernels/linear/__init__.py:740-743): the model does not load.
# - There is no weight-only (W8A16) FP8 fallback on ROCm: Marlin/Humming are CUDA-only
#   entries, and _POSSIBLE_WFP8A16_KERNELS[ROCM] is empty, "To be added"
#   (kernels/linear/__init__.py:522-529).
# - Block-FP8 checkpoints go to TritonFp8BlockScaledMMKernel (scaled_mm/triton.py:199-204,
#   any CUDA-alike platform); whether Triton lowers its FP8 dot on gfx11 is UNCONFIRMED.
NO_FP8_KERNEL = ("no FP8 linear kernel for this GPU in this vLLM: FP8 (per-tensor/per-channel) "
                 "checkpoints fail to load; serve BF16 or AWQ/GPTQ int4 weights "
                 "(ROCm has no weight-only FP8 fallback in vLLM 0.33.0)")


class Skip(Exception):
    """A probe that cannot run here (no GPU, component not installed)."""


def emit(name: str, status: str, detail: str) -> None:
    print(json.dumps({"name": name, "status": status, "detail": detail}), flush=True)


def probe(name: str, fn, *args) -> bool:
    try:
        result = fn(*args)
    except Skip as exc:
        emit(name, SKIP, str(exc))
        return False
    except Exception as exc:  # noqa: BLE001 - every failure is a probe result
        last = traceback.extract_tb(exc.__traceback__)[-1]
        emit(name, FAIL, f"{type(exc).__name__}: {exc} ({last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
        return False
    ok, detail = result
    status = ok if isinstance(ok, str) else (PASS if ok else FAIL)   # a judge may name the status
    emit(name, status, detail)
    return status != FAIL


def _torch():
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"needs torch, which did not import ({type(exc).__name__})") from None
    return torch


def _gpu(torch, archs):
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise Skip("no GPU visible to torch on this host")
    for i in range(torch.cuda.device_count()):
        if torch.cuda.get_device_properties(i).gcnArchName.split(":")[0] in archs:
            return i
    raise Skip("no target GPU visible (see torch.gpu-arch)")


def torch_import(expect):
    import torch

    return True, f"torch {torch.__version__} ({torch.__file__.rsplit('/', 2)[0]})"


def _dist_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_version(expect):
    torch = _torch()
    hip = torch.version.hip
    if not hip:
        return False, f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None)"
    if not expect.get("torch"):
        raise Skip(f"torch {torch.__version__}, HIP {hip}; no pins in the receipt to compare")
    problems = []
    if torch.__version__ != expect["torch"]:
        problems.append(f"torch {torch.__version__} != pin {expect['torch']}")
    # HIP has its own numbering (ROCm 10.0.0 ships HIP 7.15, 10.1.0 HIP 7.16, per users'
    # torch.version.hip reports), so the ROCm version is read from torch's local segment and
    # from the rocm wheel that torch loads its libraries from
    rocm = expect.get("rocm", "")
    if rocm:
        local = torch.__version__.partition("+")[2]
        if local != f"rocm{rocm}":
            problems.append(f"torch is built for {local or 'no ROCm'}, not ROCm {rocm}")
        wheel = _dist_version("rocm")
        if wheel is not None and wheel != rocm:
            problems.append(f"the rocm wheel is {wheel}, not {rocm}")
    if problems:
        return False, "; ".join(problems)
    return True, f"torch {torch.__version__}, HIP {hip} (pins: torch {expect['torch']}, ROCm {rocm})"


def _gpu_archs(torch):
    """The gfx target of each GPU torch sees, in torch's device order."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise Skip("no GPU visible to torch on this host")
    return [torch.cuda.get_device_properties(i).gcnArchName.split(":")[0]
            for i in range(torch.cuda.device_count())]


def torch_gpu_arch(expect):
    seen = _gpu_archs(_torch())
    ok = any(a in expect["archs"] for a in seen)
    return ok, f"GPUs: {', '.join(seen)}; target {','.join(expect['archs'])}"


def fp8_kind(expect):
    """The target profile's FP8 kind: native (RDNA4), weight-only or none."""
    return expect.get("fp8") or NATIVE


def fp8_scaled_mm(expect):
    if fp8_kind(expect) != NATIVE:
        raise Skip(f"target has no FP8 matrix instructions (fp8 = {fp8_kind(expect)}): "
                   "no FP8 GEMM to test; the FP8 path vLLM takes is vllm.fp8-kernel's")
    torch = _torch()
    dev = _gpu(torch, expect["archs"])
    fp8 = torch.float8_e4m3fn  # OCP FP8: gfx12 does not use the fnuz variant
    g = torch.Generator(device=f"cuda:{dev}").manual_seed(0)
    a = torch.randn(64, 256, device=f"cuda:{dev}", dtype=torch.bfloat16, generator=g)
    b = torch.randn(256, 128, device=f"cuda:{dev}", dtype=torch.bfloat16, generator=g)
    fmax = torch.finfo(fp8).max
    sa = (a.abs().max().float() / fmax).reshape(())
    sb = (b.abs().max().float() / fmax).reshape(())
    a8 = (a.float() / sa).to(fp8)
    b8 = (b.float() / sb).to(fp8).t().contiguous().t()  # _scaled_mm wants B column-major
    out = torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    torch.cuda.synchronize(dev)
    ref = a @ b
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    # e4m3 keeps 3 mantissa bits: ~3% relative error is expected, 10% means wrong
    return rel < 0.10, f"relative error vs bf16 {rel:.4f} (tolerance 0.10)"


def torch_idle_cpu(expect):
    torch = _torch()
    dev = _gpu(torch, expect["archs"])
    (torch.ones(1024, device=f"cuda:{dev}") * 2).sum().item()
    torch.cuda.synchronize(dev)
    # torch >= 2.12 on ROCm 10.0.0's runtime keeps a core busy after the first GPU op
    # (ROCm/ROCm#6406); 10.1.0 is pinned for the fix, which no AMD note confirms: measure it.
    # process_time() counts every thread of this process, the runtime's included.
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(2.0)
    share = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    return share < 0.5, f"{share * 100:.0f}% of a core used while idle after a GPU op (a spinning runtime shows ~100%)"


# --- tp2: an all-reduce over RCCL between two processes, as vLLM's TP=2 does ----------

# one size in LL's range and one far above it: RCCL picks its protocol by message size
# (rocm-systems rccl_wrap.cc rcclGetProtoForGfx12), and the gfx1201 deadlock is LL's
# (vllm-project/vllm#40980, ROCm/rocm-systems#5480)
TP2_SIZES = (1024, 4 * 1024 * 1024)
TP2_TIMEOUT = 180.0   # RCCL's first init on two cards takes tens of seconds; a hang takes forever


def tp2_allreduce(expect):
    seen = _gpu_archs(_torch())
    targets = [i for i, arch in enumerate(seen) if arch in expect["archs"]]
    if len(targets) < 2:
        raise Skip(f"needs 2 target GPUs, {len(targets)} visible ({', '.join(seen)}): "
                   "nothing to split a model across")
    return allreduce_across_processes("nccl", targets[:2], float(expect.get("tp2_timeout") or TP2_TIMEOUT))


def allreduce_across_processes(backend, devices, timeout):
    """Rank r of len(devices) processes adds r+1 with torch.distributed; every rank must
    read back the sum, within `timeout` seconds in all. (pass?, detail)

    The ranks are this script again (`--allreduce-rank`), each in its own process group
    so a hung RCCL kernel is killed with everything it started. Output goes to files:
    NCCL_DEBUG can print more than a pipe holds.
    """
    with contextlib.ExitStack() as files:
        return _run_ranks(backend, devices, timeout, files)


def _run_ranks(backend, devices, timeout, stack):
    world = len(devices)
    with socket.socket() as s:     # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, files = [], []
    try:
        for rank, device in enumerate(devices):
            spec = json.dumps({"backend": backend, "rank": rank, "world": world, "port": port,
                               "device": device, "sizes": list(TP2_SIZES), "timeout": timeout})
            out = stack.enter_context(tempfile.TemporaryFile("w+"))
            err = stack.enter_context(tempfile.TemporaryFile("w+"))
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, __file__, "--allreduce-rank", spec],
                                          stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            # a rank that died leaves the others waiting for it forever: stop there too
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                env = ", ".join(f"{k}={os.environ[k]}" for k in ("NCCL_PROTO", "NCCL_P2P_DISABLE")
                                if k in os.environ) or "no NCCL_PROTO/NCCL_P2P_DISABLE set"
                return False, (f"all-reduce across {world} processes did not finish in {timeout:.0f}s: "
                               f"a deadlock ({env}; vllm-project/vllm#40980 needs NCCL_PROTO=Simple, "
                               "ROCm/rocm-systems#11348 NCCL_P2P_DISABLE=1)")
            time.sleep(0.05)
    finally:
        killed = {i for i, p in enumerate(procs) if p.poll() is None}
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    texts = []
    for out, err in files:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
    want = float(world * (world + 1) // 2)
    # the rank that failed on its own explains it; the ones killed after it only waited
    order = sorted(range(world), key=lambda r: r in killed)
    for rank in order:
        p, (out, err) = procs[rank], texts[rank]
        if p.returncode != 0:
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            return False, f"rank {rank} exited with code {p.returncode}: {last[0][:200]}"
        try:
            got = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return False, f"rank {rank} printed no result: {out.strip()[-200:]!r}"
        for size, lo, hi in got:
            if lo != want or hi != want:
                return False, f"rank {rank}: all-reduce of {size} floats gave {lo}..{hi}, not {want}"
    sizes = " and ".join(f"{n * 4 // 1024} KiB" for n in TP2_SIZES)
    return True, f"{backend} all-reduce of {sizes} across {world} processes (devices {devices}): sums right"


def _allreduce_rank(spec):
    """One rank of allreduce_across_processes; prints [[size, min, max], ...]."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    device = "cpu" if spec["backend"] == "gloo" else f"cuda:{spec['device']}"
    if device != "cpu":
        torch.cuda.set_device(spec["device"])
    dist.init_process_group(spec["backend"], init_method=f"tcp://127.0.0.1:{spec['port']}",
                            rank=spec["rank"], world_size=spec["world"],
                            timeout=timedelta(seconds=spec["timeout"]))
    try:
        results = []
        for size in spec["sizes"]:
            t = torch.full((size,), float(spec["rank"] + 1), dtype=torch.float32, device=device)
            dist.all_reduce(t)
            if device != "cpu":
                torch.cuda.synchronize(spec["device"])
            results.append([size, t.min().item(), t.max().item()])
    finally:
        dist.destroy_process_group()
    print(json.dumps(results), flush=True)
    return 0


def torch_device_memory(expect):
    """What torch reports as device memory on an APU, as numbers: the installer judges them
    against sysfs (installer/unifiedmem.py judge), which this script cannot import."""
    if not expect.get("unified_memory"):
        raise Skip("not a unified-memory target")
    torch = _torch()
    dev = _gpu(torch, expect["archs"])
    # vLLM 0.33.0 sizes itself from torch.accelerator.get_memory_info, i.e. mem_get_info
    free, total = torch.cuda.mem_get_info(dev)
    props = torch.cuda.get_device_properties(dev).total_memory
    return True, json.dumps({"free": int(free), "total": int(total), "total_memory": int(props)})


def vllm_import(expect):
    import vllm

    return True, f"vllm {vllm.__version__}"


def judge_platform(kind, platform, is_rocm, supports_fp8, fp8_dtype=""):
    """vllm.platform's verdict: (status, detail). `kind` is the target's FP8 kind."""
    if not is_rocm:
        return FAIL, (f"platform is {platform}, not ROCm "
                      "(vLLM needs `import amdsmi` to work and to see the GPU)")
    if kind == NATIVE:
        if not supports_fp8:
            return FAIL, "ROCm platform, but supports_fp8() is False"
        return PASS, f"ROCm, FP8 supported ({fp8_dtype})"
    # vLLM 0.33.0 answers True on every RDNA (rocm.py:1255-1256), so True is no claim here
    said = "True (vLLM counts every RDNA GPU)" if supports_fp8 else "False"
    return PASS, (f"ROCm; supports_fp8() is {said}, but this target has no FP8 matrix "
                  f"instructions (fp8 = {kind}): see vllm.fp8-kernel for the FP8 path")


def vllm_platform(expect):
    torch = _torch()
    _gpu(torch, expect["archs"])
    from vllm.platforms import current_platform

    is_rocm = current_platform.is_rocm()
    fp8 = is_rocm and current_platform.supports_fp8()
    return judge_platform(fp8_kind(expect), type(current_platform).__name__, is_rocm, fp8,
                          str(current_platform.fp8_dtype()) if fp8 else "")


def judge_fp8_kernel(kind, kernel, refusal=""):
    """vllm.fp8-kernel's verdict: (status, detail) for the class vLLM chose (None when it
    raised `refusal`), on a target of FP8 kind `kind`."""
    if kind == NATIVE:
        if kernel in NATIVE_FP8_KERNELS:
            return PASS, f"{kernel} (native FP8)"
        return FAIL, f"{kernel} is not a native FP8 kernel (a dequantizing fallback)"
    if kernel is None:
        first = refusal.strip().splitlines()[0][:120] if refusal.strip() else "no reason given"
        return INFO, f"{NO_FP8_KERNEL} [vLLM: {first}]"
    if kernel in NATIVE_FP8_KERNELS:
        return FAIL, (f"{kernel} is a native FP8 kernel, but this target has no FP8 matrix "
                      f"instructions (fp8 = {kind}): an FP8 checkpoint would fail at run time")
    return INFO, f"weight-only: {kernel} dequantizes FP8 weights to 16 bit for the GEMM"


def vllm_fp8_kernel(expect):
    torch = _torch()
    _gpu(torch, expect["archs"])
    from vllm.platforms import current_platform

    if not current_platform.is_rocm():
        raise Skip("vLLM platform is not ROCm (see vllm.platform)")
    # vLLM 0.33.0: a CompressedTensors per-tensor FP8 layer asks for a kernel with
    # static per-tensor weight and activation keys (compressed_tensors_w8a8_fp8.py:46-52)
    # through choose_scaled_mm_linear_kernel (kernels/linear/__init__.py:675).
    from vllm.model_executor.kernels.linear import (
        _POSSIBLE_FP8_KERNELS,
        choose_scaled_mm_linear_kernel,
    )
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        FP8ScaledMMLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    config = FP8ScaledMMLinearLayerConfig(
        weight_quant_key=kFp8StaticTensorSym, activation_quant_key=kFp8StaticTensorSym,
        weight_shape=(4096, 4096), input_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    kind = fp8_kind(expect)
    if kind == NATIVE:   # a refusal is a failure on FP8 hardware: let it propagate as one
        return judge_fp8_kernel(kind, choose_scaled_mm_linear_kernel(
            config, _POSSIBLE_FP8_KERNELS, quantization="fp8_w8a8").__name__)
    return judge_fp8_kernel(kind, *choose_fp8_kernel(choose_scaled_mm_linear_kernel, config,
                                                     _POSSIBLE_FP8_KERNELS))


def choose_fp8_kernel(choose, config, kernels):
    """(class name, "") of the FP8 kernel vLLM picks, or (None, its refusal) when it finds
    none: choose_scaled_mm_linear_kernel raises ValueError then (__init__.py:740-743)."""
    try:
        return choose(config, kernels, quantization="fp8_w8a8").__name__, ""
    except ValueError as exc:
        return None, str(exc)


def _flash_attn(expect):
    if expect.get("flash_attn", "none") == "none":
        raise Skip("flash-attention is not part of this install")
    import flash_attn
    from flash_attn import flash_attn_interface as fai

    return flash_attn, fai


def flash_attn_backend(expect):
    flash_attn, fai = _flash_attn(expect)
    # flash_attn/flash_attn_interface.py (0251105a): USE_TRITON_ROCM is False and flash_attn_gpu is the
    # compiled flash_attn_2_cuda module when the CK build loaded
    gpu_mod = getattr(getattr(fai, "flash_attn_gpu", None), "__name__", "?")
    triton = bool(getattr(fai, "USE_TRITON_ROCM", False)) or gpu_mod != "flash_attn_2_cuda"
    got = "triton" if triton else "ck"
    want = expect["flash_attn"]
    detail = f"flash_attn {flash_attn.__version__}: {got} backend ({gpu_mod})"
    if got != want:
        return False, detail + f", expected {want}" + (
            " (the CK extension did not load: Triton fallback)" if want == "ck" else "")
    return True, detail


def flash_attn_vs_sdpa(expect):
    flash_attn, fai = _flash_attn(expect)
    torch = _torch()
    dev = _gpu(torch, expect["archs"])
    g = torch.Generator(device=f"cuda:{dev}").manual_seed(0)
    worst = 0.0
    for causal in (False, True):
        q, k, v = (torch.randn(2, 128, 4, 64, device=f"cuda:{dev}", dtype=torch.float16, generator=g)
                   for _ in range(3))
        out = flash_attn.flash_attn_func(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
    return worst < 1e-2, f"max |flash_attn - SDPA| = {worst:.2e} (fp16, tolerance 1e-2)"


PROBES = [
    ("torch.import", torch_import),
    ("torch.version", torch_version),
    ("torch.gpu-arch", torch_gpu_arch),
    ("torch.fp8-scaled-mm", fp8_scaled_mm),
    ("torch.idle-cpu", torch_idle_cpu),
    ("torch.tp2", tp2_allreduce),
    ("torch.device-memory", torch_device_memory),
    ("vllm.import", vllm_import),
    ("vllm.platform", vllm_platform),
    ("vllm.fp8-kernel", vllm_fp8_kernel),
    ("flash_attn.backend", flash_attn_backend),
    ("flash_attn.vs-sdpa", flash_attn_vs_sdpa),
]


def main(argv: list[str]) -> int:
    if len(argv) > 2 and argv[1] == "--allreduce-rank":
        return _allreduce_rank(json.loads(argv[2]))
    expect = json.loads(argv[1]) if len(argv) > 1 else {}
    expect.setdefault("archs", [])
    for name, fn in PROBES:
        probe(name, fn, expect)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
