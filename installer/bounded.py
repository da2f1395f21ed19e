"""Reading a file the user, or a damaged prefix, may have replaced by anything.

Every state and pins file goes through `read`: it reads at most `limit` bytes
(RDNA4_PINS=/dev/zero must not eat the machine's memory), never blocks on a
FIFO, and turns every way of not being a readable file into `Unreadable` with
one short reason. The callers decide: a stamp that cannot be read proves
nothing (treated as missing); a pins file the user named is an error.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

STATE_LIMIT = 4 << 20    # stamps and the receipt are a few KB
PINS_LIMIT = 1 << 20     # a pins or recipe file is a few KB


class Unreadable(Exception):
    """The file is not there or cannot be used; str() is the reason."""

    def __init__(self, reason: str, *, missing: bool = False):
        super().__init__(reason)
        self.missing = missing


def read(path: Path | str, limit: int) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO in a stamp's place must not hang the installer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise Unreadable("does not exist", missing=True) from None
    except OSError as exc:
        raise Unreadable(_why(exc)) from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise Unreadable("is a directory, not a file")
        chunks, size = [], 0
        while size <= limit:
            try:
                chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            except OSError as exc:
                raise Unreadable(_why(exc)) from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise Unreadable(f"is larger than {limit // 1024} KiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.EISDIR:
        return "is a directory, not a file"
    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return "is not a regular file (it would block)"
    return (exc.strerror or str(exc)).lower()
