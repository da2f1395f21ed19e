"""codeobjects.archs_in on real ELF files: .hip_fatbin bundles, plain and compressed, and the fallback scan."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
import types

import pytest
from build_fixtures import fake_rocm
from codeobject_fixtures import (
    bundle,
    ccob,
    ids_for,
    make_so,
    needs_elf,
    needs_zstd,
    padded,
    undecodable_zstd_ccob,
    zstd_compress,
)

from installer import codeobjects, unpack

pytestmark = needs_elf


@pytest.mark.parametrize("wrap", ["plain", "zlib-v1", "zlib-v2", "zlib-v3",
                                  pytest.param("zstd-v1", marks=needs_zstd),
                                  pytest.param("zstd-v2", marks=needs_zstd),
                                  pytest.param("zstd-v3", marks=needs_zstd)])
def test_plain_and_compressed_bundles_in_the_section(tmp_path, wrap):
    inner = bundle(ids_for("gfx1201", "gfx90a:xnack-"))
    method, _, version = wrap.partition("-v")
    blob = inner if wrap == "plain" else ccob(inner, method=method, version=int(version))
    # v1 cannot be followed by padding: it has no size, so it runs to the section's end
    tail = blob if wrap.endswith("v1") else blob + b"\0" * (-len(blob) % 4096)
    so = make_so(tmp_path / "ext.so", padded(bundle(ids_for("gfx1100"))) + tail, tmp_path)
    assert codeobjects.archs_in(so) == {"gfx1100", "gfx1201", "gfx90a"}


def test_compressed_ids_are_invisible_to_a_plain_string_search(tmp_path):
    # why the section must be decoded: --offload-compress hides the IDs
    so = make_so(tmp_path / "ext.so", ccob(bundle(ids_for("gfx1201")), version=3), tmp_path)
    assert b"gfx1201" not in so.read_bytes()
    assert codeobjects.archs_in(so) == {"gfx1201"}


def test_the_section_wins_over_stray_strings(tmp_path):
    # neither an ID string in .rodata nor a whole bundle in the section after .hip_fatbin counts
    so = make_so(tmp_path / "ext.so", bundle(ids_for("gfx1201")), tmp_path,
                 c_source='const char *rdna4_note = "built once for amdgcn-amd-amdhsa--gfx906";\n',
                 after=bundle(ids_for("gfx1030")))
    assert codeobjects.archs_in(so) == {"gfx1201"}


def test_every_compressed_bundle_in_the_section_counts(tmp_path):
    # one compressed bundle per translation unit, each for its own targets
    fatbin = padded(ccob(bundle(ids_for("gfx1100"))), ccob(bundle(ids_for("gfx1201")), version=3))
    so = make_so(tmp_path / "ext.so", fatbin, tmp_path)
    assert codeobjects.archs_in(so) == {"gfx1100", "gfx1201"}


def test_code_object_bytes_are_not_read_as_a_bundle(tmp_path):
    # a code object is arbitrary binary: the bundle magic inside one is not a bundle
    ids = ids_for("gfx1200", "gfx1201")
    blobs = [b"\x7fELF-host", b"\x7fELF-1200 CCOB\x02\x00junk", b"\x7fELF-1201 CCOB\x09\x00junk"]
    so = make_so(tmp_path / "ext.so", padded(bundle(ids, blobs)) + bundle(ids_for("gfx1100")), tmp_path)
    assert codeobjects.archs_in(so) == {"gfx1100", "gfx1200", "gfx1201"}


def test_an_entry_id_that_is_not_ascii_does_not_hide_the_others(tmp_path):
    ids = ["hipv4-amdgcn-amd-amdhsa--gfx1201", b"host-x86_64-unknown-linux-gnu-\xe9\xff"]
    so = make_so(tmp_path / "ext.so", bundle(ids), tmp_path)
    assert codeobjects.archs_in(so) == {"gfx1201"}


def test_a_section_name_that_is_not_ascii_does_not_stop_the_search(tmp_path):
    # a section before .hip_fatbin whose name is UTF-8
    src = 'const char rdna4_note[] __attribute__((section(".note.r\u00e9sum\u00e9"))) = "x";\n'
    so = make_so(tmp_path / "ext.so", bundle(ids_for("gfx1201")), tmp_path, c_source=src)
    assert b".note.r\xc3\xa9sum\xc3\xa9" in so.read_bytes()
    assert codeobjects.archs_in(so) == {"gfx1201"}


@pytest.mark.parametrize("field", ["e_shoff", "e_shnum"])
def test_without_section_headers_the_ids_in_the_file_count(tmp_path, field):
    # a library stripped of its section header table (sstrip zeroes both fields; either
    # alone means there is no table): the section cannot be found, so scan the file
    so = make_so(tmp_path / "ext.so", bundle(ids_for("gfx1201")), tmp_path)
    data = bytearray(so.read_bytes())
    at, size = {"e_shoff": (0x28, 8), "e_shnum": (0x3C, 2)}[field]
    data[at:at + size] = b"\0" * size
    so.write_bytes(bytes(data))
    assert codeobjects.elf_section(so, codeobjects.SECTION) is None
    assert codeobjects.archs_in(so) == {"gfx1201"}


def test_without_the_section_the_ids_in_the_file_count(tmp_path):
    # what the tests' fake ROCm clang leaves: an uncompressed bundle header in .rodata
    rocm = fake_rocm(tmp_path / "rocm")
    src = tmp_path / "kernel.c"
    src.write_text("int rdna4_kernel(void) { return 1; }\n")
    obj = tmp_path / "kernel.o"
    subprocess.run([str(rocm / "lib/llvm/bin/clang"), "--offload-arch=gfx1201", "--offload-arch=gfx1200",
                    "-fPIC", "-c", "-o", str(obj), str(src)], check=True)
    so = tmp_path / "ext.so"
    subprocess.run(["cc", "-shared", "-o", str(so), str(obj)], check=True)
    assert codeobjects.elf_section(so, codeobjects.SECTION) is None
    assert codeobjects.archs_in(so) == {"gfx1200", "gfx1201"}


def test_a_host_only_library_has_none(tmp_path):
    assert codeobjects.archs_in(make_so(tmp_path / "cumem_allocator.so", None, tmp_path)) == set()


def test_a_non_elf_file_is_malformed(tmp_path):
    elf = make_so(tmp_path / "real.so", bundle(ids_for("gfx1201")), tmp_path).read_bytes()
    assert elf[:6] == b"\x7fELF\x02\x01"  # 64-bit, little-endian
    for name, data in (("junk.so", b"not an elf file at all" * 4), ("empty.so", b""),
                       ("truncated.so", elf[:40]), ("nomagic.so", b"\0" * 4 + elf[4:]),
                       ("elf32.so", elf[:4] + b"\x01" + elf[5:]), ("bigendian.so", elf[:5] + b"\x02" + elf[6:])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(codeobjects.Malformed, match=f"{name} is not a 64-bit little-endian ELF"):
            codeobjects.archs_in(tmp_path / name)


def test_a_damaged_compressed_bundle_is_malformed(tmp_path):
    blob = bytearray(ccob(bundle(ids_for("gfx1201"))))
    blob[30:40] = b"\xff" * 10  # inside the zlib stream
    so = make_so(tmp_path / "ext.so", bytes(blob), tmp_path)
    with pytest.raises(codeobjects.Malformed, match="ext.so: the code objects do not parse"):
        codeobjects.archs_in(so)


@pytest.mark.parametrize("version, method, message", [(9, 0, "version 9 is not known"),
                                                      (2, 7, "compression method 7")])
def test_an_unknown_format_is_unreadable_not_malformed(tmp_path, version, method, message):
    blob = bytearray(ccob(bundle(ids_for("gfx1201"))))
    blob[4:8] = version.to_bytes(2, "little") + method.to_bytes(2, "little")
    so = make_so(tmp_path / "ext.so", bytes(blob), tmp_path)
    with pytest.raises(codeobjects.Unreadable, match=message) as err:
        codeobjects.archs_in(so)
    assert err.value.message.startswith("ext.so: ")
    assert err.value.hint == "a newer rdna4-install may read it"


def _libzstd() -> bool:
    try:
        ctypes.CDLL("libzstd.so.1")
        return True
    except OSError:
        return False


# whether this host has what each decoder uses, found here independently of the decoder
HAS_DECODER = {"_zstd_module": unpack.zstd_module() is not None, "_zstd_lib": _libzstd(),
               "_zstd_cli": shutil.which("zstd") is not None}


@needs_zstd  # to compress the test data
@pytest.mark.parametrize("decode", codeobjects.ZSTD_DECODERS, ids=lambda d: d.__name__)
def test_each_zstd_decoder_decodes_real_zstd(decode):
    inner = bundle(ids_for("gfx1201")) * 50
    out = decode(zstd_compress(inner), len(inner))
    if not HAS_DECODER[decode.__name__]:
        assert out is None  # declines, so the next one is tried
        pytest.skip(f"{decode.__name__}: not available on this host")
    assert out == inner


# `: \S`: the library's or the command's own complaint follows
@pytest.mark.parametrize("decode, message", [
    (codeobjects._zstd_module, r"zstd could not decompress a code-object bundle: \S"),
    (codeobjects._zstd_lib, "libzstd could not decompress a code-object bundle"),
    (codeobjects._zstd_cli, r"zstd could not decompress a code-object bundle: \S")],
    ids=lambda d: getattr(d, "__name__", ""))
def test_a_damaged_zstd_bundle_is_malformed_with_each_decoder(tmp_path, monkeypatch, decode, message):
    if not HAS_DECODER[decode.__name__]:
        pytest.skip(f"{decode.__name__}: not available on this host")
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (decode,))
    so = make_so(tmp_path / "ext.so", undecodable_zstd_ccob(), tmp_path)
    with pytest.raises(codeobjects.Malformed, match=rf"ext.so: the code objects do not parse \({message}"):
        codeobjects.archs_in(so)


def _zstd_cmd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def fake_zstd_module(name: str) -> types.ModuleType:
    """compression.zstd (Python 3.14+) or the zstandard package, when this Python has
    neither: the same calls, backed by the zstd command."""
    z = types.ModuleType(name)
    if name == "zstandard":
        class ZstdDecompressor:
            def decompressobj(self):
                return types.SimpleNamespace(decompress=_zstd_cmd)
        z.ZstdDecompressor = ZstdDecompressor
    else:
        z.decompress = _zstd_cmd
    return z


@needs_zstd
@pytest.mark.parametrize("name", ["compression.zstd", "zstandard"])
def test_the_zstd_module_decoder_uses_each_librarys_api(tmp_path, monkeypatch, name):
    monkeypatch.setattr(unpack, "zstd_module", lambda: fake_zstd_module(name))
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (codeobjects._zstd_module,))
    inner = bundle(ids_for("gfx1201"))
    assert codeobjects._zstd_module(zstd_compress(inner), len(inner)) == inner
    so = make_so(tmp_path / "ext.so", undecodable_zstd_ccob(), tmp_path)
    with pytest.raises(codeobjects.Malformed, match=r"ext.so: the code objects do not parse \(zstd could not "
                                                    r"decompress a code-object bundle: Command .*zstd"):
        codeobjects.archs_in(so)


def test_an_absurd_uncompressed_size_is_refused_before_allocating_it(tmp_path, monkeypatch):
    if not HAS_DECODER["_zstd_lib"]:
        pytest.skip("no libzstd.so.1 on this host")
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (codeobjects._zstd_lib,))
    body = undecodable_zstd_ccob()[24:]
    blob = b"CCOB" + struct.pack("<HHQQQ", 3, 1, 32 + len(body), 1 << 40, 0) + body
    so = make_so(tmp_path / "ext.so", blob, tmp_path)
    with pytest.raises(codeobjects.Malformed, match=f"claims {1 << 40} bytes uncompressed"):
        codeobjects.archs_in(so)


def test_no_zstd_decoder_is_unreadable_with_a_hint(tmp_path, monkeypatch):
    # a host with none of the decoders: say what to install, do not guess
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (lambda data, size: None,))
    so = make_so(tmp_path / "ext.so", undecodable_zstd_ccob(), tmp_path)
    with pytest.raises(codeobjects.Unreadable) as err:
        codeobjects.archs_in(so)
    assert err.value.message == "ext.so: the code objects are zstd-compressed and this host has no zstd decoder"
    assert "install zstd" in err.value.hint
