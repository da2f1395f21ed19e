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
