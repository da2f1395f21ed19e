"""End to end through mirrors (issue 14): the loopback stand-ins are served under other
paths than upstream's, the pins keep every upstream URL, and one mirror file finds
them all. Then `mirror create` copies everything into a directory that installs a
second prefix with the network gone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from build_fixtures import compiler_calls
from e2e_fixtures import REPO, build_world, leftovers, receipt_core
from index_fixtures import request_log

pytestmark = [pytest.mark.network, pytest.mark.slow]

DEAD = "http://127.0.0.1:9"
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with build_world(tmp_path_factory.mktemp("world")) as w:
        yield w


def cli(env: dict, home, *args: str) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "installer", *args], env=env, capture_output=True,
                          text=True, timeout=900, cwd=home)


def modulo_paths(prefix, cache) -> dict:
    text = json.dumps(receipt_core(prefix))
    return json.loads(text.replace(str(cache), "{cache}").replace(str(prefix), "{prefix}"))


def served(world) -> int:
    return len(world.http.log) + len(request_log(world.index_url))


def test_one_mirror_file_replaces_every_url_override_then_a_mirror_directory_installs_offline(
        world, tmp_path):
    home = tmp_path / "home"   # conftest made it
    env = world.mirror_env(home)
    env["RDNA4_NO_CHECKS"] = "1"
    gpu = ["--gpu-arch", "gfx1201"]
    first = tmp_path / "first"

    # plan -v names each upstream URL and where the mirror reads it from
    plan = cli(env, home, "plan", "-v", "--prefix", str(first), *gpu)
    assert plan.returncode == 0, plan.stderr
    sdist = world.rewrite[next(k for k in world.rewrite if k.endswith(".tar.gz"))]
    assert re.search(r"pin vllm\.sdist_url = https://files\.pythonhosted\.org/\S+  \(via "
                     + re.escape(sdist) + r"\)", plan.stdout), plan.stdout
    assert re.search(r"source url = https://github\.com/Dao-AILab/flash-attention\.git  \(via /", plan.stdout)
    assert "pin therock.url = https://stable.repo.amd.com/rocm/core/tarball/therock-dist" in plan.stdout

    before = served(world)
    result = cli(env, home, "install", "--prefix", str(first), *gpu)
    assert result.returncode == 0, result.stderr[-3000:]
    assert served(world) > before, "the stand-ins served the install"
    receipt = json.loads((first / "rdna4-manifest.json").read_text())
    # the receipt names upstream, never the mirror
    assert "127.0.0.1" not in json.dumps(receipt["pins"]) + json.dumps(receipt["components"])
    assert receipt["components"]["therock"]["facts"]["url"].startswith("https://stable.repo.amd.com/")
    fa = receipt["components"]["flash-attention"]["facts"]["source"]
    assert fa["url"] == "https://github.com/Dao-AILab/flash-attention.git"
    assert set(fa["submodules"]) == {"csrc/composable_kernel"}   # the CK build fetches no aiter

    # everything the plan reads, copied into a directory in the mirror layout
    mirror_dir = tmp_path / "usb" / "rdna4-mirror"
    # fed by the lock of the first install, as a lab's online machine would do
    stack = tmp_path / "stack.lock"
    locked = cli(env, home, "lock", "--from-receipt", str(first), "-o", str(stack))
    assert locked.returncode == 0, locked.stderr[-3000:]
    lock_env = {k: v for k, v in env.items() if k != "RDNA4_PINS"}   # the lock holds the pins
    made = cli(lock_env, home, "mirror", "create", str(mirror_dir), "--lock", str(stack),
               "--prefix", str(tmp_path / "unused"))
    assert made.returncode == 0, made.stderr[-3000:]
    mirror_file = mirror_dir / "mirror.toml"
    assert f"--mirror '{mirror_file}'" in made.stderr
    assert list(mirror_dir.glob("files/*/therock-dist-linux-gfx120X-all-10.1.0.tar.gz"))
    assert (mirror_dir / "git" / "github.com" / "Dao-AILab" / "composable_kernel").is_dir()
    assert list(mirror_dir.glob("index/torch/torch-*.whl")) and (mirror_dir / "index/torch/index.html").is_file()
    assert list(mirror_dir.glob("index/setuptools/*")), "PyPI build requirements are mirrored too"
    rules = mirror_file.read_text()
    assert "127.0.0.1" not in rules and str(mirror_dir) not in rules, "relative, so the directory can move"

    # moved to another disk, on a machine with no network: a fresh cache and uv cache,
    # every proxy at a dead port, the stand-ins asked nothing
    moved = tmp_path / "nfs" / "mirror"
    mirror_dir.rename(tmp_path / "nfs-mirror")
    moved.parent.mkdir()
    (tmp_path / "nfs-mirror").rename(moved)
    offline = {**env, "RDNA4_MIRROR": str(moved / "mirror.toml"), "RDNA4_CACHE_DIR": str(tmp_path / "cache2"),
               "UV_CACHE_DIR": str(tmp_path / "uv-cache2"), "NO_PROXY": "", "no_proxy": "",
               **{k: DEAD for k in PROXIES}}
    second = tmp_path / "second"
    before = served(world)
    result = cli(offline, home, "install", "--prefix", str(second), *gpu)
    assert result.returncode == 0, result.stderr[-3000:]
    assert served(world) == before, "the directory mirror served everything"
    assert compiler_calls(second / "rocm"), "a mirror carries sources: the builds ran"
    # where the bytes came from is part of neither the fingerprints nor the receipt
    assert modulo_paths(second, tmp_path / "cache2") == modulo_paths(first, world.root / "cache")
    assert leftovers(second, tmp_path / "cache2") == []

    # and a rerun through the other mirror has nothing to do
    again = cli(env, home, "install", "--prefix", str(second), *gpu)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-2000:]


def test_a_bad_mirror_file_is_one_line(world, tmp_path):
    home = tmp_path / "home"   # conftest made it
    env = world.mirror_env(home)
    bad = tmp_path / "bad.toml"
    bad.write_text('[rewrite]\n"https://github.com/" = "http://mirror.example/git/"\n')
    result = cli(env, home, "plan", "--gpu-arch", "gfx1201", "--mirror", str(bad))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "refusing" in lines[0] and str(bad) in lines[0], lines
    assert lines[1].startswith("hint: ") and "https" in lines[1] and "Traceback" not in result.stderr
