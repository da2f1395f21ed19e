"""Offload bundles laid out as clang writes them, inside real ELF shared objects."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from installer import codeobjects

HAS_BUILD_TOOLS = shutil.which("cc") is not None and shutil.which("objcopy") is not None
needs_elf = pytest.mark.skipif(not HAS_BUILD_TOOLS, reason="needs cc and objcopy to build a .so")
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")


def bundle(ids: list[str | bytes], blobs: list[bytes] | None = None) -> bytes:
    """An uncompressed __CLANG_OFFLOAD_BUNDLE__ with one (fake, unless given) code object per entry."""
    raw = [i if isinstance(i, bytes) else i.encode() for i in ids]
    head_len = len(codeobjects.BUNDLE_MAGIC) + 8 + sum(24 + len(i) for i in raw)
    blobs = blobs or [b"\x7fELF-code-object-for-" + i for i in raw]
    out, offset = bytearray(codeobjects.BUNDLE_MAGIC + struct.pack("<Q", len(raw))), head_len
    for i, blob in zip(raw, blobs, strict=True):
        out += struct.pack("<QQQ", offset, len(blob), len(i)) + i
        offset += len(blob)
    return bytes(out) + b"".join(blobs)


def zstd_compress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def ccob(inner: bytes, *, method: str = "zlib", version: int = 2) -> bytes:
    """A compressed bundle (clang --offload-compress) around `inner`."""
    body, code = (zlib.compress(inner), 0) if method == "zlib" else (zstd_compress(inner), 1)
    if version == 1:  # no total size: only ever the last bundle
        return b"CCOB" + struct.pack("<HHIQ", 1, code, len(inner), 0) + body
    if version == 2:
        return b"CCOB" + struct.pack("<HHIIQ", 2, code, 24 + len(body), len(inner), 0) + body
    return b"CCOB" + struct.pack("<HHQQQ", 3, code, 32 + len(body), len(inner), 0) + body


def undecodable_zstd_ccob() -> bytes:
    """A zstd bundle header over a body no decoder sees: for tests that take the decoders away."""
    body = b"\x28\xb5\x2f\xfd" + b"\0" * 16  # the zstd frame magic, then nothing usable
    return b"CCOB" + struct.pack("<HHIIQ", 2, 1, 24 + len(body), 64, 0) + body


def ids_for(*archs: str) -> list[str]:
    return ["host-x86_64-unknown-linux-gnu-"] + [f"hipv4-amdgcn-amd-amdhsa--{a}" for a in archs]


def make_so(path: Path, fatbin: bytes | None, tmp: Path, c_source: str = "",
            after: bytes = b"rdna4 test note") -> Path:
    """A real shared object, with `fatbin` as its .hip_fatbin section when given, and a
    section `after` it (in the file and in the section-name table), as a real library has."""
    src = tmp / f"{path.name}.c"
    src.write_text(c_source or "int rdna4_probe_symbol(void) { return 0; }\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    if fatbin is not None:
        blob = tmp / f"{path.name}.fatbin"
        blob.write_bytes(fatbin)
        subprocess.run(["objcopy", "--add-section", f".hip_fatbin={blob}", str(path)], check=True)
        # a second objcopy: one call would put the new name before .hip_fatbin's
        blob.write_bytes(after)
        subprocess.run(["objcopy", "--add-section", f".rdna4_after={blob}", str(path)], check=True)
    return path


def padded(*parts: bytes) -> bytes:
    out = b""
    for part in parts:  # the linker aligns each translation unit's bundle
        out += part + b"\0" * (-len(part) % 4096)
    return out
