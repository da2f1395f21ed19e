"""Safe, atomic tarball extraction, from a file or while it downloads.

Members are written by hand rather than with TarFile.extract: that gives one
place for the safety rules (no absolute names, no "..", no device files, no
link that leads out of the tree, checked against the real file system so a
chain of in-tree links cannot escape either), never chowns to the archive's
uids when run as root, and strips setuid bits. Relative links inside the tree
(TheRock's llvm -> lib/llvm) are kept.

Everything goes into a temp dir beside `dest` and is optionally verified; a
whole-file extraction is then renamed onto `dest`, a streamed one only when the
caller calls publish() (after the download's sha256 matched), so neither a
failed, killed nor refused run ever leaves its tree at `dest`.

With `record=True` the tree carries a list of every path it unpacked
(OWNED_LIST); replacing such a tree later refuses when it holds anything else
(a user's file), unless forced, and refuses a `dest` without the list at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

from .errors import InstallerError, Refused

OWNED_LIST = ".rdna4-files"    # in a recorded tree: the paths the installer unpacked
CHUNK = 1 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

Verify = Optional[Callable[[Path], None]]


class UnsafeArchive(Refused):
    pass


class CorruptArchive(Refused):
    pass


class NotOurs(InstallerError):
    """`dest` holds a path the installer did not unpack; `path` names it."""

    def __init__(self, message: str, path: Path, hint: str | None = None):
        super().__init__(message, hint)
        self.path = path


def extract_tarball(archive: Path, dest: Path, *, strip_components: int = 0,
                    verify: Verify = None, record: bool = False, force: bool = False) -> Path:
    """Extract `archive` (any compression tarfile reads) atomically to `dest`."""
    archive = Path(archive)
    with open(archive, "rb") as f:
        return _extract_placed(f, Path(dest), strip_components, verify, archive.name, mode="r|*",
                               record=record, force=force)


def _extract_placed(fileobj, dest: Path, strip: int, verify: Verify, what: str, *, mode: str,
                    record: bool = False, force: bool = False) -> Path:
    tmp = _extract_staged(fileobj, dest, strip, verify, what, mode=mode, record=record)
    try:
        _place(tmp, dest, record=record, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)
        raise
    return dest


def zstd_module():
    """The zstd implementation this Python has: compression.zstd (3.14+), the zstandard
    module, or None."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
        return zstd
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
        return zstandard
    except ImportError:
        return None


def extract_stream(fileobj, dest: Path, *, verify: Verify = None, what: str) -> Path:
    """Extract a plain (already decompressed) tar stream atomically to `dest`."""
    return _extract_placed(fileobj, Path(dest), 0, verify, what, mode="r|")


class StreamExtract:
    """Feed a .tar.gz chunk by chunk (`write`) while a thread unpacks it into a
    staging dir; `finish` waits for it (and `verify`), `publish` renames it onto
    `dest`. Leaving the `with` block without publish removes the staging dir.

    The queue is bounded, so memory stays flat and a slow disk slows the
    download instead of buffering the file in RAM.
    """

    _EOF = b""

    def __init__(self, dest: Path, *, strip_components: int = 0, verify: Verify = None,
                 what: str = "archive", depth: int = 16, record: bool = False):
        self.dest = Path(dest)
        self.record = record
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._staged: Path | None = None
        self._pipe = _QueueReader(self._q)
        # the name and daemon flag change nothing observable (every path joins the thread)
        self._thread = threading.Thread(target=self._run, name="unpack", daemon=True,  # pragma: no mutate
                                        args=(strip_components, verify, what))
        self._thread.start()

    def _run(self, strip: int, verify: Verify, what: str) -> None:
        try:
            self._staged = _extract_staged(self._pipe, self.dest, strip, verify, what,
                                           mode="r|gz", on_done=self._pipe.drain, record=self.record)
        except BaseException as exc:  # handed to the writer's thread
            self._error = exc
            self._pipe.drain()

    def write(self, chunk: bytes) -> None:
        if chunk:
            self._put(chunk)

    def _put(self, chunk: bytes) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                # equivalent timeouts: a failed thread drains the queue, so a put never waits long
                self._q.put(chunk, timeout=0.5)  # pragma: no mutate
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or InstallerError("the unpack thread stopped")

    def finish(self, *_: object) -> Path:
        """Signal the end of the data and wait for the verified staging tree
        (it is not at `dest` yet). Extra arguments are ignored, so it can be
        download.fetch's `accept`."""
        self._put(self._EOF)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._staged is not None
        return self._staged

    def publish(self, force: bool = False) -> Path:
        """Rename the finished tree onto `dest`: call only once the bytes are trusted."""
        if self._staged is None:
            raise InstallerError("publish before finish")
        _place(self._staged, self.dest, record=self.record, force=force)
        self._staged = None
        return self.dest

    def abort(self) -> None:
        self._pipe.cancelled = True
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join()

    def __enter__(self) -> "StreamExtract":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if self._thread.is_alive():
            self.abort()
        if self._staged is not None:    # finished but never published: refused or failed
            shutil.rmtree(self._staged, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)
            self._staged = None


class _Cancelled(Exception):
    pass


class _QueueReader:
    """A read()-able view of a queue of byte chunks (b"" = end, None = abort)."""

    def __init__(self, q: queue.Queue):
        self._q = q
        # None for any of these is equivalent: each is only ever tested for truth
        self._buf = memoryview(b"")  # pragma: no mutate
        self._eof = False  # pragma: no mutate
        self.cancelled = False  # pragma: no mutate

    def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            item = self._q.get()
            if item is None or self.cancelled:
                raise _Cancelled()
            if not item:
                self._eof = True
            self._buf = memoryview(item)
        if n < 0 or n >= len(self._buf):
            out, self._buf = bytes(self._buf), memoryview(b"")
        else:
            out, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return out

    def drain(self) -> None:
        # tarfile stops at the end-of-archive blocks; swallow the gzip trailer
        # and padding so the writer never blocks on a full queue
        while not self._eof:
            try:
                item = self._q.get(timeout=1.0 if self.cancelled else None)
            except queue.Empty:
                return
            if item is None:
                return
            if not item:
                self._eof = True


# --- extraction ------------------------------------------------------------

def _clean_stale(dest: Path) -> None:
    # temp trees of a killed run; the caller holds the prefix lock
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(old, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)
    for old in dest.parent.glob(f".{dest.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)


def _extract_staged(fileobj, dest: Path, strip: int, verify: Verify, what: str, *,
                    mode: str, on_done: Callable[[], None] | None = None,
                    record: bool = False) -> Path:
    """Unpack into a new temp dir beside `dest` and verify it; returns the temp dir."""
    import tarfile
    import zlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        try:
            with tarfile.open(fileobj=fileobj, mode=mode) as tf:
                writer = _Writer(tmp, strip, what)
                writer.extract_all(tf)
            if on_done:
                on_done()
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise CorruptArchive(f"{what} is truncated or not a valid tarball ({exc})",
                                 hint="delete the file and rerun to download it again") from None
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise InstallerError(f"disk full while unpacking {what} into {dest.parent}",
                                     hint="free space there and rerun; the partial tree was removed"
                                     ) from None
            raise
        if verify is not None:
            verify(tmp)
        if record:
            _write_owned(tmp, writer.made)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)
        raise
    return tmp


def _write_owned(tree: Path, made: list[str]) -> None:
    # parents a member implied without a member of their own were made too
    names = {os.path.join(*parts[:i]) for rel in made
             for parts in [rel.split("/")] for i in range(1, len(parts) + 1)}
    (tree / OWNED_LIST).write_text("".join(f"{n}\n" for n in sorted(names)), encoding="utf-8")


def foreign_path(tree: Path) -> Path | None:
    """The first path in `tree` that its OWNED_LIST does not name (`tree` itself
    when it is not a directory or has no list); None when all of it is ours."""
    if os.path.islink(tree) or not os.path.isdir(tree):
        return tree
    try:
        listed = set((tree / OWNED_LIST).read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return tree
    for top, dirs, files in os.walk(tree):
        for name in sorted(dirs + files):
            rel = os.path.relpath(os.path.join(top, name), tree)
            if rel not in listed and rel != OWNED_LIST:
                return Path(top) / name
    return None


def refuse_foreign(dest: Path) -> None:
    """Raise NotOurs when an existing `dest` holds anything the installer did not unpack."""
    if not os.path.lexists(dest):
        return
    stranger = foreign_path(dest)
    if stranger is not None:
        what = (f"was not made by rdna4-install (it has no {OWNED_LIST}; an rdna4-install older "
                "than that list did not write one)" if stranger == dest
                else f"holds {stranger}, which rdna4-install did not put there")
        raise NotOurs(f"{dest} {what}; refusing to replace it", stranger,
                      hint=f"move {stranger} elsewhere and rerun, or rerun with --force to delete it")


def _place(tmp: Path, dest: Path, *, record: bool, force: bool) -> None:
    """Rename tmp onto dest; an old dest is moved aside first, then removed. A
    recorded tree replaces only a dest the installer made, in full, unless forced."""
    old = None
    if os.path.lexists(dest):
        if record and not force:
            refuse_foreign(dest)
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "tree")
    try:
        os.rename(tmp, dest)
    except OSError:
        if old is not None:
            os.rename(old / "tree", dest)
            with contextlib.suppress(OSError):  # pragma: no mutate (only a race makes rmdir fail)
                old.rmdir()     # empty now: leave no .old- dir behind a failed rename
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # pragma: no mutate (equivalent: our own temp)


class _Writer:
    def __init__(self, root: Path, strip: int, what: str):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.strip = strip
        self.what = what
        # a cache of directories already checked ("." is always inside): equivalent without it
        self.safe_dirs: set[str] = {"."}  # pragma: no mutate
        self.links: list[str] = []
        self.made: list[str] = []     # every path unpacked, relative to the root
        # mkdtemp made the root 0700; give it the archive's "." mode or 0755
        self.dirs: list[tuple[str, int]] = [(str(root), 0o755)]

    def refuse(self, name: str, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: refusing member {name!r}: {why}",
                             hint="the archive is damaged or malicious; nothing was installed")

    def rel(self, name: str) -> str | None:
        """Member name -> safe relative path, None if stripped away."""
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise self.refuse(name, "absolute path")
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "path contains '..'")
        parts = parts[self.strip:]
        return "/".join(parts) if parts else None

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def parent_ok(self, name: str, rel: str) -> str:
        """Make the parent dir and check no link on the way leads outside."""
        parent = os.path.dirname(rel) or "."
        if parent not in self.safe_dirs:
            full = os.path.join(self.root, parent)
            if not self.inside(full):
                raise self.refuse(name, "its directory is a link that leads outside the tree")
            self.mkdirs(name, full)
            if not self.inside(full):
                raise self.refuse(name, "its directory is a link that leads outside the tree")
            self.safe_dirs.add(parent)  # pragma: no mutate (a cache: without it the check runs again)
        return os.path.join(self.root, rel)

    def mkdirs(self, name: str, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # an earlier member (a file, or a link to one) stands where a directory must go
            raise self.refuse(name, "a file of the archive is in the way of its directory") from None

    def clear(self, name: str, target: str) -> None:
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target):
                raise self.refuse(name, "replaces a directory")
            os.unlink(target)

    def extract_all(self, tf) -> None:
        for m in tf:
            rel = self.rel(m.name)
            if rel is None:
                if m.isdir() and not self.strip:
                    self.dirs[0] = (str(self.root), m.mode)
                continue
            self.made.append(rel)
            if m.isdir():
                target = self.parent_ok(m.name, rel)
                if os.path.islink(target):
                    raise self.refuse(m.name, "directory over a link")
                self.mkdirs(m.name, target)
                self.dirs.append((target, m.mode))
            elif m.isreg():
                target = self.parent_ok(m.name, rel)
                self.clear(m.name, target)
                self.write_file(tf, m, target)
            elif m.issym():
                self.symlink(m, rel)
            elif m.islnk():
                self.hardlink(m, rel)
            else:
                raise self.refuse(m.name, "device, fifo or other special file")
        # a link made early can be turned outward by links made later
        for link in self.links:
            if not self.inside(link):
                raise self.refuse(os.path.relpath(link, self.root), "link leads outside the tree")
        for target, mode in reversed(self.dirs):
            os.chmod(target, (mode & 0o777) | 0o700)

    def write_file(self, tf, m, target: str) -> None:
        src = tf.extractfile(m)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if src is not None:
                shutil.copyfileobj(src, out, CHUNK)  # pragma: no mutate (equivalent: a buffer size)
            # no setuid/setgid/sticky from an archive
            os.fchmod(out.fileno(), (m.mode & 0o777) | stat.S_IRUSR | stat.S_IWUSR)
        # follow_symlinks is equivalent here: target is the regular file just made with O_NOFOLLOW
        os.utime(target, (m.mtime, m.mtime), follow_symlinks=False)  # pragma: no mutate

    def symlink(self, m, rel: str) -> None:
        link = m.linkname
        if not link or link.startswith("/"):
            raise self.refuse(m.name, f"absolute link to {link!r}")
        lexical = os.path.normpath(os.path.join(os.path.dirname(rel), link))
        if lexical == ".." or lexical.startswith("../"):
            raise self.refuse(m.name, f"link to {link!r} leads outside the tree")
        target = self.parent_ok(m.name, rel)
        if not self.inside(os.path.join(os.path.dirname(target), link)):
            raise self.refuse(m.name, f"link to {link!r} leads outside the tree")
        self.clear(m.name, target)
        os.symlink(link, target)
        self.links.append(target)
        # directories reached through a link must be checked again
        self.safe_dirs = {"."}

    def hardlink(self, m, rel: str) -> None:
        try:
            src_rel = self.rel(m.linkname)
        except UnsafeArchive:
            raise self.refuse(m.name, f"hard link to {m.linkname!r} outside the tree") from None
        if src_rel is None:
            raise self.refuse(m.name, f"hard link to {m.linkname!r} outside the stripped tree")
        src = os.path.join(self.root, src_rel)
        if not self.inside(src) or not os.path.isfile(src):
            raise self.refuse(m.name, f"hard link to {m.linkname!r} which is not a file in the tree")
        target = self.parent_ok(m.name, rel)
        self.clear(m.name, target)
        os.link(src, target, follow_symlinks=False)
