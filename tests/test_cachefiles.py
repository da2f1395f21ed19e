"""`rdna4-install cache add`: a file downloaded by hand, then --offline finds it."""

from __future__ import annotations

import hashlib
import re

import hintcheck

from installer import download
from installer.cli import cli
from therock_fixtures import make_toolchain_tarball

NAME = "therock-dist-linux-gfx120X-all-10.1.0.tar.gz"


def _only_therock(cache, prefix, *extra):
    return ["install", "--only", "therock", "--gpu-arch", "gfx1201", "--no-checks",
            "--prefix", str(prefix), "--cache-dir", str(cache), *extra]


def test_the_offline_hint_is_a_cache_add_command_that_works(runner, tmp_path, monkeypatch, exact_pins):
    cache, prefix = tmp_path / "cache", tmp_path / "prefix"
    miss = runner.invoke(cli, _only_therock(cache, prefix, "--offline"))
    assert miss.exit_code == 1
    hint = next(line for line in miss.output.splitlines() if line.startswith("hint: "))
    assert re.search(r"run: rdna4-install cache add \S+ --url https://\S+ --cache-dir \S+$", hint), hint
    argv = hintcheck.hint_argv(hint)
    assert argv[:3] == ["cache", "add", NAME]

    # the user downloads the file elsewhere and brings it here, under the name the hint gave
    monkeypatch.chdir(tmp_path)
    make_toolchain_tarball(tmp_path / NAME, "10.1.0")
    added = runner.invoke(cli, argv)
    assert added.exit_code == 0, added.output
    digest = hashlib.sha256((tmp_path / NAME).read_bytes()).hexdigest()
    assert f"sha256 {digest}" in added.output

    done = runner.invoke(cli, _only_therock(cache, prefix, "--offline"))
    assert done.exit_code == 0, done.output
    # --only therock writes no activation script, so there is nothing to activate
    assert "activate with" not in done.output and f"installed therock into {prefix}" in done.output
    assert (prefix / "rocm" / "lib/llvm/bin/clang").exists()


def test_a_file_is_matched_to_the_planned_download_by_name(runner, tmp_path, exact_pins):
    cache = tmp_path / "cache"
    make_toolchain_tarball(tmp_path / NAME, "10.1.0")
    out = runner.invoke(cli, ["cache", "add", str(tmp_path / NAME), "--cache-dir", str(cache)])
    assert out.exit_code == 0, out.output
    url = f"https://stable.repo.amd.com/rocm/core/tarball/{NAME}"
    assert f"cached as {url}" in out.output
    assert download.recorded_sha256(url, cache) == hashlib.sha256((tmp_path / NAME).read_bytes()).hexdigest()

    # a different file under the same URL no longer matches the recorded hash: refused
    other = tmp_path / "other" / NAME
    make_toolchain_tarball(other, "10.1.0", seed=5, pad_bytes=1000)
    again = runner.invoke(cli, ["cache", "add", str(other), "--cache-dir", str(cache)])
    assert again.exit_code == 1 and "sha256 mismatch" in again.output and "recorded" in again.output

    unknown = tmp_path / "something.tar.gz"
    unknown.write_bytes(b"x")
    out = runner.invoke(cli, ["cache", "add", str(unknown), "--cache-dir", str(cache)])
    assert out.exit_code == 2 and "is not a file this install downloads" in out.output
    assert NAME in out.output and "--url URL" in out.output
    # the hint, with the URL the user got the file from: cached under it, hash recorded
    url = "https://example.org/files/something.tar.gz"
    added = runner.invoke(cli, [*hintcheck.hint_argv(out.output, fill={"URL": url}), "--cache-dir", str(cache)])
    assert added.exit_code == 0 and f"cached as {url}" in added.output, added.output
    assert download.recorded_sha256(url, cache) == hashlib.sha256(b"x").hexdigest()


def test_without_gpu_arch_every_target_profiles_tarball_is_known(runner, tmp_path, exact_pins):
    halo = "therock-dist-linux-gfx1151-10.1.0.tar.gz"
    make_toolchain_tarball(tmp_path / halo, "10.1.0")
    out = runner.invoke(cli, ["cache", "add", str(tmp_path / halo), "--cache-dir", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    assert f"cached as https://stable.repo.amd.com/rocm/core/tarball/{halo}" in out.output
    # with --gpu-arch, only that target's files are planned
    out = runner.invoke(cli, ["cache", "add", str(tmp_path / halo), "--cache-dir", str(tmp_path / "d"),
                              "--gpu-arch", "gfx1201"])
    assert out.exit_code == 2 and "is not a file this install downloads" in out.output


def test_a_pinned_hash_is_enforced(runner, tmp_path, exact_pins):
    cache = tmp_path / "cache"
    fake = tmp_path / "vllm-0.33.0.tar.gz"
    fake.write_bytes(b"not the vllm sdist")
    out = runner.invoke(cli, ["cache", "add", str(fake), "--cache-dir", str(cache)])
    assert out.exit_code == 1, out.output
    assert "sha256 mismatch" in out.output and "(pinned)" in out.output
    assert not list((cache / "downloads").glob("*/vllm-0.33.0.tar.gz"))
    assert download.cached_urls(cache) == {}


def test_every_key_plan_v_shows_is_settable_or_marked_derived(runner, tmp_path, exact_pins):
    base = ["plan", "-v", "--gpu-arch", "gfx1201", "--prefix", str(tmp_path / "p")]
    shown = runner.invoke(cli, base)
    assert shown.exit_code == 0, shown.output
    pins = re.findall(r"^\s+pin (\S+) = (.*)$", shown.output, re.M)
    assert ("therock.url" in {k for k, _ in pins})
    for key, value in pins:
        if value.endswith("(derived)"):
            continue
        value = value.removesuffix(" (default)")
        tried = runner.invoke(cli, [*base, "--set", f"{key}={'' if value == '(empty)' else value}"])
        assert tried.exit_code == 0, (key, tried.output)
