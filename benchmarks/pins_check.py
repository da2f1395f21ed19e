"""`rdna4-install pins check` on the default plan against loopback stand-ins, beside the
same number of plain `curl -I` requests to the same servers, in one run.

Targets: pins check <= 2x the curl requests' time and < 3 s wall, peak RSS < 80 MB.
The stand-ins are the tests' (tests/upstream_fixtures.py): TheRock listing, AMD-style
wheel index, PyPI-style JSON API, local git repos. The check starts from an empty cache,
so it reads every index page and the torch wheel metadata it needs.

    uv run python benchmarks/pins_check.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from index_fixtures import request_log  # noqa: E402
from upstream_fixtures import upstreams  # noqa: E402


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one run of argv."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv[:6]} failed ({code}): {out}{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    if not shutil.which("curl"):
        raise SystemExit("curl is needed for the side-by-side comparison")
    with tempfile.TemporaryDirectory() as tmp, upstreams(Path(tmp) / "up") as ups:
        pins = ups.write_pins(Path(tmp) / "pins.toml")
        env = dict(os.environ, PYTHONPATH=str(REPO), RDNA4_SYSFS_ROOT=tmp, HOME=tmp)
        logs = (ups.http.log, request_log(ups.index_url), request_log(ups.pypi_url))
        before = sum(len(x) for x in logs)
        cmd = [sys.executable, "-m", "installer", "pins", "check", "--pins", str(pins),
               "--gpu-arch", "gfx1201", "--cache-dir", str(Path(tmp) / "cache"),
               "--prefix", str(Path(tmp) / "prefix")]
        wall, rss, out = measure(cmd, env)
        assert "9 of 9 artifacts present" in out, out
        # HTTP requests it made, plus one per git source (ls-remote)
        requests = sum(len(x) for x in logs) - before + 2
        target = ups.therock_url + "therock-dist-linux-gfx120X-all-10.1.0.tar.gz"
        start = time.perf_counter()
        for _ in range(requests):
            subprocess.run(["curl", "-sfI", "--noproxy", "*", target], check=True, stdout=subprocess.DEVNULL)
        curl = time.perf_counter() - start
        # the floor under any command: interpreter start + the CLI's and requests' imports
        floor, floor_rss, _ = measure([sys.executable, "-c", "import installer.cli, requests"], env)
    print(f"{'':<34}{'wall':>9}{'peak RSS':>11}")
    print(f"{f'{requests} x curl -I':<34}{curl * 1000:>6.0f} ms")
    print(f"{'import floor (cli + requests)':<34}{floor * 1000:>6.0f} ms{floor_rss:>8.1f} MB")
    print(f"{'pins check (default plan)':<34}{wall * 1000:>6.0f} ms{rss:>8.1f} MB")
    ok = wall <= 2 * curl and wall < 3 and rss < 80
    print(f"targets (<= 2x curl, < 3 s, < 80 MB): {'met' if ok else 'NOT met'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
