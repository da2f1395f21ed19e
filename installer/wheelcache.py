"""Built wheels kept by build fingerprint: CACHE/wheels/<recipe>/<key>/<name>.whl.

The key hashes what decides the compiled output (source identity, patch
contents, target archs, the arch-pinned env with prefix paths made symbolic,
the toolchain and torch pins, the venv's torch and Python), so a second prefix
with the same pins installs the wheel without compiling, and any change that
matters builds afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Env entries that change how fast a build runs, never what it produces.
VOLATILE_ENV = ("MAX_JOBS", "CCACHE_DIR", "CCACHE_BASEDIR", "CCACHE_NOHASHDIR", "CCACHE_COMPILERCHECK",
                "PATH", "HOME", "USER", "LOGNAME", "TERM", "SHELL", "TMPDIR", "LANG", "LC_ALL",
                "LC_CTYPE", "TZ", "UV_CACHE_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "UV_PYTHON_INSTALL_DIR",
                "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


def symbolic_env(env: Mapping[str, str], paths: Mapping[str, str | Path]) -> dict[str, str]:
    """The env without volatile keys, each listed path replaced by its {name}."""
    # longest path first so PREFIX/rocm becomes {rocm}, not {prefix}/rocm
    subs = sorted(((str(p), f"{{{name}}}") for name, p in paths.items() if str(p)),
                  key=lambda kv: -len(kv[0]))
    out = {}
    for key, value in env.items():
        if key in VOLATILE_ENV:
            continue
        for path, name in subs:
            value = value.replace(path, name)
        out[key] = value
    return out


def fingerprint(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _slot(cache_dir: Path, recipe: str, key: str) -> Path:
    return Path(cache_dir) / "wheels" / recipe / key


def lookup(cache_dir: Path, recipe: str, key: str) -> Path | None:
    wheels = sorted(_slot(cache_dir, recipe, key).glob("*.whl"))
    return wheels[0] if len(wheels) == 1 else None


def store(cache_dir: Path, recipe: str, key: str, wheel: Path, meta: Mapping[str, Any]) -> Path:
    """Copy `wheel` into its slot atomically (a half-copied wheel is never visible)."""
    slot = _slot(cache_dir, recipe, key)
    if (hit := lookup(cache_dir, recipe, key)) is not None:
        return hit
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{key[:12]}-", dir=slot.parent))
    try:
        shutil.copy2(wheel, tmp / wheel.name)
        (tmp / "build.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        try:
            os.rename(tmp, slot)
        except OSError:  # another prefix stored the same build meanwhile
            if lookup(cache_dir, recipe, key) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return slot / wheel.name


def sweep(cache_dir: Path) -> None:
    """Remove store() temp dirs whose process is gone (a SIGKILL mid-copy leaves
    them). The cache is shared, so a live installer's temp dir is left alone."""
    from .state import pid_alive

    for tmp in (Path(cache_dir) / "wheels").glob("*/.tmp-*-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
