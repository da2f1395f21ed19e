"""`rdna4-install tune`: tune vLLM's block-FP8 (w8a8) Triton GEMM for one model on this card.

vLLM 0.33.0 ships no tuned w8a8 block-FP8 configs for RDNA4 (`AMD_Radeon_R9700`,
`AMD_Radeon_RX9070XT`); users report about +33% single-stream from tuned ones
(ROCm/aiter#2242 on gfx1201). This runs vLLM's own tuner from the installed
release's source, benchmarks/kernels/benchmark_w8a8_block_fp8.py, for the GEMM
shapes of the given model, keeps the results under PREFIX/tuned/ and copies
them to where vLLM reads them, and records them in the receipt.

Facts from the vLLM 0.33.0 sdist:
- the tuner's `main(args)` tunes `get_weight_shapes(args.tp_size)` (DeepSeek-V3's
  shapes, "Modify them, if you tune for another different model") and writes
  `N={N},K={K},device_name={device},dtype=fp8_w8a8,block_shape=[{bn},{bk}].json`
  into --save-path (save_configs);
- vLLM reads exactly that name from the `configs` folder beside
  vllm/model_executor/layers/quantization/utils/fp8_utils.py
  (get_w8a8_block_fp8_configs); no environment variable moves it;
- the device name is vllm.utils.platform_utils.get_device_name_as_file_name():
  platforms/rocm.py maps PCI id 0x7551 to AMD_Radeon_R9700 and 0x7550 to
  AMD_Radeon_RX9070XT, other cards use amdsmi's market name with spaces as "_".
Per-tensor and per-channel FP8 layers run on hipBLASLt, which reads no such
configs: only block-FP8 models (weight_block_size in quantization_config) are tuned.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import activate, hfcache, proc, state, targetprofile
from .errors import InstallerError, UsageError, command
from .download import sha256_file
from .pyenv import site_packages

SCRIPT = Path("benchmarks/kernels/benchmark_w8a8_block_fp8.py")
CONFIG_DIR = Path("vllm/model_executor/layers/quantization/utils/configs")
CONFIG_NAME = re.compile(r"N=(\d+),K=(\d+),device_name=(.+),dtype=fp8_w8a8,block_shape=\[(\d+), ?(\d+)\]\.json")
RECEIPT_KEY = "w8a8_block_fp8"
OUT_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "half"}

# Runs in the venv: imports vLLM's tuner by module name (it is on PYTHONPATH, so its
# spawned workers import it the same way), gives it this model's shapes instead of
# DeepSeek-V3's and calls its own main() with the arguments its parser defines.
DRIVER = """\
import argparse, json, sys
spec = json.loads(sys.argv[1])
sys.argv = [spec["script"]]
import benchmark_w8a8_block_fp8 as tuner
shapes = [tuple(s) for s in spec["shapes"]]
tuner.get_weight_shapes = lambda tp_size: shapes
tuner.main(argparse.Namespace(tp_size=spec["tp"], input_type="fp8", out_dtype=spec["out_dtype"],
                              block_n=spec["block"][0], block_k=spec["block"][1],
                              batch_size=spec["batch_size"], save_path=spec["save_path"]))
"""


@dataclass
class TuneResult:
    model: str
    device_name: str
    shapes: list[tuple[int, int]]
    files: dict[str, dict[str, str]] = field(default_factory=dict)   # name -> sha256, installed, kept


def block_size(cfg: dict[str, Any], model: str) -> tuple[int, int]:
    quant = cfg.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    if quant.get("quant_method") != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise UsageError(f"{model} is not a block-FP8 model (no fp8 weight_block_size in its config)",
                         hint="tune applies to block-quantized FP8 checkpoints such as Qwen/Qwen3-8B-FP8; "
                              "per-tensor and per-channel FP8 layers use hipBLASLt, which has no configs")
    return int(block[0]), int(block[1])


def weight_shapes(cfg: dict[str, Any], tp: int = 1) -> list[tuple[int, int]]:
    """(N, K) of the dense linear layers of a decoder at tensor parallel `tp`:
    qkv and gate_up split N across ranks, o and down split K."""
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg.get("intermediate_size") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"the model config lacks a decoder field: {exc}",
                         hint="tune needs hidden_size, num_attention_heads (and intermediate_size)") from None
    shapes = [((heads + 2 * kv) * head_dim // tp, hidden), (hidden, heads * head_dim // tp)]
    if inter:
        shapes += [(2 * inter // tp, hidden), (hidden, inter // tp)]
    return list(dict.fromkeys(shapes))


def tuner_dir(prefix: Path, receipt: dict, cache_dir: Path, ui: Any = None) -> Path:
    """benchmarks/kernels of the installed vLLM: the kept source tree, else the cached sdist."""
    kept = state.work_root(prefix) / "vllm" / "src"
    if (kept / SCRIPT).is_file():
        return kept / SCRIPT.parent
    pins = (receipt.get("pins") or {}).get("vllm") or {}
    url, sha = pins.get("sdist_url"), pins.get("sdist_sha256")
    if not url:
        raise InstallerError("the receipt names no vLLM sdist to take the tuner from",
                             hint=f"install vLLM first: rdna4-install run vllm --prefix '{prefix}'")
    dest = state.work_root(prefix) / "tune" / f"vllm-{pins.get('version', 'src')}"
    if not (dest / SCRIPT).is_file():
        from . import download, unpack

        got = download.fetch(url, cache_dir=cache_dir, sha256=sha or None, ui=ui, what="vLLM sdist")
        unpack.extract_tarball(got.path, dest, strip_components=1)
    if not (dest / SCRIPT).is_file():
        raise InstallerError(f"the vLLM source has no {SCRIPT}",
                             hint="this vLLM version's tuner moved; pin vllm.version 0.33.0")
    return dest / SCRIPT.parent


def run(prefix: Path, model: str, *, cache_dir: Path, tp: int = 1, batch_size: int | None = None,
        visible_devices: str = "", ui: Any = None) -> TuneResult:
    prefix = Path(prefix)
    python = prefix / "venv" / "bin" / "python"
    if not python.exists():
        raise InstallerError(f"no venv at {prefix / 'venv'}", hint="install first: " + command(prefix, "install"))
    if tp < 1:
        raise UsageError("--tp must be at least 1")
    receipt = state.read_receipt(prefix) or {}
    profile = targetprofile.of_receipt(receipt)
    if profile is not None and profile.fp8 != "native":
        raise UsageError(f"tune tunes vLLM's FP8 GEMMs; target {profile.name} has no native FP8 "
                         f"(fp8 = {profile.fp8} in its profile), so there is nothing to tune",
                         hint="serve a BF16 or int4 (AWQ/GPTQ) model there instead of an FP8 one")
    env = hfcache.with_user_vars(activate.environment(activate.from_receipt(prefix, visible_devices=visible_devices)))
    cfg = hfcache.config(model, env, hint=f"download it once: '{prefix}/venv/bin/hf' download {model}")
    block = block_size(cfg, model)
    shapes = weight_shapes(cfg, tp)
    kernels = tuner_dir(prefix, receipt, cache_dir, ui)

    kept = prefix / "tuned" / RECEIPT_KEY
    out = kept / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    spec = {"script": str(kernels / SCRIPT.name), "shapes": shapes, "tp": tp, "block": list(block),
            "out_dtype": OUT_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), "bfloat16"),
            "batch_size": batch_size, "save_path": str(out)}
    env["PYTHONPATH"] = str(kernels)
    if ui is not None:
        ui.step(f"tuning {len(shapes)} block-FP8 GEMM shapes of {model} with vLLM's {SCRIPT.name} "
                f"(this takes a while; log: {state.logs_dir(prefix) / 'tune.log'})")
    state.logs_dir(prefix).mkdir(parents=True, exist_ok=True)
    proc.run([str(python), "-c", DRIVER, json.dumps(spec)], env=env, cwd=kernels,
             log=state.logs_dir(prefix) / "tune.log", what="vLLM FP8 GEMM tuning",
             on_line=(ui.detail if ui is not None else None))
    return install_configs(prefix, model, shapes, out, tp=tp)


def install_configs(prefix: Path, model: str, shapes: list[tuple[int, int]], out: Path, *,
                    tp: int) -> TuneResult:
    """Copy the tuner's files to vLLM's configs folder in the venv and record them."""
    written = sorted(p for p in out.glob("*.json") if CONFIG_NAME.fullmatch(p.name))
    if not written:
        raise InstallerError(f"the tuner wrote no config files into {out}",
                             hint=f"see {state.logs_dir(prefix) / 'tune.log'}")
    devices = {CONFIG_NAME.fullmatch(p.name).group(3) for p in written}
    target = site_packages(prefix / "venv") / CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    result = TuneResult(model=model, device_name=", ".join(sorted(devices)), shapes=shapes)
    ours = {f.get("sha256") for f in (((state.read_receipt(prefix) or {}).get("tuned") or {})
                                      .get(RECEIPT_KEY) or {}).get("files", {}).values()}
    for path in written:
        dest = target / path.name
        # a file vLLM shipped (not one an earlier tune wrote) is kept beside the new ones
        shipped = dest.is_file() and sha256_file(dest) not in ours | {sha256_file(path)}
        if shipped:
            (out / "replaced").mkdir(exist_ok=True)
            shutil.copy2(dest, out / "replaced" / path.name)   # vLLM's own file, kept for undo
        tmp = dest.with_name(dest.name + ".rdna4-tmp")
        shutil.copy2(path, tmp)
        tmp.replace(dest)
        result.files[path.name] = {"sha256": sha256_file(path), "installed": str(dest), "kept": str(path)}
    _record(prefix, result, tp)
    return result


def _record(prefix: Path, result: TuneResult, tp: int) -> None:
    receipt = state.read_receipt(prefix) or {}
    tuned = receipt.setdefault("tuned", {})
    entry = tuned.setdefault(RECEIPT_KEY, {"files": {}, "runs": []})
    entry["files"].update(result.files)
    entry["runs"].append({"model": result.model, "tp": tp, "device_name": result.device_name,
                          "shapes": [list(s) for s in result.shapes], "files": sorted(result.files),
                          "script": str(SCRIPT), "finished": state.now()})
    state.write_json_atomic(prefix / state.RECEIPT, receipt)


def restore(prefix: Path) -> list[str]:
    """Copy every recorded config back where vLLM reads it (after vLLM or the venv was rebuilt)."""
    prefix = Path(prefix)
    files = ((((state.read_receipt(prefix) or {}).get("tuned") or {}).get(RECEIPT_KEY) or {}).get("files") or {})
    if not files:
        raise UsageError(f"no tuned configs recorded in {prefix / state.RECEIPT}",
                         hint=f"tune first: rdna4-install tune --prefix '{prefix}' --model MODEL")
    target = site_packages(prefix / "venv") / CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    restored = []
    for name, entry in sorted(files.items()):
        kept = Path(entry.get("kept", ""))
        if not kept.is_file() or sha256_file(kept) != entry.get("sha256"):
            raise InstallerError(f"the kept copy of {name} is missing or changed ({kept})",
                                 hint=f"tune again: rdna4-install tune --prefix '{prefix}' --model MODEL")
        dest = target / name
        if not dest.is_file() or sha256_file(dest) != entry["sha256"]:
            shutil.copy2(kept, dest)
            restored.append(name)
    return restored


def format_result(result: TuneResult) -> str:
    lines = [f"tuned {len(result.files)} block-FP8 GEMM config(s) for {result.model} on {result.device_name}:"]
    lines += [f"  {name}" for name in sorted(result.files)]
    if result.files:
        lines.append(f"installed in {Path(next(iter(result.files.values()))['installed']).parent}")
    return "\n".join(lines)
