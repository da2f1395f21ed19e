"""Reusable stand-ins for the upstream sources and the ROCm toolchain.

- fake_rocm(): a toolchain tree whose clang/clang++/hipcc forward to the host C
  compiler and turn each --offload-arch=gfxN into the offload-bundle id string a
  real HIP object carries; every call is logged (argv + the arch env it saw).
- vllm_like_sdist(): a tiny vLLM-shaped release tarball (setup.py driving a
  CMake/ninja build, tools/use_existing_torch.py, requirements/...).
- fa_like_repo(): a local git repo shaped like flash-attention with
  csrc/composable_kernel and third_party/aiter submodules.
- triton_like_repo(): a git repo with python/triton_kernels/triton_kernels.
- make_venv() / make_ctx(): a throwaway venv that borrows setuptools from the
  test venv, and a StepContext for the actions.
Nothing here is upstream code; the entry points only mimic their behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
from pathlib import Path

from installer import proc
from installer.actions import StepContext
from installer.recipes import Source

ARCH_VARS = ("PYTORCH_ROCM_ARCH", "GPU_ARCHS", "GPU_TARGETS", "AMDGPU_TARGETS", "CMAKE_ARGS",
             "ROCM_PATH", "ROCM_HOME", "HIP_PATH", "HIP_DEVICE_LIB_PATH", "HIP_CLANG_PATH", "CC", "CXX", "MAX_JOBS",
             "VLLM_TARGET_DEVICE", "TRITON_KERNELS_SRC_DIR", "SETUPTOOLS_SCM_PRETEND_VERSION",
             "FLASH_ATTENTION_TRITON_AMD_ENABLE", "FLASH_ATTENTION_FORCE_BUILD",
             "VLLM_REQUIRE_RUST_FRONTEND")

FAKE_CLANG = '''#!{python}
# fake ROCm clang: host compiler underneath, offload ids on top
import json, os, subprocess, sys, tempfile, time
from pathlib import Path
here = Path(__file__).resolve().parent
root = here.parents[2] if here.parent.name == "llvm" else here.parent
# beside the toolchain tree, not in it: the installer owns every file of the tree it unpacked
with open(root.parent / (root.name + ".compiler-calls.log"), "a") as log:
    log.write(json.dumps({{"argv": sys.argv, "env": {{k: os.environ.get(k) for k in {watch!r}}}}}) + "\\n")
archs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--offload-arch=")]
# clang-only flags the host compiler underneath does not know
args = [a for a in sys.argv[1:] if not a.startswith(("--offload-arch=", "--hip-path=", "--hip-device-lib-path="))]
real = "c++" if sys.argv[0].endswith(("++", "hipcc")) and not any(a.endswith(".c") for a in args) else "cc"
if archs and "-c" in args:
    # a fixed cost per device compile, for benchmarks/second_prefix.py
    time.sleep(float(os.environ.get("FAKE_COMPILE_SECONDS") or 0))
    ids = "".join("hipv4-amdgcn-amd-amdhsa--%s\\\\0" % a for a in archs)
    # next to the call log, and gone once the compile is done: nothing is left in /tmp
    fd, header = tempfile.mkstemp(suffix=".h", dir=root)
    os.write(fd, ('__attribute__((used)) static const char rdna4_fake_bundle[] = '
                  '"__CLANG_OFFLOAD_BUNDLE__\\\\0%s";\\n' % ids).encode())
    os.close(fd)
    try:
        sys.exit(subprocess.call([real, "-include", header] + args))
    finally:
        os.unlink(header)
sys.exit(subprocess.call([real] + args))
'''


def fake_rocm(root: Path) -> Path:
    llvm_bin = root / "lib" / "llvm" / "bin"
    llvm_bin.mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "lib" / "llvm" / "amdgcn" / "bitcode").mkdir(parents=True)
    script = FAKE_CLANG.format(python=sys.executable, watch=ARCH_VARS)
    for path in (llvm_bin / "clang", llvm_bin / "clang++", root / "bin" / "hipcc"):
        path.write_text(script)
        path.chmod(0o755)
    return root


def compiler_calls(rocm: Path) -> list[dict]:
    tree = Path(rocm).resolve()
    log = tree.parent / f"{tree.name}.compiler-calls.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, env=env,
                          check=True, capture_output=True, text=True).stdout.strip()


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def git_repo(root: Path, files: dict[str, str], message: str = "init") -> str:
    root.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "-b", "main", cwd=root)
    write_tree(root, files)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", message, cwd=root)
    return git("rev-parse", "HEAD", cwd=root)


# --- a tiny CMake/ninja extension build behind setup.py ---------------------------

CMAKELISTS = """
cmake_minimum_required(VERSION 3.20)
project(tiny C)
set(FLAGS "")
foreach(a IN LISTS ARCHS)
  list(APPEND FLAGS "--offload-arch=${a}")
endforeach()
add_library(ext MODULE csrc/a.c csrc/b.c csrc/c.c)
target_compile_options(ext PRIVATE ${FLAGS})
set_target_properties(ext PROPERTIES PREFIX "" OUTPUT_NAME "${OUT_NAME}" SUFFIX "${OUT_SUFFIX}"
                      LIBRARY_OUTPUT_DIRECTORY "${OUT_DIR}")
"""

SOURCES = {f"csrc/{n}.c": f"int tiny_{n}(int x) {{ return x + {i}; }}\n" for i, n in enumerate("abc")}

# the part of setup.py both fakes share: build each extension with CMake + ninja,
# offload flags only for the "device" ones, and record the env the build saw
SETUP_COMMON = """
import json, os, subprocess, sys, sysconfig
from pathlib import Path
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
WATCH = {watch!r}

class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build = Path(self.build_temp).resolve() / ext.name
        build.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get(ARCH_VAR, "") if ext.name in DEVICE else ""
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        # host code with CC; device code with the toolchain's clang, as hipcc and
        # CMake's HIP language find it (HIP_CLANG_PATH)
        cc = DEVICE_CC() if ext.name in DEVICE else os.environ["CC"]
        subprocess.check_call(["cmake", "-G", "Ninja", "-S", str(HERE), "-B", str(build),
                               "-DCMAKE_C_COMPILER=" + cc, "-DARCHS=" + archs,
                               "-DOUT_NAME=" + out.name[: -len(suffix)], "-DOUT_SUFFIX=" + suffix,
                               "-DOUT_DIR=" + str(out.parent)] + os.environ.get("CMAKE_ARGS", "").split())
        subprocess.check_call(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "1")])

def record(pkg):
    Path(pkg).mkdir(exist_ok=True)
    Path(pkg, "_build_env.json").write_text(json.dumps({{k: os.environ.get(k) for k in WATCH}}))
"""


def vllm_like_sdist(dest_dir: Path, version: str = "0.33.0") -> Path:
    """vllm-<version>.tar.gz with a top dir, like the PyPI sdist."""
    top = f"vllm-{version}"
    tree = dest_dir / "sdist-tree" / top
    files = {
        "CMakeLists.txt": CMAKELISTS,
        **SOURCES,
        "vllm/__init__.py": f"__version__ = {version!r}\n",
        "PKG-INFO": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n\nA fake vLLM.\n",
        "requirements/common.txt": "# nothing needed for the fake\n",
        "requirements/build/rocm.txt": "-r ../common.txt\n--extra-index-url https://repo.amd.com/x/\n"
                                       "torch==2.12.0+rocm7.14.0\ntriton==3.7.1+git0263a6a6\namdsmi==7.0.2\n",
        "requirements/rocm.txt": "-r common.txt\n",
        "pyproject.toml": '[build-system]\nrequires = [\n    "setuptools",\n    "torch == 2.12.0",\n]\n'
                          'build-backend = "setuptools.build_meta"\n',
        # mimics upstream's --prefix mode: drops lines that start with torch=, torchvision=, ...
        "tools/use_existing_torch.py": """
            import glob, sys
            assert sys.argv[1:] == ["--prefix"], sys.argv
            for f in glob.glob("requirements/**/*.txt", recursive=True) + ["pyproject.toml"]:
                lines = open(f).read().splitlines(True)
                kept = [l for l in lines if not l.strip().lower().startswith(("torch=", '"torch ='))]
                open(f, "w").writelines(kept)
                open("use_existing_torch.ran", "a").write(f + "\\n")
        """,
        "setup.py": SETUP_COMMON.format(watch=ARCH_VARS) + textwrap.dedent("""
            ARCH_VAR = "PYTORCH_ROCM_ARCH"
            DEVICE = {"vllm._C", "vllm._rocm_C"}
            DEVICE_CC = lambda: os.path.join(os.environ["HIP_CLANG_PATH"], "clang")
            if os.environ.get("VLLM_TARGET_DEVICE") != "rocm":
                sys.exit("fake vllm: VLLM_TARGET_DEVICE is not rocm")
            version = os.environ.get("SETUPTOOLS_SCM_PRETEND_VERSION")
            if not version and not (HERE / ".git").exists():
                sys.exit("fake vllm: setuptools-scm found no version (no .git, no pretend version)")
            tk = Path(os.environ.get("TRITON_KERNELS_SRC_DIR", ""))
            if not (tk.name == "triton_kernels" and (tk / "__init__.py").is_file()):
                sys.exit("fake vllm: would FetchContent triton_kernels from GitHub")
            third = HERE / "vllm" / "third_party" / "triton_kernels"
            third.mkdir(parents=True, exist_ok=True)
            for py in tk.glob("*.py"):
                (third / py.name).write_text(py.read_text())
            Path(HERE / "vllm" / "third_party" / "__init__.py").write_text("")
            if '"torch ==' in (HERE / "pyproject.toml").read_text():
                sys.exit("fake vllm: torch still in the build requirements")
            record("vllm")
            setup(name="vllm", version=version, packages=["vllm", "vllm.third_party",
                  "vllm.third_party.triton_kernels"], package_data={"vllm": ["_build_env.json"]},
                  ext_modules=[Extension(n, sources=[]) for n in ("vllm._C", "vllm._rocm_C",
                               "vllm.cumem_allocator")], cmdclass={"build_ext": CMakeBuild})
        """),
    }
    write_tree(tree, files)
    archive = dest_dir / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=top)
    return archive


def triton_like_repo(root: Path) -> tuple[Path, str]:
    sha = git_repo(root, {
        "python/triton_kernels/triton_kernels/__init__.py": "",
        "python/triton_kernels/triton_kernels/matmul.py": "def matmul(): return 'tk'\n",
        "python/triton/big_file.py": "# not needed by vLLM\n",
    })
    return root, sha


def fa_like_repo(root: Path) -> tuple[Path, str, dict[str, str]]:
    """(superproject path, its commit, {submodule path: recorded commit})."""
    ck_sha = git_repo(root.parent / "composable_kernel", {
        "example/ck_tile/01_fmha/generate.py": "print('codegen')\n",
        "include/ck.hpp": "// ck\n",
    })
    aiter_sha = git_repo(root.parent / "aiter", {"aiter/__init__.py": ""})
    cutlass_sha = git_repo(root.parent / "cutlass", {"include/cutlass.h": ""})
    files = {
        "CMakeLists.txt": CMAKELISTS, **SOURCES,
        "flash_attn/__init__.py": "__version__ = '2.8.4'\n",
        # upstream picks its backend from this switch at import time (flash_attn_interface.py);
        # the fake's CK library has no Python init, so a named stand-in takes its place
        "flash_attn/flash_attn_interface.py": (
            "import os, types\n"
            "USE_TRITON_ROCM = os.environ.get('FLASH_ATTENTION_TRITON_AMD_ENABLE', 'FALSE') == 'TRUE'\n"
            "flash_attn_gpu = types.ModuleType('flash_attn.flash_attn_triton_amd' if USE_TRITON_ROCM "
            "else 'flash_attn_2_cuda')\n"),
        "setup.py": SETUP_COMMON.format(watch=ARCH_VARS) + textwrap.dedent("""
            ARCH_VAR = "GPU_ARCHS"
            DEVICE = {"flash_attn_2_cuda"}
            # torch's cpp_extension: ROCM_HOME (else ROCM_PATH) /bin/hipcc
            DEVICE_CC = lambda: os.path.join(os.environ.get("ROCM_HOME") or os.environ["ROCM_PATH"], "bin", "hipcc")
            triton = os.environ.get("FLASH_ATTENTION_TRITON_AMD_ENABLE", "FALSE") == "TRUE"
            sub = "third_party/aiter" if triton else "csrc/composable_kernel"
            if (HERE / ".git").exists():  # like upstream: git submodule update --init <sub>
                subprocess.check_call(["git", "submodule", "update", "--init", sub], cwd=HERE)
            if not triton:
                assert (HERE / "csrc/composable_kernel/example/ck_tile/01_fmha/generate.py").exists()
                if os.environ.get("GPU_ARCHS", "native") == "native":
                    sys.exit("fake flash-attention: GPU_ARCHS not set and no GPU detected")
            record("flash_attn")
            setup(name="flash_attn", version="2.8.4", packages=["flash_attn"],
                  package_data={"flash_attn": ["_build_env.json"]},
                  ext_modules=[] if triton else [Extension("flash_attn_2_cuda", sources=[])],
                  cmdclass={"build_ext": CMakeBuild})
        """),
    }
    git_repo(root, files)
    for path, repo in (("csrc/composable_kernel", "composable_kernel"), ("third_party/aiter", "aiter"),
                       ("csrc/cutlass", "cutlass")):
        git("submodule", "add", "-q", f"../{repo}", path, cwd=root)
    git("commit", "-q", "-m", "submodules", cwd=root)
    return root, git("rev-parse", "HEAD", cwd=root), {"csrc/composable_kernel": ck_sha,
                                                      "third_party/aiter": aiter_sha,
                                                      "csrc/cutlass": cutlass_sha}


def make_venv(where: Path) -> Path:
    """A venv whose Python sees the test venv's setuptools/wheel through a .pth (no index
    needed) and that holds a torch dist-info, so pyenv's guard has a stack to hold."""
    subprocess.run(["uv", "venv", "-q", "--python", sys.executable, str(where)], check=True,
                   capture_output=True)
    site = next((where / "lib").glob("python*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the stack the torch recipe would have installed, as far as pyenv's guard reads it
    meta = site / "torch-2.13.0+rocm10.1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+rocm10.1.0\n\n")
    return where


def make_ctx(tmp: Path, name: str, *, prefix: Path, rocm: Path, venv: Path, cache: Path,
             source: Source | None = None, patches: tuple[Path, ...] = (),
             archs: tuple[str, ...] = ("gfx1201",), version: str = "", options: dict | None = None,
             offline: bool = False) -> StepContext:
    work = prefix / ".rdna4" / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    log = prefix / ".rdna4" / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = proc.base_env({"UV_NO_INDEX": "1", "UV_OFFLINE": "1"})
    variables = {"prefix": str(prefix), "work": str(work), "src": str(work / "src"), "cache": str(cache),
                 "rocm": str(rocm), "venv": str(venv), "python": str(venv / "bin" / "python"),
                 "uv": "uv", "archs": ",".join(archs), "arch_list": ";".join(archs), "jobs": "2",
                 "_version": version}
    return StepContext(name=name, prefix=prefix, cache_dir=cache, work_dir=work, log=log, env=env,
                       vars=variables, archs=archs, jobs=0, offline=offline, options=options or {},
                       source=source, patches=patches)
