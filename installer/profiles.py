"""Serving profiles for `bench --profile` and the matching `vllm serve` line.

- `seed`: the reference table's run (RX 9070 XT, RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8,
  request rate 10): vLLM's defaults, no extra server flags.
- `rdna4-16g`: for 16 GB cards, which fill their KV cache at ~5-6 concurrent requests
  while system RAM sits idle: FP8 KV cache (RDNA4 has FP8), vLLM's native CPU KV
  offloading into system RAM, and max-num-seqs / max-num-batched-tokens sized from
  the VRAM that is free now.

Flag names from the vLLM 0.33.0 sdist: vllm/engine/arg_utils.py (--kv-cache-dtype,
--kv-offloading-size, --kv-offloading-backend, --max-num-seqs,
--max-num-batched-tokens, --gpu-memory-utilization); vllm/config/cache.py:
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

GIB = 1024 ** 3
NAMES = ("seed", "rdna4-16g")
GPU_UTIL = 0.90                 # vLLM's default --gpu-memory-utilization
RUNTIME_GIB = 1.5               # activations, CUDA-graph pools, HIP runtime: an estimate
REQUEST_TOKENS = 1024 + 128     # the benchmark's random dataset: 1024 in, 128 out
OFFLOAD_RAM_SHARE = 0.5         # of MemAvailable; the rest stays with the system
OFFLOAD_MAX_GIB, OFFLOAD_MIN_GIB = 64, 4
# the reference model (Llama-3.1-8B FP8): 8.5 GiB of weights; 32 layers x 8 KV heads x 128
REFERENCE_WEIGHTS = int(8.5 * GIB)
REFERENCE_KV = {"num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128}


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


def model_facts(model: str, env=None) -> tuple[int, dict[str, Any], str]:
    """(weight bytes, config, where from): the cached model's, else the reference model's."""
    where = hfcache.locate(model, env)
    if where is not None:
        weights = sum(p.stat().st_size for p in where.glob("*.safetensors"))
        cfg = hfcache.config(model, env)
        if weights and "num_hidden_layers" in cfg:
            return weights, cfg, "measured from the cached model"
    return REFERENCE_WEIGHTS, REFERENCE_KV, "assumed: an 8B FP8 model (the model is not cached here)"


def rdna4_16g(free_vram: int, ram_available: int, weights: int, kv_per_token: int) -> Profile:
    """Flags sized from free VRAM and available RAM (all bytes)."""
    kv_budget = free_vram * GPU_UTIL - weights - RUNTIME_GIB * GIB
    if kv_budget <= 0:
        raise UsageError(f"the model ({weights / GIB:.1f} GiB) leaves no room for a KV cache in "
                         f"{free_vram / GIB:.1f} GiB of free VRAM",
                         hint="free VRAM (close other GPU users) or bench a smaller model with --model")
    tokens = int(kv_budget // kv_per_token)
    seqs = max(4, min(256, tokens // REQUEST_TOKENS // 4 * 4))
    # a prefill chunk's activations grow with it: smaller chunks on a tight card
    batched = 2048 if free_vram < 20 * GIB else (4096 if free_vram < 28 * GIB else 8192)
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


def free_vram(sysfs_root: Path | str | None = None) -> int | None:
    """Free VRAM of the AMD GPU with the most of it (amdgpu's mem_info_vram_total - _used)."""
    root = detect.resolve_root(sysfs_root)
    best = None
    for dev in detect.read_pci(root):
        if not dev.vram_bytes:
            continue
        try:
            used = int((detect.under(root, detect.PCI_DEVICES) / dev.address / "mem_info_vram_used")
                       .read_text().strip())
        except (OSError, ValueError):
            continue
        free = dev.vram_bytes - used
        best = free if best is None else max(best, free)
    return best


def resolve(name: str, model: str, *, sysfs_root: Path | str | None = None,
            vram_bytes: int | None = None, ram_bytes: int | None = None, env=None) -> Profile:
    if name == "seed":
        return Profile("seed", (), ("vLLM defaults: the reference table's server settings",))
    if name != "rdna4-16g":
        raise UsageError(f"unknown profile {name!r}", hint=f"one of: {', '.join(NAMES)}")
    vram = vram_bytes if vram_bytes is not None else free_vram(sysfs_root)
    if not vram:
        raise UsageError("cannot read the GPU's free VRAM (amdgpu mem_info_vram_used in sysfs)",
                         hint="is the amdgpu driver loaded? check with: rdna4-install doctor")
    ram = ram_bytes if ram_bytes is not None else buildenv.available_memory()
    weights, cfg, source = model_facts(model, env)
    profile = rdna4_16g(vram, ram, weights, kv_bytes_per_token(cfg))
    return Profile(profile.name, profile.serve_args, profile.notes + (f"model size {source}",), profile.sizing)


def serve_line(prefix: Path, model: str, profile: Profile) -> str:
    """The `vllm serve` command a user runs to serve with this profile."""
    return shlex.join([str(Path(prefix) / "venv" / "bin" / "vllm"), "serve", model, *profile.serve_args])
