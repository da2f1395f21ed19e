"""The arch-pinned build environment: one function of the target arch(s).

Every knob a ROCm build reads to choose its GPU targets is set from the same
arch list, so no build can fall back to "native" (there is no GPU on a build
host, and flash-attention's setup.py raises without one) or to a 9-arch
default that multiplies compile time. Checked against vLLM 0.33.0's setup.py /
cmake/utils.cmake (the PyPI sdist) and Dao-AILab/flash-attention 0251105a's setup.py.

Host and device compilers are split the way upstream's own ROCm builds split
them (docs/pins.md, "Host and device compilers"): host C/C++ from the system
compiler, device code from the toolchain's clang (HIP_CLANG_PATH, read by
hipcc and by CMake's HIP language). The pin build.host_compiler = "toolchain"
makes the toolchain clang the host compiler too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .errors import InstallerError, command

MEMINFO = Path("/proc/meminfo")
GIB = 1024 ** 3

# Peak RAM per compile job. CK template instantiation runs host and device clang
# per job at up to ~5 GB together (a community gfx1201 build guide; about 2.8 GB per
# hipcc job in mjun0812/flash-attention-prebuild-wheels' build_linux_rocm.sh); vLLM's
# hipcc units are lighter (maintainers' 16 GB / MAX_JOBS advice, vllm-project/vllm#3180, #8878).
PER_JOB_GIB = {"flash-attention": 5.0, "vllm": 3.0}
DEFAULT_PER_JOB_GIB = 3.0

# Never in a build env: at build time this makes flash-attention's setup.py skip
# every CK kernel (it selects the Triton backend and builds no extension).
FA_TRITON_SWITCH = "FLASH_ATTENTION_TRITON_AMD_ENABLE"

HOST_COMPILERS = ("system", "toolchain")
# vLLM 0.33.0 CMakeLists.txt:24 refuses GCC < 11.3 (PyTorch's C++20 headers).
MIN_GCC = (11, 3)


def meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """/proc/meminfo as bytes by field name ({} when unreadable)."""
    values = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        number = rest.split()[:1]
        if number and number[0].isdigit():
            values[key.strip()] = int(number[0]) * 1024
    return values


def available_memory(path: Path = MEMINFO) -> int:
    """MemAvailable in bytes (0 when unknown)."""
    return meminfo(path).get("MemAvailable", 0)


def max_jobs(kind: str, *, override: int | None = None, mem_bytes: int | None = None,
             cores: int | None = None) -> int:
    """Parallel compile jobs: RAM / per-job peak, capped by cores; `--jobs` wins.

    An OOM-killed compiler is the usual way these builds fail, so when memory is
    unknown we stay at one job per 3-5 GB of a modest 16 GB rather than nproc.
    """
    if override:
        return min(max(1, int(override)), jobs_cap(kind, mem_bytes=mem_bytes, cores=cores))
    cores = cores or os.cpu_count() or 1
    mem = available_memory() if mem_bytes is None else mem_bytes
    if mem <= 0:
        mem = 16 * GIB
    per_job = PER_JOB_GIB.get(kind, DEFAULT_PER_JOB_GIB)
    return max(1, min(cores, int(mem / GIB // per_job)))


def jobs_cap(kind: str = "vllm", *, mem_bytes: int | None = None, cores: int | None = None) -> int:
    """The most jobs `--jobs` may ask for: two per core, and no more than RAM + swap
    hold at the per-job peak. Beyond that a build only thrashes or is OOM-killed."""
    cores = cores or os.cpu_count() or 1
    if mem_bytes is None:
        info = meminfo()
        mem_bytes = info.get("MemTotal", 0) + info.get("SwapTotal", 0)
    per_job = PER_JOB_GIB.get(kind, DEFAULT_PER_JOB_GIB)
    by_memory = int(mem_bytes / GIB // per_job) if mem_bytes > 0 else cores * 2
    return max(1, min(cores * 2, by_memory))


def capped_jobs(requested: int | None) -> tuple[int | None, str]:
    """`--jobs` as the builds will use it, and the warning when it was capped."""
    cap = jobs_cap()
    if not requested or requested <= cap:
        return requested, ""
    return cap, (f"--jobs {requested} is more than this host can run ({os.cpu_count() or 1} cores, "
                 f"{(meminfo().get('MemTotal', 0)) / GIB:.0f} GiB RAM); using {cap}")


@dataclass(frozen=True)
class Toolchain:
    root: Path
    clang: Path
    clangxx: Path
    device_libs: Path
    bin_dirs: tuple[Path, ...]


def toolchain(rocm: Path) -> Toolchain:
    """Compiler paths in a TheRock tree (lib/llvm) or a classic /opt/rocm (llvm/)."""
    rocm = Path(rocm)
    for llvm in (rocm / "lib" / "llvm", rocm / "llvm"):
        if (llvm / "bin" / "clang").exists():
            break
    else:
        raise InstallerError(f"no clang in the ROCm toolchain at {rocm}",
                             # rocm is PREFIX/rocm for every recipe
                             hint=command(rocm.parent, "run", "therock", "--force"))
    libs = next((p for p in (llvm / "amdgcn" / "bitcode", rocm / "amdgcn" / "bitcode") if p.is_dir()),
                llvm / "amdgcn" / "bitcode")
    return Toolchain(rocm, llvm / "bin" / "clang", llvm / "bin" / "clang++", libs,
                     (rocm / "bin", llvm / "bin"))


@dataclass(frozen=True)
class HostCompiler:
    cc: str
    cxx: str
    kind: str                 # "gcc", "clang" or "" (unknown)
    version: tuple[int, ...]
    banner: str               # first line of `c++ --version`

    @property
    def label(self) -> str:
        return f"{self.banner} ({self.cxx})"


def system_compiler(path: str | None = None) -> HostCompiler | None:
    """The C/C++ compiler a plain `cmake` or torch's cpp_extension would pick (cc / c++)."""
    cc = next(filter(None, (proc.which(n, path=path) for n in ("cc", "gcc", "clang"))), None)
    cxx = next(filter(None, (proc.which(n, path=path) for n in ("c++", "g++", "clang++"))), None)
    if not cc or not cxx:
        return None
    out = proc.capture([cxx, "--version"], env=proc.base_env(), timeout=30)
    banner = (out.stdout.splitlines() or [""])[0].strip() if out.ok else ""
    return HostCompiler(cc, cxx, *parse_compiler_banner(banner), banner or "unknown compiler")


def parse_compiler_banner(banner: str) -> tuple[str, tuple[int, ...]]:
    """("gcc" | "clang" | "", version) from the first line of `--version`.

    GCC: "c++ (Debian 12.2.0-14) 12.2.0 [date] [(vendor)]" (the version follows the first ")");
    clang: "Ubuntu clang version 18.1.3 (1ubuntu1)" (the version follows "version").
    """
    if "clang" in banner.lower():
        m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", banner)
        kind = "clang"
    elif re.match(r"(c\+\+|g\+\+|gcc|cc)(-\d+)?(\s|$)", banner) or "GCC" in banner:
        m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", banner.split(")", 1)[-1])
        kind = "gcc"
    else:
        return "", ()
    return kind, tuple(int(x) for x in m.groups() if x is not None) if m else ()


def host_compiler_problem(host: HostCompiler | None) -> str:
    """Why this host compiler cannot build vLLM ("" when it can)."""
    if host is None:
        return "no system C/C++ compiler (cc and c++) on PATH"
    if host.kind == "gcc" and host.version and host.version[:2] < MIN_GCC:
        return (f"{host.banner} is older than GCC {MIN_GCC[0]}.{MIN_GCC[1]}, "
                "which vLLM 0.33.0's CMakeLists.txt requires")
    return ""


HOST_COMPILER_HINT = ("install g++ >= 11.3 from your distribution, or build host code with the "
                      "toolchain's clang: rdna4-install install --set build.host_compiler=toolchain")


def hipcc_shim(tc: Toolchain, dest: Path) -> Path:
    """A ROCM_HOME for a tree without bin/hipcc, whose bin/hipcc calls the replacement.

    torch's cpp_extension compiles .hip files with ROCM_HOME/bin/hipcc, so
    flash-attention's CK build needs that path. TheRock's hipcc_deprecation.md
    (ROCm/TheRock 46b7fafa) names amdclang++ with --hip-path and
    --hip-device-lib-path as the replacement; the shim is exactly that, in a
    tree that links every other entry of the real root.
    """
    root, dest = Path(tc.root), Path(dest)
    replacement = next((p for p in (root / "bin" / "amdclang++", tc.clangxx) if p.is_file()), tc.clangxx)
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    for folder, target in ((dest, root), (dest / "bin", root / "bin")):
        for entry in (target.iterdir() if target.is_dir() else ()):
            link = folder / entry.name
            if folder == dest and entry.name == "bin" or link.name == "hipcc":
                continue
            if os.path.lexists(link):
                link.unlink()
            link.symlink_to(entry)
    script = dest / "bin" / "hipcc"
    script.write_text("#!/bin/sh\n# rdna4-install: hipcc replacement (TheRock hipcc_deprecation.md)\n"
                      f'exec "{replacement}" --hip-path="{root}" --hip-device-lib-path="{tc.device_libs}" "$@"\n')
    script.chmod(0o755)
    return dest


def _prepend_path(path: str, dirs: Iterable[Path], drop: Iterable[str] = ()) -> str:
    drop = set(drop)
    first = [str(d) for d in dirs]
    rest = [p for p in path.split(os.pathsep) if p and p not in first and p not in drop]
    return os.pathsep.join(first + rest)


def _cargo_dirs(path: str) -> list[str]:
    return [d for d in path.split(os.pathsep) if d and (Path(d) / "cargo").exists()]


def build_env(base: Mapping[str, str], archs: tuple[str, ...] | list[str], *, rocm: Path, kind: str,
              jobs: int, venv: Path | None = None, src: Path | None = None,
              version: str = "", triton_kernels: Path | None = None, rust_frontend: bool = False,
              ccache_dir: Path | None = None, host_compiler: str = "system",
              host: HostCompiler | None = None, shim_dir: Path | None = None) -> dict[str, str]:
    """`base` (the recipe's env) plus every arch/toolchain variable the builds read.

    `host` is the system compiler to use with host_compiler="system" (found on
    base's PATH when not given). `shim_dir` is where a flash-attention build
    gets its hipcc replacement when the toolchain has no bin/hipcc.
    """
    if not archs:
        raise InstallerError("no GPU target to build for", hint="pass --gpu-arch gfx1201 (or gfx1200, gfx1151)")
    if host_compiler not in HOST_COMPILERS:
        raise InstallerError(f"build.host_compiler must be one of {', '.join(HOST_COMPILERS)}, "
                             f"not {host_compiler!r}",
                             hint="rdna4-install install --set build.host_compiler=system")
    arch_list = ";".join(archs)
    tc = toolchain(rocm)
    env = dict(base)
    env.pop(FA_TRITON_SWITCH, None)
    bins = ([Path(venv) / "bin"] if venv else []) + list(tc.bin_dirs)
    # vLLM's setup.py builds the optional Rust frontend whenever cargo is on PATH
    # (tools/build_rust.py, optional unless VLLM_REQUIRE_RUST_FRONTEND): that
    # needs crates from the network, so cargo is hidden unless asked for.
    path = env.get("PATH", os.defpath)
    if host_compiler == "system":
        # looked up before the toolchain dirs go first on PATH
        host = host or system_compiler(path)
        problem = host_compiler_problem(host)
        if problem:
            raise InstallerError(problem, hint=HOST_COMPILER_HINT)
        cc, cxx = host.cc, host.cxx
    else:
        cc, cxx = str(tc.clang), str(tc.clangxx)
    hidden = [] if rust_frontend or kind != "vllm" else _cargo_dirs(path)
    env["PATH"] = _prepend_path(path, bins, drop=hidden)
    env.update({
        # torch cpp_extension + vLLM's cmake/utils.cmake (override_gpu_arches)
        "PYTORCH_ROCM_ARCH": arch_list,
        # flash-attention's CK path (setup.py: --targets and --offload-arch)
        "GPU_ARCHS": arch_list,
        # CMake HIP projects (CK, hipified deps) read these two
        "GPU_TARGETS": arch_list,
        "AMDGPU_TARGETS": arch_list,
        "CMAKE_ARGS": " ".join([f"-DCMAKE_HIP_ARCHITECTURES={arch_list}",
                                f"-DGPU_TARGETS={arch_list}", f"-DAMDGPU_TARGETS={arch_list}"]),
        "ROCM_PATH": str(tc.root), "ROCM_HOME": str(tc.root), "HIP_PATH": str(tc.root),
        "HIP_DEVICE_LIB_PATH": str(tc.device_libs),
        # device code: hipcc and CMake's HIP language take clang from here
        # (vLLM 0.33.0 docker/Dockerfile.rocm_base sets the same variable)
        "HIP_CLANG_PATH": str(tc.clang.parent),
        "CC": cc, "CXX": cxx,
        "MAX_JOBS": str(jobs),
        "CMAKE_BUILD_TYPE": env.get("CMAKE_BUILD_TYPE", "Release"),
    })
    if kind == "vllm":
        env["VLLM_TARGET_DEVICE"] = "rocm"
        # On ROCm the only FetchContent is triton_kernels (CMakeLists.txt:1686-1688), given
        # as TRITON_KERNELS_SRC_DIR; disconnected turns any other download a later vLLM
        # adds into a build error instead of a silent fetch of an unpinned source.
        env["CMAKE_ARGS"] += " -DFETCHCONTENT_FULLY_DISCONNECTED=ON"
        if triton_kernels is not None:
            env["TRITON_KERNELS_SRC_DIR"] = str(triton_kernels)
        if rust_frontend:
            env["VLLM_REQUIRE_RUST_FRONTEND"] = "1"
        else:
            env.pop("VLLM_REQUIRE_RUST_FRONTEND", None)
    if kind == "flash-attention":
        # skips setup.py's try-a-prebuilt-wheel-from-GitHub step (no ROCm wheels exist)
        env["FLASH_ATTENTION_FORCE_BUILD"] = "TRUE"
        env["BUILD_TARGET"] = "rocm"
        if not (tc.root / "bin" / "hipcc").is_file():
            if shim_dir is None:
                raise InstallerError(f"the toolchain at {tc.root} has no bin/hipcc",
                                     hint="reinstall the toolchain: " + command(tc.root.parent, "run", "therock", "--force"))
            env["ROCM_HOME"] = str(hipcc_shim(tc, shim_dir))
    if src is not None and version and not (Path(src) / ".git").exists():
        # setuptools-scm reads the version from git; an sdist tree has none
        env["SETUPTOOLS_SCM_PRETEND_VERSION"] = version
    if proc.which("ccache", path=env["PATH"]):
        if ccache_dir is not None:
            env.setdefault("CCACHE_DIR", str(ccache_dir))
        # hash compilers by content and paths relative to the tree, so a second
        # prefix (another ROCm path, another work dir) still hits
        env["CCACHE_COMPILERCHECK"] = "content"
        if src is not None:
            env["CCACHE_BASEDIR"] = str(src)
            env["CCACHE_NOHASHDIR"] = "1"
    return env
