"""A fake `vllm` executable for bench tests: a real HTTP server and a real result file.

`vllm serve` binds the given host/port and answers GET /health (like vLLM 0.33's
entrypoints/serve/instrumentator/health.py), after starting a "worker" child the
way vLLM starts its engine-core process, so tests can check the whole group dies.
`vllm bench serve` checks the server is up and writes the JSON a real run saves.
The mode (ok, never-ready, crash, client-fails) is a file beside the script,
because the installer passes children only an allow-listed environment.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from installer import state

RESULT = {
    "date": "20261127-120000", "backend": "openai", "model_id": "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8",
    "num_prompts": 1000, "request_rate": 10.0, "duration": 512.3, "completed": 998, "failed": 2,
    "request_throughput": 1.95, "output_throughput": 251.37, "total_token_throughput": 2250.5,
    "max_output_tokens_per_s": 331.0, "max_concurrent_requests": 6,
    "mean_ttft_ms": 180012.45, "median_ttft_ms": 179000.0, "mean_tpot_ms": 22.61,
}

FAKE_VLLM = r'''#!{python}
import http.server, json, os, subprocess, sys, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "fake-mode")) as fh:
    MODE = fh.read().strip()
STATE = os.path.join(HERE, "fake-state")
args = sys.argv[1:]


def opt(name):
    return args[args.index(name) + 1]


def record(name, data):
    with open(os.path.join(STATE, name), "w") as fh:
        json.dump(data, fh)


if args[:1] == ["serve"]:
    record("serve.json", {{"argv": args, "env": dict(os.environ)}})
    worker = subprocess.Popen(["sleep", "300"])
    record("pids.json", [os.getpid(), worker.pid])
    print("INFO fake vllm serve starting", flush=True)
    if MODE == "crash":
        print("RuntimeError: HIP error: no ROCm-capable device is detected", flush=True)
        sys.exit(3)
    if MODE == "never-ready":
        print("INFO still loading weights", flush=True)
        time.sleep(600)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer((opt("--host"), int(opt("--port"))), Health).serve_forever()

elif args[:2] == ["bench", "serve"]:
    record("client.json", {{"argv": args}})
    url = "http://%s:%s/health" % (opt("--host"), opt("--port"))
    assert urllib.request.urlopen(url, timeout=5).status == 200
    print("Starting initial single prompt test run...", flush=True)
    if MODE == "client-fails":
        print("ValueError: the server returned 500", flush=True)
        sys.exit(1)
    with open(os.path.join(opt("--result-dir"), opt("--result-filename")), "w") as fh:
        json.dump({result}, fh)
    print("============ Serving Benchmark Result ============", flush=True)
else:
    sys.exit("fake vllm: unexpected arguments %r" % (args,))
'''


def install_fake_vllm(prefix: Path, mode: str = "ok") -> Path:
    """Put the fake `vllm` into PREFIX/venv/bin and write a receipt; returns its state dir."""
    bindir = prefix / "venv" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "vllm"
    exe.write_text(FAKE_VLLM.format(python=sys.executable, result=repr(RESULT)))
    exe.chmod(0o755)
    (bindir / "fake-mode").write_text(mode)
    (bindir / "fake-state").mkdir(exist_ok=True)
    state.write_json_atomic(prefix / state.RECEIPT, {
        "archs": ["gfx1201"], "components": {},
        "pins": {"flash-attention": {"backend": "ck"}}})
    return bindir / "fake-state"


def read_state(state_dir: Path, name: str):
    return json.loads((state_dir / name).read_text())


def alive(pid: int) -> bool:
    """Running and not a zombie (a container's init may never reap killed children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# --- a stand-in for vLLM's block-FP8 GEMM tuner (benchmarks/kernels in the sdist) -----------

# Mimics vLLM 0.33.0's benchmarks/kernels/benchmark_w8a8_block_fp8.py: main(args) tunes
# get_weight_shapes(args.tp_size) (DeepSeek-V3's shapes unless the caller replaced them)
# and writes one config per shape named as save_configs() names it, with the device name
# the card gives (here from a file beside the state dir).
FAKE_TUNER = r'''
import json, os, sys
STATE = {state!r}
with open(os.path.join(STATE, "import.json"), "w") as fh:
    json.dump({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}, fh)

def get_weight_shapes(tp_size):
    return [(7168, 16384), (2112, 7168)]   # DeepSeek-V3's: must never be what runs

def main(args):
    shapes = get_weight_shapes(args.tp_size)
    with open(os.path.join(STATE, "main.json"), "w") as fh:
        json.dump({{"args": vars(args), "shapes": shapes}}, fh)
    device = open(os.path.join(STATE, "device")).read().strip()
    os.makedirs(args.save_path, exist_ok=True)
    for n, k in shapes:
        name = "N=%d,K=%d,device_name=%s,dtype=%s_w8a8,block_shape=[%d,%d].json" % (
            n, k, device, args.input_type, args.block_n, args.block_k)
        with open(os.path.join(args.save_path, name), "w") as fh:
            json.dump({{"1": {{"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": n % 7, "num_warps": 4}}}}, fh)
'''

# a Qwen3-shaped block-FP8 decoder config
BLOCK_FP8_CONFIG = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size": 3072, "num_hidden_layers": 28, "torch_dtype": "bfloat16",
                    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


def install_fake_tuner(prefix: Path, work: Path, device: str = "AMD_Radeon_R9700") -> tuple[Path, Path]:
    """A prefix whose venv python runs this interpreter and whose receipt names a vLLM sdist
    (a local tarball with the fake tuner); returns (state dir, sdist tarball)."""
    import tarfile

    st = install_fake_vllm(prefix)
    st.joinpath("device").write_text(device)
    python = prefix / "venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (prefix / "venv" / "lib" / "python3.12" / "site-packages" / "vllm").mkdir(parents=True)
    tree = work / "sdist" / "vllm-0.33.0"
    kernels = tree / "benchmarks" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "benchmark_w8a8_block_fp8.py").write_text(FAKE_TUNER.format(state=str(st)))
    (tree / "vllm").mkdir()
    (tree / "vllm" / "__init__.py").write_text("")
    archive = work / "vllm-0.33.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="vllm-0.33.0")
    import hashlib

    receipt = state.read_receipt(prefix)
    receipt["pins"]["vllm"] = {"version": "0.33.0", "sdist_url": str(archive),
                               "sdist_sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    state.write_json_atomic(prefix / state.RECEIPT, receipt)
    return st, archive


def cache_model(hub: Path, name: str, config: dict, weights: int = 0) -> Path:
    """A model in a fake Hugging Face cache (models--ORG--NAME/snapshots/REV + refs/main)."""
    repo = hub / ("models--" + name.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    if weights:
        with open(snap / "model.safetensors", "wb") as fh:
            fh.truncate(weights)        # sparse: its size is what counts
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snap
