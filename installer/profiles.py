"""Serving profiles for `bench --profile` and the matching `vllm serve` line.

- `seed`: the reference table's run (RX 9070 XT, RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8,
  request rate 10): vLLM's defaults, no extra server flags.
- `rdna4-16g`: for 16 GB cards, which fill their KV cache at ~5-6 concurrent requests
  while system RAM sits idle: FP8 KV cache (RDNA4 has FP8), vLLM's native CPU KV
  offloading into system RAM, and max-num-seqs / max-num-batched-tokens sized from
  the VRAM that is free now. Only for targets with native FP8 (the target profile's
  [verify] fp8): an FP8 KV cache needs it.
- `strix-halo`: for targets with unified memory (the target profile's [doctor]
  unified_memory): the GPU maps system RAM, so offloading KV "to RAM" would copy it
  within the same memory. Instead a large 16-bit KV cache sized in bytes
  (--kv-cache-memory-bytes, which vLLM uses instead of --gpu-memory-utilization:
  vllm/config/cache.py:374-381, v1/worker/gpu_worker.py:656-678) from what the GPU can
  map now: carve-out plus GTT, at most carve-out plus available RAM.

Flag names from the vLLM 0.33.0 sdist: vllm/engine/arg_utils.py (--kv-cache-dtype,
--kv-offloading-size, --kv-offloading-backend, --max-num-seqs,
--max-num-batched-tokens, --gpu-memory-utilization, --kv-cache-memory-bytes at
arg_utils.py:1395); vllm/config/cache.py:
kv_offloading_size is "the KV cache offloading buffer in GiB", off by default,
backend "native" (vLLM's CPU offloading) by default.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import buildenv, detect, hfcache
from .errors import UsageError
from .targetprofile import Profile as Target

GIB = 1024 ** 3
NAMES = ("seed", "rdna4-16g", "strix-halo")
GPU_UTIL = 0.90                 # vLLM's default --gpu-memory-utilization
RUNTIME_GIB = 1.5               # activations, CUDA-graph pools, HIP runtime: an estimate
REQUEST_TOKENS = 1024 + 128     # the benchmark's random dataset: 1024 in, 128 out
OFFLOAD_RAM_SHARE = 0.5         # of MemAvailable; the rest stays with the system
OFFLOAD_MAX_GIB, OFFLOAD_MIN_GIB = 64, 4
# the reference model (Llama-3.1-8B FP8): 8.5 GiB of weights; 32 layers x 8 KV heads x 128
REFERENCE_WEIGHTS = int(8.5 * GIB)
REFERENCE_KV = {"num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128}
# strix-halo: 8B in 16 bit is ~15 GiB (Llama-3.1-8B: 8.03e9 parameters x 2 bytes); the
# KV cache is capped where 256 sequences of the benchmark's requests fit twice over
BF16_8B_WEIGHTS = 15 * GIB
UMA_KV_MAX_GIB = 48
MAX_SEQS = 256


@dataclass(frozen=True)
class Profile:
    name: str
    serve_args: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    sizing: dict[str, Any] = field(default_factory=dict, compare=False)


def kv_bytes_per_token(cfg: dict[str, Any], kv_dtype_bytes: int = 1) -> int:
    heads = int(cfg.get("num_attention_heads") or cfg.get("num_key_value_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads or 128)
    return 2 * int(cfg["num_hidden_layers"]) * kv * head_dim * kv_dtype_bytes   # K and V


def model_facts(model: str, env=None, assumed_weights: int | None = None) -> tuple[int, dict[str, Any], str]:
    """(weight bytes, config, where from): the cached model's, else an assumed 8B model's
    (`assumed_weights`, by default the reference FP8 one's)."""
    where = hfcache.locate(model, env)
    if where is not None:
        weights = sum(p.stat().st_size for p in where.glob("*.safetensors"))
        cfg = hfcache.config(model, env)
        if weights and "num_hidden_layers" in cfg:
            return weights, cfg, "measured from the cached model"
    if assumed_weights:
        return assumed_weights, REFERENCE_KV, (f"assumed: an 8B model, {assumed_weights / GIB:.0f} GiB "
                                               "of weights (the model is not cached here)")
    return REFERENCE_WEIGHTS, REFERENCE_KV, "assumed: an 8B FP8 model (the model is not cached here)"


def _batch(kv_tokens: int, free: int) -> tuple[int, int]:
    """(max-num-seqs, max-num-batched-tokens) for a KV cache of `kv_tokens` and `free` bytes."""
    seqs = max(4, min(MAX_SEQS, kv_tokens // REQUEST_TOKENS // 4 * 4))
    # a prefill chunk's activations grow with it: smaller chunks on a tight card
    batched = 2048 if free < 20 * GIB else (4096 if free < 28 * GIB else 8192)
    return seqs, batched


def rdna4_16g(free_vram: int, ram_available: int, weights: int, kv_per_token: int) -> Profile:
    """Flags sized from free VRAM and available RAM (all bytes)."""
    kv_budget = free_vram * GPU_UTIL - weights - RUNTIME_GIB * GIB
    if kv_budget <= 0:
        raise UsageError(f"the model ({weights / GIB:.1f} GiB) leaves no room for a KV cache in "
                         f"{free_vram / GIB:.1f} GiB of free VRAM",
                         hint="free VRAM (close other GPU users) or bench a smaller model with --model")
    tokens = int(kv_budget // kv_per_token)
    seqs, batched = _batch(tokens, free_vram)
    args = ["--kv-cache-dtype", "fp8", "--gpu-memory-utilization", f"{GPU_UTIL:.2f}",
            "--max-num-seqs", str(seqs), "--max-num-batched-tokens", str(batched)]
    notes = [f"free VRAM {free_vram / GIB:.1f} GiB -> about {tokens:,} FP8 KV tokens "
             f"(~{tokens // REQUEST_TOKENS} requests of {REQUEST_TOKENS} tokens)"]
    offload = int(min(OFFLOAD_MAX_GIB, ram_available * OFFLOAD_RAM_SHARE / GIB))
    if offload >= OFFLOAD_MIN_GIB:
        args += ["--kv-offloading-size", str(offload), "--kv-offloading-backend", "native"]
        notes.append(f"{offload} GiB of KV offloaded to system RAM (half of {ram_available / GIB:.0f} GiB available)")
    else:
        notes.append(f"no KV offloading: only {ram_available / GIB:.1f} GiB of RAM available")
    return Profile("rdna4-16g", tuple(args), tuple(notes),
                   {"free_vram": free_vram, "ram_available": ram_available, "weights": weights,
                    "kv_bytes_per_token": kv_per_token, "kv_tokens": tokens})


def strix_halo(gpu_mappable: int, weights: int, kv_per_token: int) -> Profile:
    """Flags for a unified-memory GPU that can map `gpu_mappable` bytes now (all bytes)."""
    kv_budget = int(gpu_mappable * GPU_UTIL - weights - RUNTIME_GIB * GIB)
    if kv_budget <= 0:
        raise UsageError(f"the model ({weights / GIB:.1f} GiB) leaves no room for a KV cache in the "
                         f"{gpu_mappable / GIB:.1f} GiB the GPU can map now",
                         hint="free memory (close other programs) or raise the GTT limit: rdna4-install doctor")
    kv = min(kv_budget, UMA_KV_MAX_GIB * GIB)
    tokens = kv // kv_per_token
    seqs, batched = _batch(tokens, gpu_mappable)
    args = ["--kv-cache-memory-bytes", str(kv), "--max-num-seqs", str(seqs),
            "--max-num-batched-tokens", str(batched)]
    notes = [f"the GPU can map {gpu_mappable / GIB:.1f} GiB now (carve-out + GTT) -> "
             f"{kv / GIB:.1f} GiB of 16-bit KV cache, about {tokens:,} tokens "
             f"(~{tokens // REQUEST_TOKENS} requests of {REQUEST_TOKENS} tokens)",
             "no FP8 KV cache (no FP8 on this GPU) and no KV offloading (the GPU already uses system RAM)"]
    return Profile("strix-halo", tuple(args), tuple(notes),
                   {"gpu_mappable": gpu_mappable, "weights": weights, "kv_bytes_per_token": kv_per_token,
                    "kv_bytes": kv, "kv_tokens": tokens})


def _mem_info(root: Path, dev: detect.PciDevice, name: str) -> int | None:
    """amdgpu's mem_info_<name> (bytes) on the PCI device; None when absent."""
    try:
        return int((detect.under(root, detect.PCI_DEVICES) / dev.address / f"mem_info_{name}").read_text().strip())
    except (OSError, ValueError):
        return None


def gpu_mappable(archs: tuple[str, ...], ram_available: int, sysfs_root: Path | str | None = None) -> int | None:
    """What an integrated GPU of `archs` can map now: free carve-out (mem_info_vram_*) plus free
    GTT (mem_info_gtt_*), GTT at most what RAM has available (its pages come from RAM)."""
    root = detect.resolve_root(sysfs_root)
    best = None
    for dev in detect.read_pci(root):
        if (detect.PCI_IDS.get(dev.device) or ("",))[0] not in archs:
            continue
        gtt_total, gtt_used = _mem_info(root, dev, "gtt_total"), _mem_info(root, dev, "gtt_used")
        if gtt_total is None or gtt_used is None:
            continue
        vram_free = (dev.vram_bytes or 0) - (_mem_info(root, dev, "vram_used") or 0)
        free = max(vram_free, 0) + min(max(gtt_total - gtt_used, 0), ram_available)
        best = free if best is None else max(best, free)
    return best


def free_vram(sysfs_root: Path | str | None = None) -> int | None:
    """Free VRAM of the AMD GPU with the most of it (amdgpu's mem_info_vram_total - _used)."""
    root = detect.resolve_root(sysfs_root)
    best = None
    for dev in detect.read_pci(root):
        used = _mem_info(root, dev, "vram_used")
        if not dev.vram_bytes or used is None:
            continue
        free = dev.vram_bytes - used
        best = free if best is None else max(best, free)
    return best


def offered(target: Target | None) -> tuple[str, ...]:
    """The serving profiles that fit a target profile (None: an install from before targets,
    RDNA4): FP8 KV cache needs native FP8, the unified-memory sizing needs unified memory."""
    fp8 = target is None or target.fp8 == "native"
    uma = target is not None and target.unified_memory
    return tuple(n for n, ok in (("seed", True), ("rdna4-16g", fp8), ("strix-halo", uma)) if ok)


def resolve(name: str, model: str, *, sysfs_root: Path | str | None = None,
            vram_bytes: int | None = None, ram_bytes: int | None = None, env=None,
            target: Target | None = None, assumed_weights: int | None = None,
            prefix: Path | None = None) -> Profile:
    """`vram_bytes`: the GPU memory to size for (free VRAM; for strix-halo what the GPU can
    map); `assumed_weights`: the model's size when it is not cached (default: the
    reference 8B FP8); `prefix` goes into the hint when the profile does not fit."""
    if name not in NAMES:
        raise UsageError(f"unknown profile {name!r}", hint=f"one of: {', '.join(NAMES)}")
    fits = offered(target)
    if name not in fits:
        why = ("an FP8 KV cache needs native FP8" if name == "rdna4-16g"
               else "it sizes a KV cache in unified memory")
        raise UsageError(f"serving profile {name!r} does not fit target {target.name if target else 'rdna4'}: {why}",
                         hint=f"profiles for this target: {', '.join(fits)}; e.g. rdna4-install bench "
                              + (f"--prefix {shlex.quote(str(prefix))} " if prefix else "") + f"--profile {fits[-1]}")
    if name == "seed":
        return Profile("seed", (), ("vLLM defaults: the reference table's server settings",))
    ram = ram_bytes if ram_bytes is not None else buildenv.available_memory()
    if name == "strix-halo":
        mappable = vram_bytes if vram_bytes is not None else gpu_mappable(target.archs, ram, sysfs_root)
        if not mappable:
            raise UsageError("cannot read what the GPU can map (amdgpu mem_info_gtt_total/_used in sysfs)",
                             hint="is the amdgpu driver loaded? check with: rdna4-install doctor")
        weights, cfg, source = model_facts(model, env, assumed_weights)
        profile = strix_halo(mappable, weights, kv_bytes_per_token(cfg, 2))
    else:
        vram = vram_bytes if vram_bytes is not None else free_vram(sysfs_root)
        if not vram:
            raise UsageError("cannot read the GPU's free VRAM (amdgpu mem_info_vram_used in sysfs)",
                             hint="is the amdgpu driver loaded? check with: rdna4-install doctor")
        weights, cfg, source = model_facts(model, env, assumed_weights)
        profile = rdna4_16g(vram, ram, weights, kv_bytes_per_token(cfg))
    return Profile(profile.name, profile.serve_args, profile.notes + (f"model size {source}",), profile.sizing)


def serve_line(prefix: Path, model: str, profile: Profile, extra: tuple[str, ...] = ()) -> str:
    """The `vllm serve` command a user runs to serve with this profile (then `extra`)."""
    return shlex.join([str(Path(prefix) / "venv" / "bin" / "vllm"), "serve", model, *profile.serve_args,
                       *extra])
