"""A no-op rerun of a 6-recipe plan whose steps are all done.

Target: median of 5 runs under 0.5 s wall and 60 MB peak RSS, printed beside
`python -c pass` (the floor no Python CLI can beat).

    uv run python benchmarks/noop_rerun.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from engine_fixtures import six_recipes  # noqa: E402


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of argv."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv} failed ({code}): {proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipes = six_recipes(Path(tmp) / "src")
        prefix = Path(tmp) / "prefix"
        env = dict(os.environ, PYTHONPATH=str(REPO), RDNA4_SYSFS_ROOT=tmp)
        cmd = [sys.executable, "-m", "installer", "-q", "install", "--recipes-dir", str(recipes),
               "--prefix", str(prefix), "--gpu-arch", "gfx1201"]
        measure(cmd, env)  # the real install; everything after is a no-op rerun
        assert (prefix / "order.log").read_text().count("\n") == 6
        rows = {}
        for label, argv in (("python -c pass", [sys.executable, "-c", "pass"]),
                            ("no-op rerun (6 recipes)", cmd)):
            runs = [measure(argv, env) for _ in range(args.runs)]
            rows[label] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
        assert (prefix / "order.log").read_text().count("\n") == 6, "a rerun ran a step"
    print(f"{'':<26}{'median wall':>12}{'peak RSS':>11}")
    for label, (wall, rss) in rows.items():
        print(f"{label:<26}{wall * 1000:>9.0f} ms{rss:>8.1f} MB")
    wall, rss = rows["no-op rerun (6 recipes)"]
    ok = wall < 0.5 and rss < 60
    print(f"target: < 500 ms and < 60 MB -> {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
