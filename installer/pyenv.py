"""The Python environment: a uv venv holding TheRock's ROCm PyTorch.

The stack is pinned exactly to the toolchain tarball's ROCm version (torchindex
says why and works the pins out), and the index setup never lets PyPI (whose
torch is a CUDA build with a higher plain version) supply torch. Later installs
into the venv go through `guarded_install`, which holds the stack with a
constraints file and fails loudly if anything moved anyway.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlsplit

from packaging.utils import canonicalize_name
from packaging.version import Version

from . import mirror, proc
from .download import is_loopback
from .errors import InstallerError, StepFailed, UsageError, command
from .torchindex import (coherent_pins, resolve_from_index, rocm_local, same_version,
                         stack_requirements, tarball_version)

PYPI_URL = "https://pypi.org/simple"
CONSTRAINTS = "rdna4-constraints.txt"
AMDSMI_PTH = "rdna4-amdsmi.pth"
# The packages a later install must not move. amdsmi is watched so a PyPI copy
# (vLLM's build requirements name amdsmi==7.0.2) cannot shadow the SDK's one,
# which is registered in place and so is no distribution of its own.
GUARDED = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton-rocm", "rocm", "amdsmi")
GUARDED_PREFIXES = ("rocm-sdk-", "amd-torch")
# uv settings a step may inherit; any other UV_*/PIP_* variable (an index, a
# torch backend, an index strategy) could change where torch comes from.
UV_KEEP = ("UV_CACHE_DIR", "UV_PYTHON_INSTALL_DIR", "UV_HTTP_TIMEOUT", "UV_PYTHON_DOWNLOADS")
_ARCH = re.compile(r"^gfx[0-9a-f]{3,5}$")


# --- locations -----------------------------------------------------------------

def find_uv() -> str:
    """proc.find_uv, or a clear error when there is no uv at all."""
    found = proc.find_uv()
    if found is None:
        raise InstallerError("uv not found on PATH or next to rdna4-install",
                             hint="install uv (https://docs.astral.sh/uv/) or reinstall "
                                  "rdna4-install, which depends on it")
    return found


def venv_dir(prefix: Path) -> Path:
    return Path(prefix) / "venv"


def venv_python(prefix: Path) -> Path:
    return venv_dir(prefix) / "bin" / "python"


def site_packages(venv: Path) -> Path:
    found = sorted(Path(venv).glob("lib/python3*/site-packages"))
    if not found:
        raise InstallerError(f"{venv} is not a Python virtual environment",
                             hint=command(Path(venv).parent, "run", "torch", "--force"))
    return found[0]


def venv_python_version(venv: Path) -> tuple[int, int, int]:
    """The venv's CPython version, read from pyvenv.cfg (uv writes version_info)."""
    cfg = Path(venv) / "pyvenv.cfg"
    try:
        text = cfg.read_text()
    except OSError:
        raise InstallerError(f"{cfg} is missing",
                             hint=command(Path(venv).parent, "run", "torch", "--force")) from None
    m = re.search(r"^(?:version_info|version)\s*=\s*(\d+)\.(\d+)\.(\d+)", text, re.M)
    if not m:
        raise InstallerError(f"no Python version in {cfg}")
    return int(m[1]), int(m[2]), int(m[3])


def uv_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items()
           if not (k.startswith(("UV_", "PIP_")) and k not in UV_KEEP)
           and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH")}
    # TheRock's core and device wheels are hundreds of MB from S3; uv's 30 s
    # read timeout is known to trip on them (3P install recipes raise it too).
    out.setdefault("UV_HTTP_TIMEOUT", "300")
    return out


def check_index_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and is_loopback(host):
        return url
    raise UsageError(f"{what} must be an https URL (http only to loopback): {url!r}",
                     hint="fix the pin in recipes/pins.toml or the --set value")


# --- steps ------------------------------------------------------------------------

def create_venv_step(ctx, *, python: str = "3.12") -> None:
    """`uv venv --python <python> PREFIX/venv`, recreated so no stale package survives."""
    if not python:
        raise UsageError("torch.python is empty", hint="pin a Python version such as 3.12")
    uv = find_uv()
    venv = venv_dir(ctx.prefix)
    # --clear: this step reruns only when the stack changed, and everything built
    # into the old venv is rebuilt by the recipes that depend on this one.
    # uv's cache is not touched: it is shared between prefixes on purpose.
    argv = [uv, "venv", "--no-config", "--no-project", "--clear", "--python", python, str(venv)]
    ctx.run(argv, env=uv_env(ctx.env), what="uv venv")
    ctx.facts["python"] = ".".join(map(str, venv_python_version(venv)))
    ctx.facts["uv"] = proc.capture([uv, "--version"], env=uv_env(ctx.env)).stdout.strip()


def install_torch_step(ctx, *, index_url: str, rocm: str, torch: str, torchvision: str,
                       torchaudio: str, triton: str, therock_version: str,
                       pypi_url: str = PYPI_URL) -> None:
    """Install TheRock's rocm + torch stack for ROCm `therock_version` into PREFIX/venv."""
    check_index_url(index_url, "torch.index_url")
    check_index_url(pypi_url, "the PyPI index URL")
    archs = tuple(ctx.archs)
    bad = [a for a in archs if not _ARCH.match(a)]
    if not archs or bad:
        raise UsageError(f"bad target arch list {archs!r}", hint="targets look like gfx1201")
    v_rocm = tarball_version(ctx.prefix, therock_version)
    pins = coherent_pins(v_rocm, rocm=rocm, torch=torch, torchvision=torchvision,
                         torchaudio=torchaudio, triton=triton)
    venv = venv_dir(ctx.prefix)
    resolved = [k for k in ("torch", "torchvision", "torchaudio") if pins[k] is None]
    if resolved:
        if ctx.offline:
            raise InstallerError(f"cannot resolve {', '.join(resolved)} offline",
                                 hint="pin exact versions in recipes/pins.toml")
        py = venv_python_version(venv)[:2]
        pins.update(resolve_from_index(index_url, v_rocm, resolved, py, torch=pins["torch"]))
    reqs = stack_requirements(pins, archs)
    argv = [find_uv(), "pip", "install", "--python", str(venv_python(ctx.prefix)), "--no-config",
            # uv asks --index before --default-index and, with first-index, takes a
            # package only from the first index that has it at all: TheRock's index
            # has torch, so PyPI is never asked for it, while a dependency AMD does
            # not mirror can still come from PyPI. The exact +rocm pins are the
            # second lock: no PyPI torch has that version.
            "--index", mirror.index_url(index_url), "--default-index", mirror.index_url(pypi_url),
            "--index-strategy", "first-index"]
    if any(v and Version(v).is_prerelease for v in pins.values()):
        # nightlies: the device family wheels torch's extras pull in are prereleases
        # too, and uv allows those only when asked (AMD's rocm-cli does the same)
        argv += ["--prerelease", "allow"]
    if ctx.offline:
        argv.append("--offline")
    env = uv_env(ctx.env)
    # `rocm` is an sdist whose build picks a default device package from this
    # variable, else from offload-arch on the build machine (TheRock
    # docs/packaging/python_packaging.md); the explicit device pins above are
    # what counts, this only keeps the default from depending on the host.
    env["ROCM_SDK_TARGET_FAMILY"] = archs[0]
    ctx.run(argv + reqs, env=env, what="uv pip install (torch stack)")

    # expands the devel tree (_rocm_sdk_devel) and links the device wheels' files into it
    ctx.run([str(venv / "bin" / "rocm-sdk"), "init"], env=uv_env(ctx.env), what="rocm-sdk init")
    site = site_packages(venv)
    fixes = apply_runtime_fixes(site)
    amdsmi = register_amdsmi(site, ctx.prefix)
    installed = installed_versions(venv)
    expect_installed(installed, pins, archs)
    constraints = write_constraints(venv, installed)
    ctx.facts.update({
        "index_url": index_url, "rocm": pins["rocm"], "torch": installed["torch"],
        "torchvision": installed.get("torchvision", ""), "torchaudio": installed.get("torchaudio", ""),
        "triton": installed.get("triton", ""), "resolved_from_index": resolved,
        "runtime_fixes": fixes, "amdsmi": str(amdsmi), "constraints": str(constraints),
    })


def check_torch_step(ctx) -> None:
    """Import torch in the venv (no GPU needed): it must be a HIP build of the venv's ROCm."""
    venv = venv_dir(ctx.prefix)
    installed = installed_versions(venv)
    if "torch" not in installed or "rocm" not in installed:
        raise InstallerError(f"torch or rocm is not installed in {venv}", hint=command(ctx.prefix, "run", "torch", "--force"))
    v_rocm = installed["rocm"]
    probe = ("import json, torch, amdsmi; print('RDNA4-PROBE ' + json.dumps("
             "{'torch': torch.__version__, 'hip': torch.version.hip}))")
    lines: list[str] = []
    env = uv_env(ctx.env)  # no LD_LIBRARY_PATH: torch must find its own ROCm libraries
    ctx.run([str(venv_python(ctx.prefix)), "-c", probe], env=env, on_line=lines.append,
            what="import torch", timeout=600)
    found = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("RDNA4-PROBE ")]
    if not found:
        raise InstallerError("the torch probe printed nothing", hint=f"log: {ctx.log}")
    seen = found[-1]
    if not seen["hip"]:
        raise InstallerError(f"torch {seen['torch']} in {venv} is not a ROCm (HIP) build",
                             hint="the venv was changed after install: " + command(ctx.prefix, "run", "torch", "--force"))
    if seen["torch"] != installed["torch"] or Version(seen["torch"]).local != rocm_local(Version(v_rocm)):
        raise InstallerError(f"torch imports as {seen['torch']} but the venv holds "
                             f"torch {installed['torch']} and rocm {v_rocm}",
                             hint=command(ctx.prefix, "run", "torch", "--force"))
    out: list[str] = []
    ctx.run([str(venv / "bin" / "rocm-sdk"), "version"], env=env, on_line=out.append,
            what="rocm-sdk version")
    if not any(same_version(tok, v_rocm) for line in out for tok in line.split()):
        raise InstallerError(f"`rocm-sdk version` says {' '.join(out)!r}, expected {v_rocm}",
                             hint=command(ctx.prefix, "run", "torch", "--force"))
    ctx.facts.update({"hip": seen["hip"], "torch": seen["torch"], "rocm": v_rocm})


def expect_installed(installed: Mapping[str, str], pins: Mapping[str, str | None],
                     archs: Iterable[str]) -> None:
    want = {"rocm": pins["rocm"], "rocm-sdk-core": pins["rocm"], "torch": pins["torch"]}
    want.update({f"rocm-sdk-device-{a}": pins["rocm"] for a in archs})
    want.update({f"amd-torch-device-{a}": pins["torch"] for a in archs})
    for key in ("torchvision", "torchaudio", "triton"):
        if pins.get(key):
            want[key] = pins[key]
    wrong = [f"{k} {installed.get(k, 'missing')} (wanted {v})" for k, v in want.items()
             if v and not (k in installed and same_version(installed[k], v))]
    if wrong:
        raise InstallerError(f"the venv does not hold the pinned stack: {'; '.join(wrong)}",
                             hint="check that torch.index_url serves these exact versions")


# --- runtime fixes and amdsmi -----------------------------------------------------

def _replace_text(path: Path, text: str) -> None:
    # uv installs by hard-linking files from its cache, which every prefix shares;
    # writing in place would edit the cached copy too. A new file is this venv's own.
    tmp = path.with_name(path.name + ".rdna4-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _link_to_twin(f: Path, twin: Path) -> bool:
    if f.is_symlink() or not f.is_file() or not twin.is_file() or os.path.samefile(f, twin):
        return False
    f.unlink()  # drops only this venv's link to the file, never the uv cache entry
    f.symlink_to(os.path.relpath(twin, f.parent))
    return True


def apply_runtime_fixes(site: Path) -> list[str]:
    """The TheRock runtime fixes from vLLM 0.33's docker/Dockerfile.rocm_base, where needed."""
    fixes: list[str] = []
    init = site / "rocm_sdk" / "__init__.py"
    if init.is_file():
        text = init.read_text()
        if "rtld_global: bool = True" in text:
            # rocm_sdk preloads the SDK libraries when torch is imported. With
            # RTLD_GLOBAL their symbols take precedence for every library loaded
            # later, so an extension built against another copy of ROCm silently
            # binds to these; local preloading keeps each library's own bindings.
            _replace_text(init, text.replace("rtld_global: bool = True", "rtld_global: bool = False"))
            fixes.append("rocm_sdk preloads with RTLD_LOCAL")
    core, devel = site / "_rocm_sdk_core" / "lib", site / "_rocm_sdk_devel" / "lib"
    if core.is_dir() and devel.is_dir():
        # torch loads the HIP runtime from _rocm_sdk_core, code built against the
        # devel tree (ROCM_PATH) loads the copy in _rocm_sdk_devel: two HIP runtimes
        # in one process, each with its own device state. With the core name linked
        # to the devel file both resolve to one inode, which the loader maps once.
        # rocprofiler-sdk gets the same treatment so only one profiler registers.
        names = [p.name for p in core.glob("libamdhip64.so*")]
        names += ["librocprofiler-sdk.so.1", "librocprofiler-register.so.0", "librocprofiler-sdk-roctx.so.1"]
        for name in names:
            if _link_to_twin(core / name, devel / name):
                fixes.append(f"_rocm_sdk_core/lib/{name} -> _rocm_sdk_devel/lib/{name}")
        # TheRock ships librocm_smi64.so.1; binaries built against older ROCm
        # releases ask for librocm_smi64.so.7 (which consumer needs it here is
        # UNCONFIRMED; vLLM's base adds the same alias in its ROCM_PATH/lib).
        smi, alias = core / "librocm_smi64.so.1", devel / "librocm_smi64.so.7"
        if smi.is_file() and not alias.exists() and not alias.is_symlink():
            alias.symlink_to(os.path.relpath(smi, devel))
            fixes.append("_rocm_sdk_devel/lib/librocm_smi64.so.7 -> librocm_smi64.so.1")
    return fixes


def register_amdsmi(site: Path, prefix: Path) -> Path:
    """Make `import amdsmi` work in the venv from the SDK's share/amd_smi, in place.

    vLLM selects ROCm only when amdsmi imports. The bindings find libamd_smi
    relative to their own directory, so a copy (pip install .) loses the library;
    a .pth line keeps them where they are, and no LD_LIBRARY_PATH is needed
    (one would shadow the libraries torch loads). The SDK's copy comes first: it
    is the same build as torch's ROCm; the tarball's is the same version.
    """
    for base in (site / "_rocm_sdk_core" / "share" / "amd_smi", Path(prefix) / "rocm" / "share" / "amd_smi"):
        if (base / "amdsmi" / "__init__.py").is_file():
            # relative to site-packages (site.py joins it), so the line is ASCII whatever
            # the prefix is called: Python < 3.13 decodes .pth files in the locale's
            # encoding, and a non-ASCII path under LANG=C kills the interpreter at start
            (site / AMDSMI_PTH).write_text(os.path.relpath(base, site) + "\n", encoding="ascii")
            return base
    raise InstallerError("amdsmi's Python bindings were not found in rocm-sdk-core or PREFIX/rocm",
                         hint="expected share/amd_smi/amdsmi; vLLM needs amdsmi to detect the GPU")


# --- the guard for later installs -------------------------------------------------

def _guarded(name: str) -> bool:
    return name in GUARDED or name.startswith(GUARDED_PREFIXES)


def installed_versions(venv: Path) -> dict[str, str]:
    """Name -> version of the guarded distributions in the venv, read from dist-info."""
    out: dict[str, str] = {}
    for meta in site_packages(venv).glob("*.dist-info/METADATA"):
        name = version = None
        with open(meta, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key == "Name":
                    name = canonicalize_name(value.strip())
                elif key == "Version":
                    version = value.strip()
        if name and version and _guarded(name):
            out[name] = version
    return out


def write_constraints(venv: Path, installed: Mapping[str, str] | None = None) -> Path:
    """PREFIX/venv/rdna4-constraints.txt holding every guarded package at its installed
    version (`installed`: installed_versions(venv), when the caller has just read it)."""
    installed = installed_versions(venv) if installed is None else installed
    if "torch" not in installed:
        raise InstallerError(f"torch is not installed in {venv}",
                             hint=command(Path(venv).parent, "run", "torch", "--force"))
    path = Path(venv) / CONSTRAINTS
    path.write_text("".join(f"{k}=={v}\n" for k, v in sorted(installed.items())))
    return path


def check_unchanged(before: Mapping[str, str], after: Mapping[str, str]) -> None:
    """Raise, naming each guarded package that moved, vanished or appeared."""
    moved = [f"{k} {before[k]} -> {after[k]}" for k in sorted(before) if k in after and after[k] != before[k]]
    moved += [f"{k} {before[k]} removed" for k in sorted(before) if k not in after]
    moved += [f"{k} {after[k]} added" for k in sorted(after) if k not in before]
    if moved:
        raise InstallerError(f"an install changed the torch stack: {'; '.join(moved)}",
                             hint="the venv is no longer coherent: rerun the torch recipe and drop "
                                  "or loosen the requirement that moved it")


def guarded_install(ctx, args: list[str], *, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`uv pip install <args>` into PREFIX/venv with the stack held by constraints.

    Afterwards the guarded versions are compared with those before; any change
    fails naming what moved. Returns the guarded versions.
    """
    venv = venv_dir(ctx.prefix)
    before = installed_versions(venv)
    constraints = write_constraints(venv, before)
    # also as build constraints: an isolated build env must not fetch another torch
    argv = [find_uv(), "pip", "install", "--python", str(venv_python(ctx.prefix)), "--no-config",
            "--constraints", str(constraints), "--build-constraints", str(constraints)]
    pypi = mirror.index_url(PYPI_URL)
    if pypi != PYPI_URL and "--default-index" not in args:
        argv += ["--default-index", pypi]   # uv's default index is PyPI: a mirror of it must say so
    if ctx.offline:
        argv.append("--offline")
    try:
        ctx.run(argv + list(args), env=uv_env(env if env is not None else ctx.env), what="uv pip install")
    except StepFailed as exc:
        err = StepFailed(f"{exc.message}; torch, triton and rocm are held at "
                         f"torch {before['torch']} by {constraints}",
                         hint=exc.hint or "a requirement that needs another torch fails here on purpose")
        err.tail = getattr(exc, "tail", [])  # type: ignore[attr-defined]
        raise err from None
    after = installed_versions(venv)
    check_unchanged(before, after)
    return after
