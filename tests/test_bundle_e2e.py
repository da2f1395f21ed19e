"""Bundles end to end (issue 14): install a first prefix from the stand-ins, bundle it,
and install a second prefix from the bundle with a fresh cache, every proxy at a dead
port and the stand-in servers stopped. Then damaged and wrong-arch bundles, and a
SIGKILL in the middle of an install from a bundle.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import hintcheck
from build_fixtures import compiler_calls
from e2e_fixtures import REPO, build_world, leftovers, receipt_core
from index_fixtures import request_log

pytestmark = [pytest.mark.network, pytest.mark.slow]

DEAD = "http://127.0.0.1:9"
PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")
GPU = ("--gpu-arch", "gfx1201")


def cli(env: dict, home: Path, *args: str, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "installer", *args], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, timeout=900, cwd=home, stdin=stdin, text=stdin is None)


def modulo_paths(prefix: Path, cache: Path) -> dict:
    text = json.dumps(receipt_core(prefix))
    return json.loads(text.replace(str(cache), "{cache}").replace(str(prefix), "{prefix}"))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(world, first prefix, its cache, the bundle, the environment that made them)."""
    root = tmp_path_factory.mktemp("bundle")
    home = root / "home"
    home.mkdir()
    with build_world(root / "world") as world:
        env = {**world.mirror_env(home), "RDNA4_NO_CHECKS": "1"}
        first = root / "first"
        result = cli(env, home, "install", "--prefix", str(first), *GPU)
        assert result.returncode == 0, result.stderr[-3000:]
        out = root / "stack.bundle"
        packed = cli(env, home, "bundle", "--prefix", str(first), "-o", str(out))
        assert packed.returncode == 0, packed.stderr[-3000:]
        yield world, first, world.root / "cache", out, env, home


def compiles(rocm: Path) -> list[dict]:
    """Compiler runs, not counting `clang --version` probes."""
    return [c for c in compiler_calls(rocm) if c["argv"][1:] != ["--version"]]


def offline_env(env: dict, tmp_path: Path) -> dict:
    """Another machine: its own caches, no pins/recipes/mirror settings, no network."""
    out = {k: v for k, v in env.items() if k not in ("RDNA4_PINS", "RDNA4_RECIPES_DIR", "RDNA4_MIRROR")}
    out.update(RDNA4_CACHE_DIR=str(tmp_path / "cache"), UV_CACHE_DIR=str(tmp_path / "uv-cache"),
               NO_PROXY="", no_proxy="", **{k: DEAD for k in PROXIES})
    return out


def test_bundle_installs_a_second_prefix_offline_with_no_compiler(made, tmp_path):
    world, first, cache, bundle, env, home = made
    manifest = _members(bundle)[0]
    names = set(manifest["members"])
    assert manifest["archs"] == ["gfx1201"] and manifest["compression"] in ("gzip", "zstd")
    assert manifest["target"] == "rdna4"
    assert any(n.startswith("mirror/files/") and "therock-dist" in n for n in names), "toolchain tarball"
    assert any(n.startswith("wheels/vllm/") and n.endswith(".whl") for n in names), "built vLLM wheel"
    assert any(n.startswith("wheels/flash-attention/") and n.endswith(".whl") for n in names)
    assert any(n.startswith("mirror/index/torch/") for n in names), "torch stack wheels"
    assert any(n.startswith("mirror/index/setuptools/") for n in names), "dependencies from PyPI"
    assert "receipt.json" in names and "patches/vllm/0001-test.patch" in names
    assert manifest["installer_wheel"] and f"installer/{manifest['installer_wheel']}" in names

    # the stand-ins are gone and every proxy is dead: nothing may come from the network
    served = len(request_log(world.index_url))
    world.http.shutdown()
    second = tmp_path / "second"
    q_env = offline_env(env, tmp_path)
    result = cli(q_env, home, "install", "--from-bundle", str(bundle), "--prefix", str(second), *GPU,
                 "--no-checks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(request_log(world.index_url)) == served
    assert compiles(first / "rocm"), "the first install compiled"
    assert compiles(second / "rocm") == [], "nothing was compiled"
    assert modulo_paths(second, tmp_path / "cache") == modulo_paths(first, cache)
    assert not (tmp_path / "cache" / "bundles").exists() or not any((tmp_path / "cache" / "bundles").iterdir())
    assert leftovers(second, tmp_path / "cache") == []

    shell = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                            f'. "{second}/activate" && python -c "import torch, vllm, flash_attn; '
                            f'print(torch.version.hip)" && echo "A=$PYTORCH_ROCM_ARCH"'],
                           env=q_env, capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and "A=gfx1201" in shell.stdout, shell.stderr
    verify = cli(q_env, home, "verify", "--json", "--prefix", str(second))
    probes = {p["name"]: p["status"] for p in json.loads(verify.stdout)["probes"]}
    assert verify.returncode == 0, verify.stdout
    assert probes["vllm.import"] == "pass" and probes["flash_attn.code-objects"] == "pass"

    # the same bundle again: nothing to do
    again = cli(q_env, home, "install", "--from-bundle", str(bundle), "--prefix", str(second), *GPU,
                "--no-checks")
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr[-2000:]


def _members(bundle: Path) -> tuple[dict, dict[str, bytes]]:
    with tarfile.open(bundle, "r:*") as tf:
        data = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    return json.loads(data["manifest.json"]), data


def _repack(bundle: Path, dest: Path, data: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, blob in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    dest.write_bytes(gzip.compress(buf.getvalue()))
    return dest


@pytest.mark.parametrize("damage", ["flipped-byte", "flipped-byte-compressed", "missing-member",
                                    "extra-member", "wrong-arch"])
def test_a_damaged_or_foreign_bundle_installs_nothing(made, tmp_path, damage):
    _, first, _, bundle, env, home = made
    manifest, data = _members(bundle)
    wheel = next(n for n in data if n.startswith("wheels/vllm/") and n.endswith(".whl"))
    bad = tmp_path / "bad.bundle"
    gpu = GPU
    if damage == "flipped-byte":
        blob = bytearray(data[wheel])
        blob[len(blob) // 2] ^= 0x01
        _repack(bundle, bad, {**data, wheel: bytes(blob)})
    elif damage == "flipped-byte-compressed":
        raw = bytearray(bundle.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        bad.write_bytes(raw)
    elif damage == "missing-member":
        _repack(bundle, bad, {k: v for k, v in data.items() if k != wheel})
    elif damage == "extra-member":
        _repack(bundle, bad, {**data, "mirror/index/evil/evil-1.0-py3-none-any.whl": b"PK not listed"})
    else:
        bad.write_bytes(bundle.read_bytes())
        gpu = ("--gpu-arch", "gfx1200")
    prefix = tmp_path / "q"
    q_env = offline_env(env, tmp_path)
    result = cli(q_env, home, "install", "--from-bundle", str(bad), "--prefix", str(prefix), *gpu,
                 "--no-checks")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "nothing was installed" in errors[0]
    if damage == "wrong-arch":
        assert "built for target rdna4 (gfx1201)" in errors[0] and "targets gfx1200" in errors[0]
    assert not prefix.exists(), "the prefix was not even created"
    bundles = tmp_path / "cache" / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir()), "nothing was left in the cache"
    if damage == "flipped-byte":
        # the hint's other way out, run on the source machine: a fresh bundle
        again = tmp_path / "again.bundle"
        argv = hintcheck.hint_argv(result.stderr, fill={"PREFIX": str(first), "FILE": str(again)})
        rebuilt = cli(env, home, *argv)
        assert rebuilt.returncode == 0 and again.is_file(), rebuilt.stderr[-2000:]


def _kill_when(argv: list[str], env: dict, home: Path, stdin_file: Path, ready) -> None:
    with open(stdin_file, "rb") as stdin:
        p = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(REPO)}, cwd=home, stdin=stdin,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while not ready():
            assert p.poll() is None, "the install ended before the kill point"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_sigkill_during_an_install_from_a_bundle_then_rerun(made, tmp_path):
    _, first, cache, bundle, env, home = made
    prefix = tmp_path / "q"
    q_env = offline_env(env, tmp_path)
    argv = [sys.executable, "-m", "installer", "install", "--from-bundle", "-", "--prefix", str(prefix),
            *GPU, "--no-checks"]
    bundles = tmp_path / "cache" / "bundles"
    # once while the bundle is being unpacked, once while the stack installs
    _kill_when(argv, q_env, home, bundle, lambda: bundles.is_dir() and any(bundles.glob(".*.tmp-*")))
    assert not prefix.exists()
    _kill_when(argv, q_env, home, bundle,
               lambda: (prefix / ".rdna4" / "state" / "therock.json").exists()
               and '"done"' in (prefix / ".rdna4" / "state" / "therock.json").read_text())
    with open(bundle, "rb") as stdin:
        result = cli(q_env, home, "install", "--from-bundle", "-", "--prefix", str(prefix), *GPU,
                     "--no-checks", stdin=stdin)
    assert result.returncode == 0, result.stderr[-3000:].decode()
    assert modulo_paths(prefix, tmp_path / "cache") == modulo_paths(first, cache)
    assert compiles(prefix / "rocm") == []
    assert leftovers(prefix, tmp_path / "cache") == []


def test_bundle_refuses_what_would_not_install_the_same(made, tmp_path):
    _, first, _, bundle, env, home = made

    def one_line(result, code, *words):
        assert result.returncode == code, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        for word in words:
            assert word in result.stderr, (word, result.stderr)

    # other recipes than the prefix was installed with would give other fingerprints
    other = cli(env, home, "bundle", "--prefix", str(first), "--recipes-dir", str(REPO / "recipes"),
                "-o", str(tmp_path / "x.bundle"))
    one_line(other, 1, "was not installed from these recipes", "vllm (patches changed", "--recipes-dir")
    assert not (tmp_path / "x.bundle").exists()
    nothing = cli(env, home, "bundle", "--prefix", str(tmp_path / "empty"), "-o", str(tmp_path / "y.bundle"))
    one_line(nothing, 1, "has no finished install", "rdna4-install install --prefix")
    # a bundle installs exactly what it holds
    changed = cli(offline_env(env, tmp_path), home, "install", "--from-bundle", str(bundle), "--prefix",
                  str(tmp_path / "q"), *GPU, "--set", "vllm.version=0.34.0")
    one_line(changed, 2, "drop --set")
    assert not (tmp_path / "q").exists()


def test_a_bundle_streams_to_stdout(made, tmp_path):
    _, first, _, bundle, env, home = made
    streamed = subprocess.run([sys.executable, "-m", "installer", "bundle", "--prefix", str(first), "-o", "-"],
                              env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=600, cwd=home)
    assert streamed.returncode == 0, streamed.stderr[-2000:].decode()
    (tmp_path / "s.bundle").write_bytes(streamed.stdout)
    got, want = _members(tmp_path / "s.bundle")[0], _members(bundle)[0]
    # the same content (the installer wheel is rebuilt, so it is compared by name only)
    same = {k: v for k, v in got["members"].items() if not k.startswith("installer/")}
    assert same == {k: v for k, v in want["members"].items() if not k.startswith("installer/")}
    assert {k for k in got["members"] if k.startswith("installer/")} == \
        {k for k in want["members"] if k.startswith("installer/")}
