"""Which gfx targets a shared object carries GPU code for.

The one reader behind the "check-code-objects" action and `verify`. hipcc
puts each translation unit's offload bundle into the ELF section `.hip_fatbin`
(the name clang's HIP codegen and linker wrapper give it), and each bundle
entry's ID names its target: `hipv4-amdgcn-amd-amdhsa--gfx1201`. Real builds
compress those bundles: vLLM 0.33 adds --offload-compress to its ROCm
extension flags (CMakeLists.txt:1608-1615, to keep _rocm_C under 2 GiB), so a
plain search of the file for the ID strings finds nothing there. The bundles
are decompressed here, in Python, so no ROCm toolchain (clang-offload-bundler)
is needed and `verify` works on a prefix whose toolchain is gone.
"""

from __future__ import annotations

import mmap
import re
import struct
import tempfile
import zlib
from pathlib import Path

from . import proc
from .errors import InstallerError

SECTION = ".hip_fatbin"
BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
COMPRESSED_MAGIC = b"CCOB"
OFFLOAD_ID = re.compile(rb"amdgcn-amd-amdhsa--(gfx[0-9a-f]+)")
ZSTD_HINT = "install zstd (e.g. `apt install zstd`) and run this again"


class Malformed(InstallerError):
    """Not an ELF file, or a bundle that does not parse."""


class Unreadable(InstallerError):
    """Well-formed code objects this host cannot decode (no zstd decoder, a newer format)."""


def archs_in(path: Path) -> set[str]:
    """The gfx targets whose code objects the shared object at `path` carries."""
    path = Path(path)
    try:
        section = elf_section(path, SECTION)
        if section is None:
            return _scan(path)
        return fatbin_archs(section)
    except (struct.error, zlib.error, IndexError, ValueError) as exc:
        raise Malformed(f"{path.name}: the code objects do not parse ({exc})") from None
    except Unreadable as exc:
        raise Unreadable(f"{path.name}: {exc.message}", hint=exc.hint) from None


def _scan(path: Path) -> set[str]:
    # No .hip_fatbin: a host-only library, or a toolchain that leaves the bundle
    # IDs elsewhere as plain strings (the tests' fake clang puts an uncompressed
    # bundle header in .rodata), so the IDs anywhere in the file are all there is.
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return {m.group(1).decode() for m in OFFLOAD_ID.finditer(data)}


def elf_section(path: Path, wanted: str) -> bytes | None:
    """The bytes of one section of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as fh:
        head = fh.read(64)  # pragma: no mutate (equivalent: only the 64-byte header's fields are read)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise Malformed(f"{path.name} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        if shoff == 0 or shnum == 0:
            return None  # no section headers (stripped to the bone): nothing to name
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, str_off, str_size = sections[shstrndx]
        fh.seek(str_off)
        names = fh.read(str_size)
        for name_off, _type, _flags, _addr, offset, size in sections:
            name = names[name_off:names.index(b"\0", name_off)].decode("ascii", "replace")
            if name == wanted:
                fh.seek(offset)
                return fh.read(size)
    return None


def fatbin_archs(fatbin: bytes) -> set[str]:
    """Every gfx target the bundles in a `.hip_fatbin` section carry code for.

    The linker concatenates one bundle per translation unit, each padded to
    its alignment, some compressed and some not (a mixed build is possible).
    """
    archs: set[str] = set()
    pos = 0
    while True:
        hits = [i for i in (fatbin.find(BUNDLE_MAGIC, pos), fatbin.find(COMPRESSED_MAGIC, pos)) if i >= 0]
        if not hits:
            return archs
        pos = min(hits)
        if fatbin.startswith(COMPRESSED_MAGIC, pos):
            inner, pos = _decompress(fatbin, pos)
            ids, _ = _bundle_ids(inner, 0)
        else:
            ids, pos = _bundle_ids(fatbin, pos)
        for entry in ids:
            # e.g. hipv4-amdgcn-amd-amdhsa--gfx1201 or ...--gfx90a:xnack-
            if "amdgcn" in entry and "--" in entry:
                archs.add(entry.rsplit("--", 1)[1].split(":")[0])


def _bundle_ids(data: bytes, pos: int) -> tuple[list[str], int]:
    """Entry IDs of the uncompressed bundle at `pos`, and where it ends."""
    count, = struct.unpack_from("<Q", data, pos + len(BUNDLE_MAGIC))
    at, end, ids = pos + len(BUNDLE_MAGIC) + 8, pos, []
    for _ in range(count):
        offset, size, id_len = struct.unpack_from("<QQQ", data, at)
        ids.append(data[at + 24:at + 24 + id_len].decode("ascii", "replace"))
        at += 24 + id_len
        end = max(end, pos + offset + size)
    return ids, max(end, at)


def _decompress(data: bytes, pos: int) -> tuple[bytes, int]:
    # clang's CompressedOffloadBundle (clang/Driver/OffloadBundler.h): "CCOB",
    # u16 version, u16 method, then v2: u32 total size, u32 uncompressed size;
    # v3: u64, u64; v1: no total size, u32 uncompressed size; then a u64 hash.
    # Method 0 is zlib, 1 is zstd (llvm::compression::Format); those are the
    # only two LLVM has. With no total size, a v1 bundle can only be the last
    # one in the section.
    version, method = struct.unpack_from("<HH", data, pos + 4)
    if version == 1:
        size, = struct.unpack_from("<I", data, pos + 8)
        start, total = pos + 20, len(data) - pos
    elif version == 2:
        total, size = struct.unpack_from("<II", data, pos + 8)
        start = pos + 24
    elif version == 3:
        total, size = struct.unpack_from("<QQ", data, pos + 8)
        start = pos + 32
    else:
        raise Unreadable(f"compressed code-object bundle version {version} is not known",
                         hint="a newer rdna4-install may read it")
    body = data[start:pos + total]
    if method == 0:
        return zlib.decompress(body), pos + total
    if method == 1:
        return _zstd(body, size), pos + total
    raise Unreadable(f"unknown code-object compression method {method}",
                     hint="a newer rdna4-install may read it")


# --- zstd: clang's default when LLVM has it; the standard library only has it from 3.14 ---

def _zstd_module(data: bytes, size: int) -> bytes | None:
    from .unpack import zstd_module

    z = zstd_module()
    if z is None:
        return None
    decode = z.ZstdDecompressor().decompressobj().decompress if z.__name__ == "zstandard" else z.decompress
    try:
        return decode(data)
    except Exception as exc:  # noqa: BLE001 - each library has its own error type
        raise ValueError(f"zstd could not decompress a code-object bundle: {exc}") from None


def _zstd_lib(data: bytes, size: int) -> bytes | None:
    # libzstd.so.1 is on nearly every Linux (systemd, apt and rpm link it).
    # dlopen by soname: ctypes.util.find_library would run ldconfig itself.
    import ctypes

    try:
        lib = ctypes.CDLL("libzstd.so.1")
    except OSError:
        return None
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    if size > 1 << 36:
        raise ValueError(f"a code-object bundle claims {size} bytes uncompressed")
    out = ctypes.create_string_buffer(max(size, 1))  # pragma: no mutate (equivalent: only `got` bytes are kept)
    got = lib.ZSTD_decompress(out, len(out), data, len(data))
    if lib.ZSTD_isError(got):
        raise ValueError("libzstd could not decompress a code-object bundle")
    return out.raw[:got]


def _zstd_cli(data: bytes, size: int) -> bytes | None:
    # through files: proc's pipes carry text, not bytes
    if proc.which("zstd") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.zst", Path(tmp) / "out"  # pragma: no mutate (equivalent: any two names do)
        src.write_bytes(data)
        got = proc.capture(["zstd", "-d", "-q", "-f", "-o", str(dst), str(src)], env=proc.base_env())
        if not got.ok:
            raise ValueError(f"zstd could not decompress a code-object bundle: {got.stderr.strip()[-200:]}")
        return dst.read_bytes()


ZSTD_DECODERS = (_zstd_module, _zstd_lib, _zstd_cli)


def _zstd(data: bytes, size: int) -> bytes:
    for decode in ZSTD_DECODERS:
        out = decode(data, size)
        if out is not None:
            return out
    raise Unreadable("the code objects are zstd-compressed and this host has no zstd decoder",
                     hint=ZSTD_HINT)
