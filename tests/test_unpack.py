"""installer.unpack: safety rules, atomic placement, streaming."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from installer import unpack
from installer.errors import InstallerError
from therock_fixtures import EVIL, make_toolchain_tarball


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_extracts_the_tree_with_its_relative_links(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0")
    dest = tmp_path / "prefix" / "rocm-10.1.0"
    assert unpack.extract_tarball(archive, dest) == dest
    assert os.readlink(dest / "llvm") == "lib/llvm"
    assert (dest / "llvm" / "bin" / "clang").resolve() == (dest / "lib/llvm/bin/clang").resolve()
    assert (dest / "amdgcn" / "bitcode" / "ocml.bc").is_file()
    assert os.readlink(dest / "bin" / "amdclang") == "../lib/llvm/bin/clang"
    assert os.access(dest / "bin" / "rocminfo", os.X_OK)
    assert os.stat(dest / "lib/libamdhip64.so").st_ino == os.stat(dest / "lib/libamdhip64.so.7").st_ino
    assert (dest.stat().st_mode & 0o777) == 0o755
    assert _leftovers(dest.parent) == []


def test_replaces_an_existing_tree_atomically(tmp_path):
    dest = tmp_path / "rocm-10.1.0"
    unpack.extract_tarball(make_toolchain_tarball(tmp_path / "a.tar.gz", "10.1.0"), dest)
    (dest / "stale-file").write_text("old")
    unpack.extract_tarball(make_toolchain_tarball(tmp_path / "b.tar.gz", "10.1.0"), dest)
    assert not (dest / "stale-file").exists() and (dest / "bin/rocminfo").is_file()
    assert _leftovers(tmp_path) == []


# the member each EVIL archive is refused for, and why
REFUSED = {
    "traversal": "'./../outside.txt': path contains '..'",
    "absolute_name": "'/tmp/rdna4-absolute-member.txt': absolute path",
    "absolute_link": "'./bin/passwd': absolute link to '/etc/passwd'",
    "escape_link": "'./lib/up': link to '../../outside' leads outside the tree",
    "chain_escape": "'./out': link to 'bin/dot/..' leads outside the tree",
    "dotdot_dir": "'..': path contains '..'",
    "late_escape": "'a': link leads outside the tree",
    "device": "'./dev-null': device, fifo or other special file",
    "fifo": "'./pipe': device, fifo or other special file",
    "hardlink_escape": "'./lib/hard': hard link to '../etc/passwd' outside the tree",
}


@pytest.mark.parametrize("evil", EVIL)
def test_refuses_unsafe_members_and_installs_nothing(tmp_path, evil):
    archive = make_toolchain_tarball(tmp_path / "evil.tar.gz", "10.1.0", evil=evil)
    dest = tmp_path / "prefix" / "rocm"
    dest.parent.mkdir()
    dest.parent.chmod(0o755)
    with pytest.raises(unpack.UnsafeArchive) as err:
        unpack.extract_tarball(archive, dest)
    assert err.value.message == f"evil.tar.gz: refusing member {REFUSED[evil]}"
    assert err.value.hint == "the archive is damaged or malicious; nothing was installed"
    assert not dest.exists()
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o755      # "..": the parent's mode is not touched
    assert _leftovers(dest.parent) == []
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "prefix/outside.txt").exists()
    assert not Path("/tmp/rdna4-absolute-member.txt").exists()


def test_truncated_gzip_is_a_clear_error(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=1 << 20, truncate=True)
    dest = tmp_path / "rocm"
    with pytest.raises(unpack.CorruptArchive, match="truncated or not a valid tarball"):
        unpack.extract_tarball(archive, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_verify_runs_before_the_tree_is_placed(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0")
    dest = tmp_path / "rocm"

    def verify(root: Path) -> None:
        assert root != dest and (root / "bin/rocminfo").is_file()
        raise InstallerError("layout wrong")

    with pytest.raises(InstallerError, match="layout wrong"):
        unpack.extract_tarball(archive, dest, verify=verify)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_strip_components(tmp_path):
    src = tmp_path / "pkg-1.0"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hi")
    os.symlink("sub/f.txt", src / "link")
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="pkg-1.0")
    dest = unpack.extract_tarball(archive, tmp_path / "out", strip_components=1)
    assert (dest / "sub/f.txt").read_text() == "hi" and os.readlink(dest / "link") == "sub/f.txt"


def test_streaming_gives_the_same_tree_and_stale_temp_dirs_go(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=2 << 20)
    dest = tmp_path / "p" / "rocm-10.1.0"
    dest.parent.mkdir()
    (dest.parent / ".rocm-10.1.0.tmp-killed").mkdir()    # what a SIGKILLed run leaves
    data = archive.read_bytes()
    with unpack.StreamExtract(dest) as sx:
        for i in range(0, len(data), 65536):
            sx.write(data[i:i + 65536])
        staged = sx.finish()
        assert staged != dest and not dest.exists() and (staged / "bin/rocminfo").is_file()
        assert sx.publish() == dest
    assert (dest / "lib/librocblas-pad.so").stat().st_size == 2 << 20
    assert os.readlink(dest / "llvm") == "lib/llvm"
    assert _leftovers(dest.parent) == []


def test_streaming_reports_an_unsafe_member_to_the_writer(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", evil="absolute_link",
                                     pad_bytes=4 << 20)
    dest = tmp_path / "rocm"
    data = archive.read_bytes()
    with pytest.raises(unpack.UnsafeArchive, match="absolute link"):
        with unpack.StreamExtract(dest) as sx:
            for i in range(0, len(data), 65536):
                sx.write(data[i:i + 65536])
            sx.finish()
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_streaming_abort_leaves_nothing(tmp_path):
    data = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=2 << 20).read_bytes()
    dest = tmp_path / "rocm"
    with pytest.raises(RuntimeError):
        with unpack.StreamExtract(dest) as sx:
            sx.write(data[: len(data) // 2])
            raise RuntimeError("download failed")
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_disk_full_while_unpacking_removes_the_partial_tree(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=3 << 20)
    dest = tmp_path / "p" / "rocm"
    code = (
        "import resource, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from pathlib import Path\n"
        "from installer import unpack\n"
        "from installer.errors import InstallerError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        "    unpack.extract_tarball(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "except InstallerError as exc:\n"
        "    print(exc.message); sys.exit(3)\n"
    )
    # a real write failure (EFBIG from the file size limit), in a child process
    out = subprocess.run([sys.executable, "-c", code, str(archive), str(dest)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "disk full while unpacking" in out.stdout
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_a_finished_stream_is_not_published_until_asked(tmp_path):
    """The hash is known only after the last byte: a tree unpacked and verified
    but refused afterwards must never reach dest, and an old dest stays."""
    data = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0").read_bytes()
    dest = tmp_path / "p" / "rocm-10.1.0"
    (dest / "bin").mkdir(parents=True)
    (dest / "bin" / "old").write_text("old tree")
    with pytest.raises(InstallerError, match="sha256 mismatch"):
        with unpack.StreamExtract(dest) as sx:
            sx.write(data)
            staged = sx.finish()
            assert (staged / "bin/rocminfo").is_file()
            raise InstallerError("sha256 mismatch")
    assert (dest / "bin" / "old").read_text() == "old tree" and not (dest / "bin/rocminfo").exists()
    assert _leftovers(dest.parent) == []


def test_a_recorded_tree_is_replaced_only_when_all_of_it_is_ours(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0")
    dest = tmp_path / "p" / "rocm-10.1.0"
    unpack.extract_tarball(archive, dest, record=True)
    assert unpack.foreign_path(dest) is None
    unpack.extract_tarball(archive, dest, record=True)          # ours: replaced
    (dest / "lib" / "mine.so").write_text("user")
    with pytest.raises(unpack.NotOurs) as err:
        unpack.extract_tarball(archive, dest, record=True)
    assert err.value.path == dest / "lib" / "mine.so" and (dest / "lib" / "mine.so").exists()
    assert err.value.message == (f"{dest} holds {dest / 'lib' / 'mine.so'}, which rdna4-install did not "
                                 "put there; refusing to replace it")
    assert err.value.hint == (f"move {dest / 'lib' / 'mine.so'} elsewhere and rerun, or rerun with "
                              "--force to delete it")
    assert _leftovers(dest.parent) == []
    unpack.extract_tarball(archive, dest, record=True, force=True)
    assert not (dest / "lib" / "mine.so").exists()


def test_a_sibling_that_shares_the_roots_name_is_outside(tmp_path):
    """tree-sib starts with the name of tree: inside() must compare whole path parts."""
    root, sibling = tmp_path / "tree", tmp_path / "tree-sib"
    root.mkdir()
    sibling.mkdir()
    archive = tmp_path / "sib.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, link in (("./l", "."), ("./s", "l/../tree-sib/x")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, link
            tf.addfile(info)
    with tarfile.open(archive) as tf, pytest.raises(unpack.UnsafeArchive, match="leads outside"):
        unpack._Writer(root, 0, "sib.tar.gz").extract_all(tf)
    assert not os.path.lexists(root / "s")


def _archive(path: Path, rows: list[tuple]) -> Path:
    """A .tar.gz of (name, type, data-or-linkname, mode) rows, in order."""
    import io

    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload, mode in rows:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 1_780_000_000
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload
                tf.addfile(info)
    return path


REG, DIR, SYM, LNK = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


@pytest.mark.parametrize("rows, why", [
    ([("./d", DIR, "", 0o755), ("./d", REG, b"x", 0o644)], "'./d': replaces a directory"),
    ([("./d", REG, b"x", 0o644), ("./l", SYM, "d", 0o777), ("./l", DIR, "", 0o755)],
     "'./l': directory over a link"),
    ([("a\\..\\..\\x", REG, b"x", 0o644)], "'a\\\\..\\\\..\\\\x': path contains '..'"),
    ([("C:/x", REG, b"x", 0o644)], "'C:/x': absolute path"),
    ([("./d", DIR, "", 0o755), ("./h", LNK, "./d", 0o644)],
     "'./h': hard link to './d' which is not a file in the tree"),
    ([("./h", LNK, "./missing", 0o644)], "'./h': hard link to './missing' which is not a file in the tree"),
    ([("./f", REG, b"x", 0o644), ("./d/l", SYM, "../f", 0o777), ("./d/l/x", REG, b"x", 0o644)],
     "'./d/l/x': a file of the archive is in the way of its directory"),
    ([("./f", REG, b"x", 0o644), ("./f", DIR, "", 0o755)],
     "'./f': a file of the archive is in the way of its directory"),
    ([("./up", SYM, "..", 0o777)], "'./up': link to '..' leads outside the tree"),
    ([("./a", SYM, "l/..", 0o777), ("./l", SYM, ".", 0o777), ("./a/x", REG, b"x", 0o644)],
     "'./a/x': its directory is a link that leads outside the tree"),
])
def test_members_that_would_clobber_or_escape(tmp_path, rows, why):
    archive = _archive(tmp_path / "a.tar.gz", rows)
    with pytest.raises(unpack.UnsafeArchive) as err:
        unpack.extract_tarball(archive, tmp_path / "out")
    assert err.value.message == f"a.tar.gz: refusing member {why}"
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_later_member_replaces_an_earlier_one_without_writing_through_a_link(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [
        ("./f", REG, b"first", 0o644), ("./f", REG, b"second", 0o644),
        ("./t", REG, b"target", 0o644), ("./l", SYM, "t", 0o777), ("./l", REG, b"plain", 0o644),
        ("./h", LNK, "./t", 0o644)])
    out = unpack.extract_tarball(archive, tmp_path / "out")
    assert (out / "f").read_text() == "second"
    assert not (out / "l").is_symlink() and (out / "l").read_text() == "plain"
    assert (out / "t").read_text() == "target"
    assert (out / "h").stat().st_ino == (out / "t").stat().st_ino


def test_modes_times_and_no_setuid(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [
        (".", DIR, "", 0o750), ("./ro", DIR, "", 0o555), ("./ro/tool", REG, b"#!/bin/sh\n", 0o4755),
        ("./data", REG, b"d", 0o400)])
    out = unpack.extract_tarball(archive, tmp_path / "out")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)   # noqa: E731
    assert mode(out) == 0o750 and mode(out / "ro") == 0o755       # dirs stay writable by us
    assert mode(out / "ro" / "tool") == 0o755                      # setuid dropped
    assert mode(out / "data") == 0o600                             # always owner-writable
    assert int((out / "ro" / "tool").stat().st_mtime) == 1_780_000_000


def test_strip_drops_the_top_dir_and_its_mode(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [
        ("pkg", DIR, "", 0o700), ("pkg/a", REG, b"a", 0o644), ("pkg/h", LNK, "pkg/a", 0o644)])
    out = unpack.extract_tarball(archive, tmp_path / "out", strip_components=1)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and (out / "a").read_text() == "a"
    assert (out / "h").stat().st_ino == (out / "a").stat().st_ino
    with pytest.raises(unpack.UnsafeArchive, match="outside the stripped tree"):
        unpack.extract_tarball(_archive(tmp_path / "b.tar.gz", [("pkg/h", LNK, "pkg", 0o644)]),
                               tmp_path / "out2", strip_components=1)


def test_temps_of_a_killed_run_are_removed_by_the_next(tmp_path):
    dest = tmp_path / "p" / "rocm"
    (dest.parent / ".rocm.tmp-k1ll3d" / "bin").mkdir(parents=True)
    (dest.parent / ".rocm.old-k1ll3d" / "tree").mkdir(parents=True)
    (dest.parent / ".other.tmp-keep").mkdir()
    unpack.extract_tarball(make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0"), dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == [".other.tmp-keep", "rocm"]


@pytest.mark.parametrize("how", ["no list", "a link"])
def test_a_dest_without_our_list_is_not_ours(tmp_path, how):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0")
    dest = tmp_path / "p" / "rocm"
    if how == "no list":
        unpack.extract_tarball(archive, dest)                # unrecorded: no list
    else:
        theirs = tmp_path / "opt-rocm"
        unpack.extract_tarball(archive, theirs, record=True)  # even a listed tree behind a link
        dest.parent.mkdir()
        os.symlink(theirs, dest)
    with pytest.raises(unpack.NotOurs) as err:
        unpack.extract_tarball(archive, dest, record=True)
    assert err.value.path == dest and err.value.message.startswith(
        f"{dest} was not made by rdna4-install (it has no {unpack.OWNED_LIST};")
    assert os.path.lexists(dest) and _leftovers(dest.parent) == []


def test_a_truncated_archive_says_so_with_a_hint(tmp_path):
    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=1 << 20, truncate=True)
    with pytest.raises(unpack.CorruptArchive) as err:
        unpack.extract_tarball(archive, tmp_path / "out")
    assert err.value.message.startswith("t.tar.gz is truncated or not a valid tarball (")
    assert err.value.hint == "delete the file and rerun to download it again"


def test_disk_full_in_process_names_the_place(tmp_path):
    """The file size limit makes write() fail with EFBIG, as a full disk would."""
    import resource
    import signal

    archive = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=3 << 20)
    dest = tmp_path / "p" / "rocm"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
    try:
        with pytest.raises(InstallerError) as err:
            unpack.extract_tarball(archive, dest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert err.value.message == f"disk full while unpacking t.tar.gz into {dest.parent}"
    assert err.value.hint == "free space there and rerun; the partial tree was removed"
    assert not dest.exists() and _leftovers(dest.parent) == []


def test_streaming_strips_verifies_records_and_guards_like_a_file(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [("pkg", DIR, "", 0o755), ("pkg/bin", DIR, "", 0o755),
                                               ("pkg/bin/tool", REG, b"t", 0o755)])
    dest = tmp_path / "p" / "tree"
    seen = []

    def stream(**kw) -> unpack.StreamExtract:
        sx = unpack.StreamExtract(dest, strip_components=1, verify=seen.append, record=True, what="a", **kw)
        for i in range(0, archive.stat().st_size, 100):
            sx.write(archive.read_bytes()[i:i + 100])
        sx.write(b"")                                     # an empty chunk is no end of data
        return sx

    with stream() as sx:
        with pytest.raises(InstallerError) as err:
            sx.publish()
        assert err.value.message == "publish before finish"
        staged = sx.finish()
        assert seen == [staged] and (staged / "bin/tool").read_text() == "t"
        sx.publish()
    assert (dest / unpack.OWNED_LIST).read_text().splitlines() == ["bin", "bin/tool"]
    (dest / "mine").write_text("x")
    with stream() as sx:
        sx.finish()
        with pytest.raises(unpack.NotOurs):
            sx.publish()
        assert (dest / "mine").exists()
        sx.publish(force=True)
    assert not (dest / "mine").exists() and _leftovers(dest.parent) == []


def test_streaming_reports_a_verify_failure_at_finish(tmp_path):
    data = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0").read_bytes()

    def verify(root: Path) -> None:
        raise InstallerError("layout wrong")

    with pytest.raises(InstallerError, match="layout wrong"):
        with unpack.StreamExtract(tmp_path / "rocm", verify=verify) as sx:
            sx.write(data)
            sx.finish()
    assert not (tmp_path / "rocm").exists() and _leftovers(tmp_path) == []


def test_extract_stream_unpacks_a_plain_tar_from_a_file_object(tmp_path):
    import io

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("hi")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src / "sub", arcname="sub")
    seen = []
    dest = unpack.extract_stream(io.BytesIO(buf.getvalue()), tmp_path / "p" / "tree", verify=seen.append,
                                 what="bundle x")
    assert dest == tmp_path / "p" / "tree" and (dest / "sub" / "f").read_text() == "hi"
    assert len(seen) == 1 and seen[0].parent == dest.parent          # verified while staged
    assert not (dest / unpack.OWNED_LIST).exists()                   # not recorded
    assert _leftovers(dest.parent) == []
    with pytest.raises(unpack.CorruptArchive, match="^bundle x is truncated or not a valid tarball"):
        unpack.extract_stream(io.BytesIO(buf.getvalue()[:700]), tmp_path / "p" / "other", what="bundle x")
    assert not (tmp_path / "p" / "other").exists() and _leftovers(tmp_path / "p") == []


def test_the_staging_tree_is_beside_dest_named_for_the_sweep(tmp_path):
    # a SIGKILLed run leaves it there; the next run (and state.sweep) knows it by that name
    seen = []
    dest = tmp_path / "a" / "b" / "rocm"          # parents are made
    unpack.extract_tarball(make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0"), dest, verify=seen.append)
    assert seen[0].parent == dest.parent and seen[0].name.startswith(".rocm.tmp-")
    assert dest.is_dir()


def test_a_truncated_stream_is_corrupt_and_leaves_nothing(tmp_path):
    data = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0", pad_bytes=1 << 20).read_bytes()
    dest = tmp_path / "rocm"
    with pytest.raises(unpack.CorruptArchive, match="^archive is truncated or not a valid tarball"):
        with unpack.StreamExtract(dest) as sx:
            sx.write(data[: len(data) // 2])
            sx.finish()
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_a_stream_in_small_pieces_with_a_long_tail(tmp_path):
    # tarfile stops reading at the end-of-archive blocks; what follows (padding, the gzip
    # trailer) arrives as many small chunks that must not block the writer
    payload = os.urandom(300_000)
    archive = _archive(tmp_path / "a.tar.gz", [("big", REG, payload, 0o644)])
    data = archive.read_bytes() + b"\0" * 20_000
    dest = tmp_path / "tree"
    with unpack.StreamExtract(dest, what="a") as sx:
        for i in range(0, len(data), 100):
            sx.write(data[i:i + 100])
        sx.finish()
        sx.publish()
    assert (dest / "big").read_bytes() == payload
    assert not (dest / unpack.OWNED_LIST).exists()      # not recorded unless asked


def test_a_failed_rename_puts_the_old_tree_back(tmp_path):
    data = make_toolchain_tarball(tmp_path / "t.tar.gz", "10.1.0").read_bytes()
    dest = tmp_path / "p" / "rocm"
    (dest / "bin").mkdir(parents=True)
    (dest / "bin" / "old").write_text("old tree")
    with unpack.StreamExtract(dest) as sx:
        sx.write(data)
        staged = sx.finish()
        import shutil
        shutil.rmtree(staged)          # the staged tree is gone: the rename onto dest fails
        with pytest.raises(FileNotFoundError):
            sx.publish()
    assert (dest / "bin" / "old").read_text() == "old tree"
    assert _leftovers(dest.parent) == []


def test_a_recorded_tree_lists_the_directories_its_members_imply(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [("a/b/c", REG, b"x", 0o644), ("d//e", REG, b"y", 0o644)])
    dest = tmp_path / "tree"
    unpack.extract_tarball(archive, dest, record=True)
    assert (dest / unpack.OWNED_LIST).read_text().splitlines() == ["a", "a/b", "a/b/c", "d", "d/e"]
    unpack.extract_tarball(archive, dest, record=True)     # all of it is ours: replaced
    assert (dest / "a/b/c").read_text() == "x"


def test_the_refusal_of_an_unlisted_dest_says_why(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", [("f", REG, b"x", 0o644)])
    dest = tmp_path / "tree"
    unpack.extract_tarball(archive, dest)
    with pytest.raises(unpack.NotOurs) as err:
        unpack.extract_tarball(archive, dest, record=True)
    assert err.value.message == (f"{dest} was not made by rdna4-install (it has no {unpack.OWNED_LIST}; an "
                                 "rdna4-install older than that list did not write one); refusing to replace it")


@pytest.mark.parametrize("name", ["c:", "C:x"])
def test_a_drive_letter_is_an_absolute_path(tmp_path, name):
    archive = _archive(tmp_path / "a.tar.gz", [(name, REG, b"x", 0o644)])
    with pytest.raises(unpack.UnsafeArchive, match=f"refusing member '{name}': absolute path"):
        unpack.extract_tarball(archive, tmp_path / "out")


def test_a_hard_link_to_a_symlink_links_the_symlink(tmp_path):
    # as GNU tar does: the link itself, not the file it points to
    archive = _archive(tmp_path / "a.tar.gz", [("f", REG, b"x", 0o644), ("l", SYM, "f", 0o777),
                                               ("h", LNK, "l", 0o644)])
    dest = unpack.extract_tarball(archive, tmp_path / "out")
    assert os.path.islink(dest / "h") and os.readlink(dest / "h") == "f"
    assert os.lstat(dest / "h").st_ino == os.lstat(dest / "l").st_ino
