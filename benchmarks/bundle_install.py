"""Install from a bundle versus a cold install from the stand-ins, in one run.

Builds tests/e2e_fixtures.py's world (every upstream on loopback, found through one
mirror file), gives each fake device compile a fixed cost (--seconds, default 20: the
stand-in sources have a handful of device compiles where flash-attention's CK build
alone has hundreds of multi-minute ones, so even then the cold install takes a few
minutes against a real build's 1-2 hours), then:
  1. a cold install into prefix 1 (empty download, wheel and uv caches);
  2. `rdna4-install bundle` of prefix 1;
  3. `install --from-bundle` into prefix 2 with empty caches, every proxy at a dead
     port and the stand-in file server stopped.
Passes when (3) is >= 20x faster than (1) and runs the compiler zero times. Prints
both times, the compiler runs, the bundle size and each run's peak RSS.
Needs PyPI (the build tools come from it, as in a real install).
Usage: uv run --extra test python benchmarks/bundle_install.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from build_fixtures import compiler_calls
from e2e_fixtures import build_world, slow_compiles

SPEEDUP = 20.0
DEAD = "http://127.0.0.1:9"
# run a command and report the peak RSS of its process tree (KiB, Linux)
MEASURE = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[1:])\n"
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(rc)\n")


def timed(env: dict, cwd: Path, *args: str) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of `rdna4-install ARGS`; exits on failure."""
    start = time.perf_counter()
    got = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "installer", *args],
                         env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if got.returncode != 0:
        sys.exit(f"rdna4-install {' '.join(args)} failed:\n{got.stderr[-3000:]}")
    rss = next(int(line.split()[1]) for line in got.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, rss


def compiles(rocm: Path) -> int:
    return len([c for c in compiler_calls(rocm) if c["argv"][1:] != ["--version"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="fixed cost per device compile")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rdna4-bench-") as tmpdir:
        tmp = Path(tmpdir)
        home = tmp / "home"
        home.mkdir()
        with build_world(tmp / "world") as world:
            slow_compiles(world, str(args.seconds))
            env = {**world.mirror_env(home), "RDNA4_NO_CHECKS": "1", "UV_CACHE_DIR": str(tmp / "uv1")}
            gpu = ("--gpu-arch", "gfx1201")
            cold_s, cold_rss = timed(env, home, "install", "--prefix", str(tmp / "p1"), *gpu)
            bundle = tmp / "stack.bundle"
            pack_s, pack_rss = timed(env, home, "bundle", "--prefix", str(tmp / "p1"), "-o", str(bundle))
            world.http.shutdown()
            other = {k: v for k, v in env.items() if k not in ("RDNA4_PINS", "RDNA4_MIRROR", "RDNA4_RECIPES_DIR")}
            other.update(RDNA4_CACHE_DIR=str(tmp / "cache2"), UV_CACHE_DIR=str(tmp / "uv2"), NO_PROXY="",
                         **{k: DEAD for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                              "ALL_PROXY", "all_proxy")})
            warm_s, warm_rss = timed(other, home, "install", "--from-bundle", str(bundle), "--prefix",
                                     str(tmp / "p2"), *gpu)
            result = {
                "cold_install_s": round(cold_s, 2), "bundle_install_s": round(warm_s, 2),
                "speedup": round(cold_s / warm_s, 1), "required_speedup": SPEEDUP,
                "cold_compiler_runs": compiles(tmp / "p1" / "rocm"),
                "bundle_compiler_runs": compiles(tmp / "p2" / "rocm"),
                "bundle_size_mb": round(os.path.getsize(bundle) / 1e6, 2), "bundle_create_s": round(pack_s, 2),
                "peak_rss_mb": {"cold_install": round(cold_rss / 1024, 1), "bundle": round(pack_rss / 1024, 1),
                                "bundle_install": round(warm_rss / 1024, 1)},
                "seconds_per_device_compile": args.seconds,
            }
    result["pass"] = result["speedup"] >= SPEEDUP and result["bundle_compiler_runs"] == 0
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
