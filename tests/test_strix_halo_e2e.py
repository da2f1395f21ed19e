"""A Strix Halo install end to end against the loopback stand-ins (issue 16): detection
proposes strix-halo on a fake Strix Halo sysfs tree, and the whole stack is built for
gfx1151 only, from the gfx1151 toolchain tarball, with the patches the profile applies.
The RDNA4 path is the rest of the e2e suite, unchanged."""

from __future__ import annotations

import json
import subprocess

import pytest
from build_fixtures import compiler_calls
from detect_fixtures import strix_halo_host
from e2e_fixtures import REPO, ROCM, VLLM_PATCH, build_world

pytestmark = [pytest.mark.network, pytest.mark.slow]

# named like the real RDNA4-only patch, and broken: applying it would fail the build
NOT_FOR_STRIX = "0001-rdna4-fp8-no-rowwise-scaled-mm.patch"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with build_world(tmp_path_factory.mktemp("world"), archs=("gfx1151",), family="gfx1151") as w:
        (w.recipes.parent / "patches" / "vllm" / NOT_FOR_STRIX).write_text(
            VLLM_PATCH.replace("x + {value}", "x + 9").replace("x + 0", "x - 99"))
        yield w


def run(world, home, sysfs, *args, timeout=900):
    import sys

    env = world.env(home)
    env.update(PYTHONPATH=str(REPO), RDNA4_SYSFS_ROOT=str(sysfs))
    return subprocess.run([sys.executable, "-m", "installer", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=home)


def test_strix_halo_is_detected_and_built_for_gfx1151_only(world, tmp_path):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    sysfs = strix_halo_host(tmp_path / "sysfs")
    prefix = tmp_path / "halo"
    first = run(world, home, sysfs, "install", "--prefix", str(prefix), "--no-checks")
    assert first.returncode == 0, first.stderr[-4000:]

    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    assert (receipt["target"], receipt["archs"]) == ("strix-halo", ["gfx1151"])
    # the gfx1151 tarball, by its group name
    got = [r["path"] for r in world.http.log if "therock-dist-linux-" in r["path"] and r["method"] == "GET"]
    assert got and all(p.endswith(f"therock-dist-linux-gfx1151-{ROCM}.tar.gz") for p in got), got
    assert receipt["components"]["therock"]["facts"]["version"] == ROCM
    # every device compile and every build variable names gfx1151 and nothing else
    calls = compiler_calls(prefix / "rocm")
    device = [c for c in calls if any(a.startswith("--offload-arch=") for a in c["argv"])]
    assert device and all([a for a in c["argv"] if a.startswith("--offload-arch=")]
                          == ["--offload-arch=gfx1151"] for c in device)
    assert {c["env"]["GPU_ARCHS"] for c in device if c["env"]["GPU_ARCHS"]} == {"gfx1151"}
    assert {c["env"]["PYTORCH_ROCM_ARCH"] for c in device if c["env"]["PYTORCH_ROCM_ARCH"]} == {"gfx1151"}
    comps = receipt["components"]
    for name in ("vllm", "flash-attention"):
        objects = comps[name]["facts"]["code_objects"]
        assert objects and all(archs == ["gfx1151"] for archs in objects.values()), name
    # the profile's device extra: TheRock's gfx1151 device wheels are what the venv holds
    listed = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c",
                             "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in "
                             "m.distributions() if 'device' in d.metadata['Name']))"],
                            capture_output=True, text=True, cwd=home)
    assert listed.stdout.strip() == "['amd-torch-device-gfx1151', 'rocm-sdk-device-gfx1151']", listed
    # the RDNA4-only patch was left out (applied, it would have broken the build)
    assert list(comps["vllm"]["patches"]) == ["0001-test.patch"]

    # one prefix holds one target: rdna4 here is refused, and the hint's command works
    other = run(world, home, sysfs, "install", "--prefix", str(prefix), "--no-checks", "--target", "rdna4")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    error, hint = other.stderr.strip().splitlines()[-2:]
    assert error == f"error: {prefix} holds target strix-halo; this run chose rdna4 (one prefix holds one target)"
    cmd = hint.removeprefix("hint: ").split(" (or ")[0].split()
    assert cmd[:3] == ["rdna4-install", "install", "--prefix"]
    again = run(world, home, sysfs, *[a.strip("'") for a in cmd[1:]], "--no-checks")
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-3000:]

    # the lock of this prefix records its target
    lock = tmp_path / "halo.lock"
    made = run(world, home, sysfs, "lock", "--from-receipt", str(prefix), "-o", str(lock))
    assert made.returncode == 0, made.stderr
    assert 'target = "strix-halo"' in lock.read_text() and 'archs = ["gfx1151"]' in lock.read_text()
