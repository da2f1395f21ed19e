"""codeobjects.archs_in on real ELF files: .hip_fatbin bundles, plain and compressed, and the fallback scan."""

from __future__ import annotations

import subprocess

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

from installer import codeobjects

pytestmark = needs_elf


@pytest.mark.parametrize("wrap", ["plain", "zlib-v1", "zlib-v2", "zlib-v3",
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
    so = make_so(tmp_path / "ext.so", bundle(ids_for("gfx1201")), tmp_path,
                 c_source='const char *rdna4_note = "built once for amdgcn-amd-amdhsa--gfx906";\n')
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
    for name, data in (("junk.so", b"not an elf file at all" * 4), ("empty.so", b"")):
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
    assert err.value.message.startswith("ext.so: ") and err.value.hint


@needs_zstd  # to compress the test data
@pytest.mark.parametrize("decode", codeobjects.ZSTD_DECODERS, ids=lambda d: d.__name__)
def test_each_zstd_decoder_decodes_real_zstd(decode):
    inner = bundle(ids_for("gfx1201")) * 50
    out = decode(zstd_compress(inner), len(inner))
    if out is None:
        pytest.skip(f"{decode.__name__}: not available on this host")
    assert out == inner


def test_no_zstd_decoder_is_unreadable_with_a_hint(tmp_path, monkeypatch):
    # a host with none of the decoders: say what to install, do not guess
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (lambda data, size: None,))
    so = make_so(tmp_path / "ext.so", undecodable_zstd_ccob(), tmp_path)
    with pytest.raises(codeobjects.Unreadable, match="no zstd decoder") as err:
        codeobjects.archs_in(so)
    assert "install zstd" in err.value.hint
