"""Benchmark: download + unpack of a TheRock-sized .tar.gz against `curl | tar xz`.

    uv run python benchmarks/fetch_unpack.py --size-mb 1024 --runs 3

Builds a fake tree (many small files plus big "libraries", about 2:1
compressible like ROCm), packs it with tar + gzip from inside the tree as
TheRock's build_tarballs.py does, serves it from a loopback server in its own
process, then per run times
  - `curl -s URL | tar xz -C DIR`
  - installer.download.fetch(..., sink=StreamExtract) in a fresh process
    (empty cache), reporting its peak RSS,
and once at the end a cached rerun of fetch() with the server stopped (so any
request would fail). Targets: median ratio <= 1.15, peak RSS <= 150 MB,
cached rerun < 1 s. Not a test: it takes minutes at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = [str(ROOT), str(ROOT / "tests")]   # for the child processes, which import installer and fixtures


def build_tree(root: Path, total: int) -> None:
    """About `total` bytes: 70% in a few big files, 30% in many 4-256 KiB files."""
    rng = random.Random(1)
    word = rng.randbytes(64)

    def content(n: int) -> bytes:
        half = n // 2
        return rng.randbytes(half) + (word * (n // 64 + 1))[: n - half]

    big = int(total * 0.7)
    lib = root / "lib"
    lib.mkdir(parents=True)
    for i in range(8):
        with open(lib / f"librocblas-{i}.so", "wb") as f:
            left = big // 8
            while left > 0:
                n = min(left, 8 << 20)
                f.write(content(n))
                left -= n
    small = total - big
    i = 0
    while small > 0:
        n = rng.randint(4 << 10, 256 << 10)
        d = root / "share" / f"kernels{i % 64}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"k{i}.co").write_bytes(content(n))
        small -= n
        i += 1
    for d in ("bin", "lib/llvm/bin", "lib/llvm/amdgcn/bitcode", "share/amd_smi"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("bin/rocminfo", "bin/amd-smi", "lib/llvm/bin/clang"):
        (root / f).write_text("#!/bin/sh\necho fake\n")
        os.chmod(root / f, 0o755)
    os.symlink("lib/llvm", root / "llvm")


def make_tarball(work: Path, size_mb: int) -> Path:
    tree = work / "tree"
    out = work / "srv" / "therock-dist-linux-gfx120X-all-10.1.0.tar.gz"
    out.parent.mkdir(parents=True)
    build_tree(tree, size_mb * 2 << 20)   # ~2:1 compression -> ~size_mb on the wire
    subprocess.run(["tar", "-I", "gzip -1", "-cf", str(out), "."], cwd=tree, check=True)
    shutil.rmtree(tree)
    return out


SERVER = """
import sys
sys.path[:0] = {paths!r}
from pathlib import Path
from therock_fixtures import serve
with serve(Path(sys.argv[1])) as srv:
    print(srv.url, flush=True)
    sys.stdin.read()
"""

CHILD = """
import json, resource, sys, time
sys.path[:0] = {paths!r}
from pathlib import Path
from installer import download, unpack
url, cache, dest, mode = sys.argv[1:5]
t = time.monotonic()
if mode == "cached":
    got = download.fetch(url, cache_dir=Path(cache))
else:
    with unpack.StreamExtract(Path(dest)) as sx:
        got = download.fetch(url, cache_dir=Path(cache), sink=sx.write, accept=sx.finish)
        sx.publish()
print(json.dumps({{"seconds": time.monotonic() - t, "from_cache": got.from_cache,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _tree_summary(root: Path) -> tuple[int, int, str]:
    """File count, total bytes (of regular files) and a hash of the sorted (path, size, mode) list."""
    import hashlib

    rows, total = [], 0
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rows.append(f"{path.relative_to(root)} {st.st_size if path.is_file() else 0} {st.st_mode:o}")
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return len(rows), total, hashlib.sha256("\n".join(rows).encode()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="compressed size, about (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fetch-unpack-", dir=args.workdir))
    try:
        t = time.monotonic()
        tarball = make_tarball(work, args.size_mb)
        size = tarball.stat().st_size
        print(f"tarball {size / 1e6:.0f} MB built in {time.monotonic() - t:.0f}s", flush=True)
        server = subprocess.Popen([sys.executable, "-c", SERVER.format(paths=PATHS), str(tarball.parent)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip() + tarball.name
        ratios, rss, ours_all, curl_all = [], [], [], []
        cache = work / "cache"
        try:
            for run in range(args.runs):
                order = ("curl", "ours") if run % 2 == 0 else ("ours", "curl")
                times, trees = {}, {}
                for which in order:
                    dest = work / f"out-{which}"
                    shutil.rmtree(dest, ignore_errors=True)
                    if which == "curl":
                        dest.mkdir()
                        t = time.monotonic()
                        subprocess.run(["bash", "-c", 'set -o pipefail; curl -sf "$1" | tar xz -C "$2"',
                                        "bench", url, str(dest)], check=True)
                        times[which] = time.monotonic() - t
                    else:
                        shutil.rmtree(cache, ignore_errors=True)
                        t = time.monotonic()
                        out = subprocess.run([sys.executable, "-c", CHILD.format(paths=PATHS),
                                              url, str(cache), str(dest), "fresh"],
                                             check=True, capture_output=True, text=True)
                        times[which] = time.monotonic() - t
                        rss.append(json.loads(out.stdout)["rss_mb"])
                    trees[which] = _tree_summary(dest)
                    shutil.rmtree(dest, ignore_errors=True)
                # both sides must have produced the same tree, or the timing means nothing
                if trees["curl"] != trees["ours"]:
                    raise SystemExit(f"trees differ: curl|tar {trees['curl'][:2]} vs ours {trees['ours'][:2]}")
                ratios.append(times["ours"] / times["curl"])
                ours_all.append(times["ours"])
                curl_all.append(times["curl"])
                print(f"run {run + 1}: curl|tar {times['curl']:.2f}s  fetch+unpack {times['ours']:.2f}s  "
                      f"ratio {ratios[-1]:.3f}  peak RSS {rss[-1]:.0f} MB", flush=True)
        finally:
            server.stdin.close()
            server.wait(timeout=30)
        # the server is gone: a cached rerun that made any request would fail
        out = subprocess.run([sys.executable, "-c", CHILD.format(paths=PATHS),
                              url, str(cache), "-", "cached"], check=True, capture_output=True, text=True)
        cached = json.loads(out.stdout)
        ratio = statistics.median(ratios)
        print(f"size {size / 1e6:.0f} MB; median curl|tar {statistics.median(curl_all):.2f}s, "
              f"fetch+unpack {statistics.median(ours_all):.2f}s")
        print(f"median ratio {ratio:.3f} (target <= 1.15); peak RSS {max(rss):.0f} MB (target <= 150); "
              f"cached rerun {cached['seconds']:.3f}s from_cache={cached['from_cache']} (target < 1 s)")
        ok = ratio <= 1.15 and max(rss) <= 150 and cached["seconds"] < 1 and cached["from_cache"]
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
