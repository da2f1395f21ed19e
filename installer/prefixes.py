"""Which folders may be a prefix or a cache, and if not, why not (in one line, with
the path and what to do).

Own only what you made: `/`, system folders and the home folder are never a prefix,
and a non-empty folder the installer did not create needs --force. A name no tool
could carry is refused up front. An unwritable prefix or cache is reported as what
it is (read-only file system, immutable, another user's, mode) before either is
created; doctor's disk check asks `write_problem` too.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from .errors import InstallerError, UsageError
from .state import RECEIPT, logs_dir, meta_dir, read_receipt, state_dir, work_root


# Folders that hold other things: a prefix here would mix the installer's files
# (rocm, venv, activate, .rdna4) into the system's or the user's own.
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
               "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
               "/usr", "/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64", "/usr/libexec",
               "/usr/local", "/usr/local/bin", "/usr/local/lib", "/usr/local/share", "/usr/sbin",
               "/usr/share", "/usr/src", "/var", "/var/tmp")
HOME_DIRS = ("", ".local", ".local/share", ".local/bin", ".cache", ".config")


def path_problem(path: Path) -> str:
    """Why the tools that read this prefix would break on its name ("" when none would).
    Any other name works under any locale: nothing the installer writes for the venv
    spells the prefix out in a file Python decodes (the .pth line is relative)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8; the activation scripts and the receipt are UTF-8 text"
    if ":" in text:
        return "contains ':', which splits PATH and LD_LIBRARY_PATH entries (the venv and ROCm go there)"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "contains a control character (newline, tab...), which line-based .pth files and scripts cannot hold"
    return ""


def check_prefix(prefix: Path, *, adopt: bool = False) -> None:
    """Own only what you made: refuse a system folder, the home folder, or a non-empty
    folder the installer did not create (neither PREFIX/.rdna4 nor a receipt), unless
    `adopt` (--force). / and system folders are refused even then."""
    name_problem = path_problem(prefix)
    if name_problem:
        raise UsageError(f"prefix {str(prefix)!r} {name_problem}",
                             hint="choose a --prefix without ':' or control characters, in UTF-8")
    home = Path(os.path.expanduser("~"))
    real = Path(os.path.realpath(prefix))
    system = {Path(p) for p in SYSTEM_DIRS} | {Path(os.path.realpath(home / p)) for p in HOME_DIRS}
    if real in system or Path(os.path.abspath(prefix)) in system:
        raise UsageError(f"prefix {prefix} is a system or home folder; rdna4-install puts rocm, venv "
                             "and activate straight into its prefix",
                             hint=f"use a folder of its own: --prefix '{home}/.local/share/rdna4-install/default'")
    if adopt or not real.is_dir() or os.path.lexists(meta_dir(real)) or read_receipt(real) is not None:
        return   # ours: it has our state folder or our receipt
    try:
        entries = os.listdir(real)
    except OSError:
        return   # check_writable names what is wrong with it
    if entries:
        raise UsageError(f"prefix {prefix} already holds files that rdna4-install did not put there "
                             f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''})",
                             hint=f"use a new or empty folder (--prefix '{prefix}/rdna4'), or add --force "
                                  "to install next to them")


def check_writable(path: Path, what: str = "prefix") -> None:
    """Fail early, in one line naming the path and the real cause, when the prefix
    (or the cache) cannot be created or written; for the prefix, also create .rdna4."""
    problem = write_problem(path, what)
    if problem is not None:
        raise problem
    if what == "prefix":
        check_layout(path)
    try:
        (meta_dir(path) if what == "prefix" else path).mkdir(parents=True, exist_ok=True)
        for folder in (path, meta_dir(path)) if what == "prefix" else (path,):
            tempfile.TemporaryFile(dir=folder).close()   # mkdir alone misses a read-only folder we own
    except OSError as exc:
        raise unwritable(Path(exc.filename or path), exc.errno, what) from None


def write_problem(path: Path, what: str) -> InstallerError | None:
    """Why `path` (prefix or cache) could not be created or written, without writing
    anything (doctor's disk check asks too); None when it can."""
    where = nearest_existing(path)
    if not where.is_dir():
        option = "--prefix" if what == "prefix" else "--cache-dir (or RDNA4_CACHE_DIR)"
        return InstallerError(f"{what} {path} is not a directory ({where} is a file)",
                              hint=f"choose another {option}")
    if os.access(where, os.W_OK | os.X_OK):
        return None
    return unwritable(Path(os.path.abspath(path)), errno.EACCES, what)


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _immutable(path: Path) -> bool:
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, 0x80086601, flags)   # FS_IOC_GETFLAGS
        return bool(flags[0] & 0x10)         # FS_IMMUTABLE_FL
    except OSError:
        return False
    finally:
        os.close(fd)


def unwritable(path: Path, err: int | None, what: str) -> InstallerError:
    """The real reason a write under `path` fails: read-only file system, immutable,
    another user's, or a mode without write permission; with the path and a fix."""
    where = path if path.is_dir() else nearest_existing(path.parent)
    option = "--prefix" if what == "prefix" else "--cache-dir (or RDNA4_CACHE_DIR)"
    try:
        st, ro = where.stat(), os.statvfs(where).f_flag & os.ST_RDONLY
    except OSError:
        st, ro = None, False
    if ro or err == errno.EROFS:
        cause, hint = "is on a read-only file system", f"choose a {what} on a writable disk with {option}"
    elif err == errno.EPERM or _immutable(where):
        cause, hint = ("is immutable (chattr +i)",
                       f"choose another {option}; `lsattr -d '{where}'` shows the i flag")
    elif st is not None and st.st_uid != os.geteuid():
        cause, hint = (f"belongs to another user (uid {st.st_uid})",
                       f"choose a {what} under your home directory with {option}; never use sudo")
    elif st is not None:
        cause, hint = (f"is not writable (mode {stat.S_IMODE(st.st_mode):04o})",
                       f"make it writable (chmod u+w '{where}') or choose another {option}")
    else:
        cause, hint = os.strerror(err or errno.EACCES), f"choose another {option}"
    return InstallerError(f"{what} {path}: {where} {cause}" if where != path else f"{what} {path} {cause}",
                          hint=hint)


def check_layout(prefix: Path) -> None:
    """The installer's own state paths must be what it writes there (folders and
    plain files); anything else in their place is refused by name, not overwritten."""
    folders = [meta_dir(prefix), state_dir(prefix), logs_dir(prefix), work_root(prefix)]
    files = [prefix / RECEIPT, meta_dir(prefix) / "lock", meta_dir(prefix) / "children.lock"]
    if state_dir(prefix).is_dir() and not state_dir(prefix).is_symlink():
        files += sorted(state_dir(prefix).glob("*.json"))
    for path, want in [(p, "folder") for p in folders] + [(p, "file") for p in files]:
        if not os.path.lexists(path):
            continue
        ok = path.is_dir() if want == "folder" else path.is_file()
        if path.is_symlink() or not ok:
            raise InstallerError(f"{path} should be a {want} of rdna4-install's, but is not",
                                 hint=f"remove it (rm -r '{path}') and rerun; a plain install redoes what it held")
