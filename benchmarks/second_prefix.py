"""A second prefix with the same pins versus the first: wheel-cache reuse.

Builds the vLLM-shaped fixture (tests/build_fixtures.py) into prefix 1 with a
fixed cost per device compile, then runs the same recipe steps into prefix 2
against the same cache. Passes when prefix 2 is >= 20x faster and runs the
compiler zero times. Usage: uv run --extra test python benchmarks/second_prefix.py [--seconds S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from build_fixtures import (
    compiler_calls,
    fake_rocm,
    make_ctx,
    make_venv,
    triton_like_repo,
    vllm_like_sdist,
)

from installer import builds, sources
from installer.recipes import Source

SPEEDUP = 20.0


def vllm_steps(tmp: Path, prefix: str, rocm: Path, cache: Path, tk: tuple[Path, str],
               sdist: tuple[Path, str], seconds: float) -> float:
    """Time the triton-kernels + vllm recipe actions for one prefix (venv made beforehand)."""
    p = tmp / prefix
    make_venv(p / "venv")
    common = {"prefix": p, "rocm": rocm, "venv": p / "venv", "cache": cache}
    start = time.perf_counter()
    tk_ctx = make_ctx(tmp, "triton-kernels", source=Source(kind="git", url=str(tk[0]), commit=tk[1]), **common)
    sources.fetch_git(tk_ctx, sparse=["python/triton_kernels"])
    ctx = make_ctx(tmp, "vllm", source=Source(kind="url", url=str(sdist[0]), sha256=sdist[1]),
                   version="0.33.0", **common)
    ctx.env["FAKE_COMPILE_SECONDS"] = str(seconds)
    sources.fetch_sdist(ctx)
    builds.build_wheel(ctx, kind="vllm", triton_kernels=str(tk_ctx.src_dir / "python/triton_kernels/triton_kernels"))
    builds.install_wheel(ctx)
    builds.check_code_objects(ctx, required=["vllm/_C*.so", "vllm/_rocm_C*.so"], scan="vllm")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="fixed cost per device compile")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rdna4-bench-") as tmpdir:
        tmp = Path(tmpdir)
        rocm = fake_rocm(tmp / "rocm")
        tk = triton_like_repo(tmp / "up" / "triton")
        archive = vllm_like_sdist(tmp / "up")
        sdist = (archive, hashlib.sha256(archive.read_bytes()).hexdigest())
        first = vllm_steps(tmp, "p1", rocm, tmp / "cache", tk, sdist, args.seconds)
        calls = len(compiler_calls(rocm))
        second = vllm_steps(tmp, "p2", rocm, tmp / "cache", tk, sdist, args.seconds)
        extra_calls = len(compiler_calls(rocm)) - calls
    result = {"first_prefix_s": round(first, 3), "second_prefix_s": round(second, 3),
              "speedup": round(first / second, 1), "first_compiler_runs": calls,
              "second_compiler_runs": extra_calls, "required_speedup": SPEEDUP}
    ok = first / second >= SPEEDUP and extra_calls == 0
    result["pass"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
