"""AMD's knowledge of GFX targets, and the host's names for its cards.

Target names, their families and the decoding of KFD's gfx_target_version come
from AMD's `rocm-bootstrap` package (pinned in pyproject.toml; its
rocm_bootstrap/targets.py is generated from LLVM's GCNProcessors.td), so a new
target is a version bump, not a table edit here. Marketing names come from
libdrm's amdgpu.ids on the host (what rocminfo and the kernel's tools show),
read under $RDNA4_SYSFS_ROOT; detect.py keeps a small built-in table only for
hosts without that file.

rocm_bootstrap is imported inside the functions: it costs ~35 ms, which a
`--help` or a no-op rerun should not pay.
"""

from __future__ import annotations

import functools
from pathlib import Path

# libdrm installs it under its datadir; AMD's packaged libdrm under /opt/amdgpu
AMDGPU_IDS = ("usr/share/libdrm/amdgpu.ids", "opt/amdgpu/share/libdrm/amdgpu.ids")


def gfx_name(version: int | None) -> str | None:
    """KFD gfx_target_version -> target name; None for CPU nodes (0) and junk.

    The kernel stores major*10000 + minor*100 + stepping (kfd_device.c); AMD's
    table turns that into the LLVM name (90010 -> gfx90a). A version newer than
    the pinned table still gets the name LLVM's offload-arch would print
    (clang/tools/offload-arch/AMDGPUArchByKFD.cpp: stepping as one hex digit).
    """
    if not version or version < 0:
        return None
    from rocm_bootstrap.targets import parse_gfx_target_version

    try:
        return parse_gfx_target_version(version).name
    except ValueError:
        pass
    major, minor, step = version // 10000 % 100, version // 100 % 100, version % 100
    if major == 0 or minor > 15 or step > 15:
        return None
    return f"gfx{major}{minor:x}{step:x}"


def is_known(name: str) -> bool:
    """Whether AMD's table has a target of this name (gfx1201 yes, gfx9999 no)."""
    from rocm_bootstrap.targets import lookup_target

    try:
        lookup_target(name)
    except ValueError:
        return False
    return True


def family(name: str) -> str | None:
    """The architecture family AMD files a target under, e.g. gfx1100 -> "RDNA3"."""
    from rocm_bootstrap.targets import packaging_chain

    try:
        return packaging_chain(name)[1].display_name
    except (ValueError, KeyError):
        return None


def same_family(name: str) -> tuple[str, ...]:
    """Every target of `name`'s sub-family (gfx1201 -> gfx1200, gfx1201)."""
    from rocm_bootstrap.targets import packaging_chain

    return tuple(t.name for t in packaging_chain(name)[1].members)


def marketing_name(root: Path, device: int, revision: int | None) -> str | None:
    """The host's amdgpu.ids name for a PCI device (and revision), if it has one."""
    names = _amdgpu_ids(str(root))
    if revision is not None and (device, revision) in names:
        return names[(device, revision)]
    return None


@functools.lru_cache(maxsize=4)
def _amdgpu_ids(root: str) -> dict[tuple[int, int], str]:
    """(device, revision) -> name from the first amdgpu.ids found under `root`.

    Format (libdrm data/amdgpu.ids): '#' comments, a version line, then
    "DEVICE,\tREVISION,\tNAME" with hex ids.
    """
    for rel in AMDGPU_IDS:
        try:
            text = (Path(root) / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        out: dict[tuple[int, int], str] = {}
        for line in text.splitlines():
            parts = line.split(",", 2)
            if line.startswith("#") or len(parts) != 3:
                continue
            try:
                key = (int(parts[0].strip(), 16), int(parts[1].strip(), 16))
            except ValueError:
                continue
            if parts[2].strip():
                out[key] = parts[2].strip()
        return out
    return {}
