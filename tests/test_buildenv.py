"""The arch-pinned build env and the memory-aware job count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from build_fixtures import fake_rocm

from installer import buildenv
from installer.errors import InstallerError

GIB = 1024 ** 3


@pytest.fixture
def rocm(tmp_path: Path) -> Path:
    return fake_rocm(tmp_path / "rocm")


@pytest.mark.parametrize("archs", [("gfx1201",), ("gfx1200", "gfx1201")])
def test_one_arch_list_feeds_every_arch_knob(rocm, tmp_path, archs):
    env = buildenv.build_env({"PATH": "/usr/bin"}, archs, rocm=rocm, kind="vllm", jobs=3, venv=tmp_path / "v")
    want = ";".join(archs)
    for key in ("PYTORCH_ROCM_ARCH", "GPU_ARCHS", "GPU_TARGETS", "AMDGPU_TARGETS"):
        assert env[key] == want
    assert f"-DCMAKE_HIP_ARCHITECTURES={want}" in env["CMAKE_ARGS"].split()
    assert env["CC"] == str(rocm / "lib/llvm/bin/clang") and env["CXX"] == str(rocm / "lib/llvm/bin/clang++")
    assert env["ROCM_PATH"] == env["HIP_PATH"] == str(rocm)
    assert env["HIP_DEVICE_LIB_PATH"] == str(rocm / "lib/llvm/amdgcn/bitcode")
    assert env["VLLM_TARGET_DEVICE"] == "rocm" and env["MAX_JOBS"] == "3"
    assert env["PATH"].split(os.pathsep)[:3] == [str(tmp_path / "v/bin"), str(rocm / "bin"),
                                                 str(rocm / "lib/llvm/bin")]


def test_the_triton_switch_never_reaches_a_flash_attention_build(rocm):
    env = buildenv.build_env({"PATH": "/usr/bin", "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"},
                             ("gfx1201",), rocm=rocm, kind="flash-attention", jobs=1)
    assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in env
    assert env["GPU_ARCHS"] == "gfx1201" and env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert "VLLM_TARGET_DEVICE" not in env


def test_scm_version_is_pretended_only_without_git(rocm, tmp_path):
    sdist, checkout = tmp_path / "sdist", tmp_path / "checkout"
    sdist.mkdir()
    (checkout / ".git").mkdir(parents=True)
    got = {p.name: buildenv.build_env({}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1, src=p, version="0.33.0")
           for p in (sdist, checkout)}
    assert got["sdist"]["SETUPTOOLS_SCM_PRETEND_VERSION"] == "0.33.0"
    assert "SETUPTOOLS_SCM_PRETEND_VERSION" not in got["checkout"]


def test_triton_kernels_dir_and_rust_frontend(rocm, tmp_path):
    cargo_bin = tmp_path / "cargo-home" / "bin"
    cargo_bin.mkdir(parents=True)
    (cargo_bin / "cargo").write_text("#!/bin/sh\n")
    base = {"PATH": f"{cargo_bin}:/usr/bin", "VLLM_REQUIRE_RUST_FRONTEND": "1"}
    off = buildenv.build_env(base, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1, triton_kernels=tmp_path / "tk")
    assert off["TRITON_KERNELS_SRC_DIR"] == str(tmp_path / "tk")
    assert str(cargo_bin) not in off["PATH"].split(os.pathsep)
    assert "VLLM_REQUIRE_RUST_FRONTEND" not in off
    on = buildenv.build_env(base, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1, rust_frontend=True)
    assert str(cargo_bin) in on["PATH"].split(os.pathsep) and on["VLLM_REQUIRE_RUST_FRONTEND"] == "1"


def test_ccache_settings_only_when_ccache_is_installed(rocm, tmp_path):
    bindir = tmp_path / "ccache-bin"
    bindir.mkdir()
    without = buildenv.build_env({"PATH": "/nonexistent"}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1)
    assert "CCACHE_COMPILERCHECK" not in without
    (bindir / "ccache").write_text("#!/bin/sh\n")
    (bindir / "ccache").chmod(0o755)
    env = buildenv.build_env({"PATH": str(bindir)}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1,
                             src=tmp_path / "src", ccache_dir=tmp_path / "cc")
    assert env["CCACHE_COMPILERCHECK"] == "content" and env["CCACHE_BASEDIR"] == str(tmp_path / "src")
    assert env["CCACHE_DIR"] == str(tmp_path / "cc")


def test_classic_rocm_layout_and_missing_toolchain(tmp_path):
    classic = tmp_path / "opt-rocm"
    (classic / "llvm" / "bin").mkdir(parents=True)
    (classic / "llvm" / "bin" / "clang").write_text("")
    (classic / "amdgcn" / "bitcode").mkdir(parents=True)
    tc = buildenv.toolchain(classic)
    assert tc.clang == classic / "llvm/bin/clang" and tc.device_libs == classic / "amdgcn/bitcode"
    with pytest.raises(InstallerError, match="no clang"):
        buildenv.toolchain(tmp_path / "empty")


def test_no_target_is_an_error(rocm):
    with pytest.raises(InstallerError, match="no GPU target"):
        buildenv.build_env({}, (), rocm=rocm, kind="vllm", jobs=1)


@pytest.mark.parametrize("kind,mem_gib,cores,want", [
    ("flash-attention", 64, 32, 12),   # 64 / 5
    ("vllm", 64, 32, 21),              # 64 / 3
    ("vllm", 64, 8, 8),                # capped by cores
    ("flash-attention", 4, 16, 1),     # never below one
])
def test_max_jobs_from_memory(kind, mem_gib, cores, want):
    assert buildenv.max_jobs(kind, mem_bytes=mem_gib * GIB, cores=cores) == want


def test_jobs_override_wins():
    assert buildenv.max_jobs("flash-attention", override=3, mem_bytes=64 * GIB, cores=2) == 3
    # more than two per core, or than memory holds, is capped (issue 12)
    assert buildenv.max_jobs("flash-attention", override=7, mem_bytes=64 * GIB, cores=2) == 4
    assert buildenv.max_jobs("flash-attention", override=7, mem_bytes=10 * GIB, cores=8) == 2


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20971520 kB\n")
    assert buildenv.available_memory(meminfo) == 20 * GIB
    assert buildenv.available_memory(tmp_path / "missing") == 0


def test_vllm_builds_cannot_fetch_content(tmp_path):
    rocm = fake_rocm(tmp_path / "rocm")
    vllm = buildenv.build_env({"PATH": "/usr/bin"}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1)
    fa = buildenv.build_env({"PATH": "/usr/bin"}, ("gfx1201",), rocm=rocm, kind="flash-attention", jobs=1)
    assert "-DFETCHCONTENT_FULLY_DISCONNECTED=ON" in vllm["CMAKE_ARGS"].split()
    assert "FETCHCONTENT" not in fa["CMAKE_ARGS"]
