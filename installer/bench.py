"""`rdna4-install bench`: serve the reference model and compare with the reference run.

Starts `vllm serve` from the venv on 127.0.0.1 (a free port unless one is
given), waits for GET /health, runs `vllm bench serve` against it, saves the
result under PREFIX/bench/ and compares it with the published RX 9070 XT
figures. The server is always stopped: on success, on failure and on Ctrl-C.

The model and its quantization default to the prefix's target profile's [serving]
bench_model / bench_quantization (recipes/targets/<name>.toml): RDNA4 the reference
FP8 model, Strix Halo (no FP8) a 16-bit one. The RX 9070 XT figures are then still
shown, labelled as a different GPU, model and quantization, for context only.

Names below come from the vLLM 0.33.0 sdist:
- server flags `--host` / `--port`: vllm/entrypoints/common/cli_args.py:293-295
- readiness: `GET /health` answers 200 once the engine is up:
  vllm/entrypoints/serve/instrumentator/health.py:22
- client flags: vllm/benchmarks/serve.py:1661-1662 (--host, --port), 1693 (--model),
  1746 (--request-rate), 1792 (--save-result), 1816 (--result-dir), 1823
  (--result-filename); vllm/benchmarks/datasets/datasets.py:1587 (--num-prompts),
  1593 (--dataset-name, "random" is its default), 1888/1894 (--random-input-len
  1024, --random-output-len 128 by default)
- result keys: vllm/benchmarks/serve.py:1320-1339 (completed, failed,
  request_throughput, output_throughput, max_output_tokens_per_s,
  max_concurrent_requests) and 1426 (mean_<metric>_ms for ttft and tpot)
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import activate, proc, state, targetprofile
from .errors import InstallerError, StepFailed, UsageError, command

REFERENCE_MODEL = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"  # CompressedTensors FP8
REFERENCE_TARGET, REFERENCE_QUANTIZATION = "rdna4", "fp8"
# `vllm serve` flags per [serving] bench_quantization: a quantized checkpoint names its
# method in its config.json (vLLM reads it), so only the 16-bit dtypes are made explicit
# (--dtype: vLLM 0.33.0 vllm/engine/arg_utils.py:977, "auto" otherwise)
QUANT_SERVE_ARGS = {"fp8": (), "awq": (), "gptq": (),
                    "bf16": ("--dtype", "bfloat16"), "fp16": ("--dtype", "float16")}
DEFAULT_REQUEST_RATE = 10.0
# vLLM's own default prompt count (datasets.py:70): at 10 req/s it keeps
# arriving for ~100 s, far past what one card can serve, so the server saturates.
# The exact workload of the reference run is UNCONFIRMED beyond rate 10 and this model.
DEFAULT_NUM_PROMPTS = 1000
DEFAULT_READY_TIMEOUT = 1800.0  # first start compiles Triton kernels and loads 9 GB

# RX 9070 XT (gfx1201), RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8, request rate 10
# (peers.md project 7; vllm_rocm.md §5 "Throughput reference points").
# (label, result key, reference value, unit, reference shown as)
METRICS = (
    ("output throughput", "output_throughput", 248.12, "tok/s", "248.12"),
    ("peak output throughput", "max_output_tokens_per_s", 325.0, "tok/s", "325"),
    ("mean TPOT", "mean_tpot_ms", 22.94, "ms", "22.94"),
    ("mean TTFT", "mean_ttft_ms", 187872.60, "ms", "187,872.60"),
    ("max concurrency", "max_concurrent_requests", None, "requests", "~5-6"),
)


@dataclass
class BenchResult:
    model: str
    result_file: Path
    server_log: Path
    metrics: dict[str, float | None]           # result key -> value (None if absent)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    label: str = "this run"                    # the column title: a profile name, "baseline"
    serve_args: tuple[str, ...] = ()
    target: str = ""                           # the prefix's target profile ("" unknown)
    quantization: str = ""                     # the profile's bench_quantization ("" unknown)


@dataclass(frozen=True)
class Defaults:
    """What `bench` serves on a prefix: from its target profile's [serving] table."""
    model: str
    quantization: str            # "" for a model given with --model (unknown to us)
    serve_args: tuple[str, ...]  # the quantization's `vllm serve` flags
    target: targetprofile.Profile | None


def defaults(prefix: Path, model: str | None = None) -> Defaults:
    """The target profile's bench model and quantization; a --model other than it is served
    as given, without flags."""
    target = targetprofile.of_receipt(state.read_receipt(Path(prefix)) or {})
    serving = target.serving if target is not None else {}
    bench_model = serving.get("bench_model", REFERENCE_MODEL)
    quantization = serving.get("bench_quantization", REFERENCE_QUANTIZATION)
    if model is not None and model != bench_model:
        return Defaults(model, "", (), target)
    return Defaults(bench_model, quantization, QUANT_SERVE_ARGS[quantization], target)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(path: Path, n: int = 30) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


def wait_ready(child: proc.Child, port: int, timeout: float, ui: Any, poll: float = 1.0) -> None:
    """Return once /health answers; raise with the server log's tail if it never does."""
    deadline = time.monotonic() + timeout
    last_note = time.monotonic()
    while True:
        code = child.poll()
        if code is not None:
            if ui is not None:
                ui.tail(_tail(child.log), str(child.log))
            raise InstallerError(f"vllm serve exited with code {code} before it was ready",
                                 hint=f"server log: {child.log}")
        if _healthy(port):
            return
        now = time.monotonic()
        if now >= deadline:
            if ui is not None:
                ui.tail(_tail(child.log), str(child.log))
            raise InstallerError(f"vllm serve was not ready after {timeout:.0f}s",
                                 hint=f"server log: {child.log}; a first start compiles kernels, "
                                      "so try a longer --ready-timeout")
        if ui is not None and now - last_note >= 30:
            last_note = now
            ui.info(f"waiting for vllm serve on port {port} ({now - deadline + timeout:.0f}s)")
        time.sleep(poll)


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def parse_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InstallerError(f"vllm bench serve wrote no result file at {path}",
                             hint="see the client output above") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InstallerError(f"the benchmark result {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InstallerError(f"the benchmark result {path} is not a JSON object")
    return data


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run(prefix: Path, *, model: str | None = None, request_rate: float = DEFAULT_REQUEST_RATE,
        num_prompts: int = DEFAULT_NUM_PROMPTS, port: int | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT, extra_serve_args: list[str] | tuple = (),
        extra_bench_args: list[str] | tuple = (), visible_devices: str = "",
        ui: Any = None, profile: Any = None) -> BenchResult:
    """One served benchmark of `model` (default: the target profile's); `profile`
    (profiles.Profile) puts its server flags first."""
    prefix = Path(prefix)
    vllm = prefix / "venv" / "bin" / "vllm"
    if not vllm.exists():
        raise InstallerError(f"no vllm in {prefix / 'venv'}",
                             hint="install first: " + command(prefix, "install"))
    if request_rate <= 0 or num_prompts <= 0:
        raise UsageError("--request-rate and --num-prompts must be positive")
    env = activate.environment(activate.from_receipt(prefix, visible_devices=visible_devices))
    chosen = defaults(prefix, model)
    model = chosen.model
    out_dir = prefix / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{_slug(model)}" + (f"-{profile.name}" if profile is not None else "")
    extra_serve_args = [*(profile.serve_args if profile is not None else ()), *chosen.serve_args,
                        *extra_serve_args]
    server_log, client_log = out_dir / f"{name}-serve.log", out_dir / f"{name}-client.log"
    result_file = out_dir / f"{name}.json"
    port = port or free_port()

    serve = [vllm, "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra_serve_args]
    client = [vllm, "bench", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", model,
              "--dataset-name", "random", "--num-prompts", str(num_prompts),
              "--request-rate", str(request_rate), "--save-result", "--result-dir", str(out_dir),
              "--result-filename", result_file.name, *extra_bench_args]
    if ui is not None:
        ui.step(f"starting vllm serve {model} on 127.0.0.1:{port} (log: {server_log})")
    child = proc.spawn(serve, env=env, log=server_log, cwd=out_dir)
    try:
        wait_ready(child, port, ready_timeout, ui)
        if ui is not None:
            ui.step(f"vllm bench serve: {num_prompts} prompts at {request_rate:g} req/s")
        try:
            proc.run(client, env=env, cwd=out_dir, log=client_log, what="vllm bench serve",
                     on_line=(ui.detail if ui is not None else None))
        except StepFailed as exc:
            if ui is not None:
                ui.tail(getattr(exc, "tail", []), str(client_log))
            exc.hint = f"client log: {client_log}; server log: {server_log}"
            raise
    finally:
        child.stop()
    raw = parse_result(result_file)
    metrics = {key: _number(raw.get(key)) for _, key, *_ in METRICS}
    return BenchResult(model=model, result_file=result_file, server_log=server_log,
                       metrics=metrics, raw=raw, label=profile.name if profile is not None else "this run",
                       serve_args=tuple(extra_serve_args), quantization=chosen.quantization,
                       target=chosen.target.name if chosen.target is not None else "")


def run_profiles(prefix: Path, names: tuple[str, ...] | list[str], *, model: str | None = None,
                 echo: Any = print, **kwargs: Any) -> list[BenchResult]:
    """One run per named profile (none: one run with vLLM's defaults), one after the other.

    Every profile's `vllm serve` line is printed before the first (long) run starts."""
    if not names:
        return [run(prefix, model=model, **kwargs)]
    from . import profiles

    d = defaults(prefix, model)
    # an uncached 16-bit 8B model weighs twice the reference FP8 one
    assumed = profiles.BF16_8B_WEIGHTS if d.quantization in ("bf16", "fp16") else None
    chosen = [profiles.resolve(name, d.model, target=d.target, assumed_weights=assumed, prefix=prefix)
              for name in names]
    for profile in chosen:
        echo(f"{profile.name}: {profiles.serve_line(prefix, d.model, profile, d.serve_args)}")
        for note in profile.notes:
            echo(f"  {note}")
    return [run(prefix, model=d.model, profile=profile, **kwargs) for profile in chosen]


def load_result(path: Path, label: str = "baseline") -> BenchResult:
    """An earlier run's saved result (PREFIX/bench/*.json), e.g. from before `tune`."""
    raw = parse_result(Path(path))
    return BenchResult(model=str(raw.get("model_id") or REFERENCE_MODEL), result_file=Path(path),
                       server_log=Path(path).with_suffix(".log"),
                       metrics={key: _number(raw.get(key)) for _, key, *_ in METRICS}, raw=raw, label=label)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "requests" else f"{value:,.2f}"


def _reference_note(results: tuple[BenchResult, ...]) -> tuple[str, str]:
    """(the reference column's title, the line saying what it is)."""
    ref = f"RX 9070 XT (gfx1201), {REFERENCE_MODEL}, request rate 10"
    elsewhere = next((r for r in results if r.target and r.target != REFERENCE_TARGET), None)
    if elsewhere is not None:
        what = f"{elsewhere.model}" + (f" in {elsewhere.quantization}" if elsewhere.quantization else "")
        return "rdna4-seed", (f"rdna4-seed: {ref} in {REFERENCE_QUANTIZATION}; shown for context only: "
                              f"a different GPU, model and quantization than this run "
                              f"({elsewhere.target}: {what}), so the figures are not comparable")
    note = f"reference: {ref}"
    other = next((r.model for r in results if r.model != REFERENCE_MODEL), None)
    if other:
        note += f" (this run used {other}, so the figures are not comparable)"
    return "reference", note


def format_comparison(*results: BenchResult) -> str:
    """The runs side by side, then the reference (seed) figures."""
    title, note = _reference_note(results)
    rows = [("metric", *(r.label for r in results), title, "")]
    for label, key, _ref, unit, shown in METRICS:
        rows.append((label, *(_fmt(r.metrics.get(key), unit) for r in results), shown, unit))
    cols = len(rows[0]) - 1
    w = [max(len(r[i]) for r in rows) for i in range(cols)]
    lines = ["  ".join([row[0].ljust(w[0]), *(v.rjust(w[i + 1]) for i, v in enumerate(row[1:cols])),
                        row[cols]]).rstrip() for row in rows]
    for r in results:
        done, failed = r.raw.get("completed"), r.raw.get("failed")
        if done is not None:
            who = "" if len(results) == 1 else f"{r.label}: "
            lines.append(f"{who}requests: {done} completed" + (f", {failed} failed" if failed else ""))
    lines += [note] + [f"result saved to {r.result_file}" for r in results if r.label != "baseline"]
    return "\n".join(lines)
