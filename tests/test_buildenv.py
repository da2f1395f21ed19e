"""The arch-pinned build env and the memory-aware job count."""

from __future__ import annotations

import os
import shutil
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
    # host code from the system compiler, device code from the toolchain (upstream's split)
    assert (env["CC"], env["CXX"]) == (shutil.which("cc"), shutil.which("c++"))
    assert env["HIP_CLANG_PATH"] == str(rocm / "lib/llvm/bin")
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
    without = buildenv.build_env({"PATH": "/nonexistent"}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1,
                                 host_compiler="toolchain")
    assert "CCACHE_COMPILERCHECK" not in without
    (bindir / "ccache").write_text("#!/bin/sh\n")
    (bindir / "ccache").chmod(0o755)
    env = buildenv.build_env({"PATH": str(bindir)}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1,
                             src=tmp_path / "src", ccache_dir=tmp_path / "cc", host_compiler="toolchain")
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


def fake_compilers(bindir: Path, banner: str) -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    for name in ("cc", "c++"):
        (bindir / name).write_text(f"#!/bin/sh\necho '{banner}'\n")
        (bindir / name).chmod(0o755)
    return bindir


def test_the_pin_switches_host_code_to_the_toolchain_clang(rocm, tmp_path):
    path = str(fake_compilers(tmp_path / "sys", "c++ (Debian 12.2.0-14) 12.2.0"))
    system = buildenv.build_env({"PATH": path}, ("gfx1201",), rocm=rocm, kind="flash-attention", jobs=1)
    tool = buildenv.build_env({"PATH": path}, ("gfx1201",), rocm=rocm, kind="flash-attention", jobs=1,
                              host_compiler="toolchain")
    assert (system["CC"], system["CXX"]) == (f"{path}/cc", f"{path}/c++")
    assert (tool["CC"], tool["CXX"]) == (str(rocm / "lib/llvm/bin/clang"), str(rocm / "lib/llvm/bin/clang++"))
    # device code goes through the toolchain either way
    assert system["HIP_CLANG_PATH"] == tool["HIP_CLANG_PATH"] == str(rocm / "lib/llvm/bin")
    with pytest.raises(InstallerError, match="host_compiler must be one of"):
        buildenv.build_env({"PATH": path}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1, host_compiler="gcc")


@pytest.mark.parametrize("banner, problem", [
    ("g++ (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0", "older than GCC 11.3"),
    ("c++ (GCC) 11.2.1 20220127 (Red Hat 11.2.1-9)", "older than GCC 11.3"),
    ("c++ (GCC) 11.4.1 20230605 (Red Hat 11.4.1-2)", ""),   # a date follows the version
    ("c++ (Debian 12.2.0-14+deb12u1) 12.2.0", ""),
    ("Ubuntu clang version 18.1.3 (1ubuntu1)", ""),
])
def test_system_compiler_version_gate(rocm, tmp_path, banner, problem):
    path = str(fake_compilers(tmp_path / "sys", banner))
    host = buildenv.system_compiler(path)
    assert host is not None and host.cxx == f"{path}/c++" and host.banner == banner
    assert (problem in buildenv.host_compiler_problem(host)) if problem else not buildenv.host_compiler_problem(host)
    if problem:
        with pytest.raises(InstallerError, match=problem) as err:
            buildenv.build_env({"PATH": path}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1)
        assert "build.host_compiler=toolchain" in err.value.hint
        # the switch is the way out the hint names
        buildenv.build_env({"PATH": path}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1, host_compiler="toolchain")


def test_no_system_compiler_fails_before_the_build(rocm, tmp_path):
    (tmp_path / "empty").mkdir()
    assert buildenv.system_compiler(str(tmp_path / "empty")) is None
    with pytest.raises(InstallerError, match="no system C/C.. compiler"):
        buildenv.build_env({"PATH": str(tmp_path / "empty")}, ("gfx1201",), rocm=rocm, kind="vllm", jobs=1)


@pytest.mark.parametrize("banner, kind, version", [
    ("c++ (Debian 12.2.0-14+deb12u1) 12.2.0", "gcc", (12, 2, 0)),
    ("g++-13 (Ubuntu 13.1.0-8ubuntu1~22.04) 13.1.0", "gcc", (13, 1, 0)),
    ("AMD clang version 22.0.0 (ROCm 10.1.0)", "clang", (22, 0, 0)),
    ("something else 1.0", "", ()),
])
def test_compiler_banners(banner, kind, version):
    assert buildenv.parse_compiler_banner(banner) == (kind, version)
