"""What the installer remembers in a prefix: stamps, the lock and the receipt.

A stamp (PREFIX/.rdna4/state/<recipe>.json) is written with write-then-rename,
so a crash leaves either the old stamp or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import InstallerError

RECEIPT = "rdna4-manifest.json"
DONE, FAILED, INCOMPLETE = "done", "failed", "incomplete"


def meta_dir(prefix: Path) -> Path:
    return prefix / ".rdna4"


def state_dir(prefix: Path) -> Path:
    return meta_dir(prefix) / "state"


def logs_dir(prefix: Path) -> Path:
    return meta_dir(prefix) / "logs"


def work_root(prefix: Path) -> Path:
    return meta_dir(prefix) / "work"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:  # pragma: no mutate (json.dump writes ASCII)
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unusable in any way (too
    big, a directory, not UTF-8, not JSON, nested too deep)."""
    from . import bounded

    try:
        return json.loads(bounded.read(path, bounded.STATE_LIMIT).decode("utf-8"))
    except (bounded.Unreadable, ValueError, RecursionError):
        # a state file we cannot read proves nothing: treat it as missing
        return None


# The fields a stamp or the receipt may hold, with their JSON types. A file with a
# field of another type was not written by us (or was damaged) and is ignored
# whole: plan redoes that recipe rather than trusting half of a claim.
STAMP_FIELDS: dict[str, type | tuple] = {
    "status": str, "fingerprint": str, "attempted_fingerprint": str, "version": str, "error": str,
    "started": str, "finished": str, "failed": str,
    "inputs": dict, "facts": dict, "source": dict, "patches": dict, "env": dict, "outputs": dict,
}
INPUT_FIELDS: dict[str, type | tuple] = {
    "recipe": str, "pins": dict, "patches": dict, "env": dict, "source": dict, "archs": list, "deps": dict,
}
RECEIPT_FIELDS: dict[str, type | tuple] = {
    "installer_version": str, "prefix": str, "archs": list, "visible_devices": str, "created": str,
    "updated": str, "tools": dict, "pins": dict, "components": dict, "target": str,
}


def well_formed(data: Any, fields: dict[str, type | tuple]) -> bool:
    return isinstance(data, dict) and all(
        isinstance(data[k], kind) for k, kind in fields.items() if k in data)


def _stamp(data: Any) -> dict[str, Any] | None:
    if not well_formed(data, STAMP_FIELDS) or not well_formed(data.get("inputs", {}), INPUT_FIELDS):
        return None
    if data.get("status") not in (DONE, FAILED, INCOMPLETE):
        return None
    return data


def read_stamp(prefix: Path, name: str) -> dict[str, Any] | None:
    return _stamp(read_json(state_dir(prefix) / f"{name}.json"))


def write_stamp(prefix: Path, name: str, stamp: dict[str, Any]) -> None:
    write_json_atomic(state_dir(prefix) / f"{name}.json", stamp)


def all_stamps(prefix: Path) -> dict[str, dict[str, Any]]:
    out = {}
    folder = state_dir(prefix)
    if not folder.is_dir():
        return {}
    for path in sorted(folder.glob("*.json")):
        data = _stamp(read_json(path))
        if data is not None:
            out[path.stem] = data
    return out


def recorded_downloads(prefix: Path) -> dict[str, str]:
    """url -> sha256 of every download this prefix's stamps (else its receipt)
    say it installed: facts of the shape {"url": ..., "sha256": ...} at any depth."""
    found: dict[str, str] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            url, digest = value.get("url"), value.get("sha256")
            if isinstance(url, str) and isinstance(digest, str) and len(digest) == 64:
                found[url] = digest.lower()
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    receipt = read_receipt(prefix)
    components = receipt.get("components") if isinstance(receipt, dict) else None
    if isinstance(components, dict):
        for component in components.values():
            walk(component.get("facts") if isinstance(component, dict) else None)
    for stamp in all_stamps(prefix).values():    # newer than the receipt after a kill
        walk(stamp.get("facts"))
    return found


# --- the prefix lock -------------------------------------------------------------

class PrefixLock:
    """An flock on PREFIX/.rdna4/lock. The kernel drops it when its holder dies,
    so a lock left by a killed installer is simply taken over.

    The build steps an installer starts run in sessions of their own (so Ctrl-C
    can kill them as a group), which also means they outlive an installer that
    is SIGKILLed or loses its terminal: an orphaned hour-long compile would
    then race the next run in the same work dir. So every child inherits a
    second lock, PREFIX/.rdna4/children.lock; whoever still holds it when the
    next installer has taken the prefix lock is such an orphan and is killed.
    """

    ORPHAN_WAIT = 15.0  # seconds for killed orphans to let go of the children lock

    def __init__(self, prefix: Path):
        self.path = meta_dir(prefix) / "lock"
        self.children_path = meta_dir(prefix) / "children.lock"
        self.record_path = meta_dir(prefix) / "children"     # proc notes each child's group here
        self._fd: int | None = None
        self._children_fd: int | None = None

    def acquire(self) -> "PrefixLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InstallerError(
                f"prefix {self.path.parent.parent} is in use by another rdna4-install (PID {holder})",
                hint="wait for it to finish, or stop that process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        try:
            self._children_fd = self._take_children_lock()
        except BaseException:
            self.release()
            raise
        return self

    def _take_children_lock(self) -> int:
        import fcntl

        from . import proc

        fd = os.open(self.children_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            # we hold the prefix lock, so no live installer has children here
            if deadline is None:
                deadline = time.monotonic() + self.ORPHAN_WAIT
            left, strangers = kill_holders(self.children_path, self.record_path)
            if strangers:
                os.close(fd)
                raise InstallerError(
                    f"{self.children_path} is held by PID {', '.join(map(str, strangers))}, which "
                    "rdna4-install did not start; it signals only processes it started",
                    hint=f"stop that process (kill {' '.join(map(str, strangers))}) and rerun")
            if time.monotonic() > deadline:
                os.close(fd)
                raise InstallerError(
                    f"processes left by an interrupted rdna4-install still use {self.path.parent.parent}"
                    f" (PIDs {', '.join(map(str, left)) or 'unknown'})",
                    hint="stop them (kill -9 PID) and rerun")
            time.sleep(0.05)
        # every process the last run started has let go of the lock: a new record
        with open(self.record_path, "w", encoding="ascii"):
            pass
        proc.record_children(self.record_path)
        proc.inherit_fd(fd)
        return fd

    def release(self) -> None:
        if self._children_fd is not None:
            from . import proc

            proc.inherit_fd(self._children_fd, keep=False)
            proc.record_children(None)
            os.close(self._children_fd)
            self._children_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PrefixLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# What a SIGKILLed run leaves in a prefix: write-then-rename temps (stamps, the
# receipt, activate), unpack temp trees and the PREFIX/rocm link's temp.
PREFIX_TEMPS = (".*.tmp*", ".*.old-*", ".rocm.link-*", ".rdna4/state/.*.tmp")


def sweep(prefix: Path) -> None:
    """Delete the temp files and trees of killed runs; the caller holds the prefix
    lock, so none of them belongs to a live run. (SIGKILL runs no cleanup code.)"""
    import shutil

    for pattern in PREFIX_TEMPS:
        for path in prefix.glob(pattern):
            # ignore_errors and missing_ok are equivalent here: only a race could make them matter
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # pragma: no mutate
            else:
                path.unlink(missing_ok=True)  # pragma: no mutate


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holders(path: Path) -> list[int]:
    """Every other process that has `path` open (read from /proc, so only this
    user's processes)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.stat(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if (link.st_dev, link.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(entry.name))
                break
    return found


def started_groups(record: Path) -> dict[int, str]:
    """pgid -> start time of its leader, as proc noted them in `record`."""
    try:
        # the encoding and the limit are equivalent: the record is ASCII digits, far below it
        text = record.read_text(encoding="ascii", errors="replace")[:1 << 20]  # pragma: no mutate
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        pid, _, started = line.partition(" ")
        if pid.isdigit():
            out[int(pid)] = started.strip()
    return out


def kill_holders(path: Path, record: Path) -> tuple[list[int], list[int]]:
    """SIGKILL the process group of every holder of `path` that an installer
    started (its group is noted in `record`, and its leader, if alive, is the
    process noted). Returns (the holders killed, the holders left alone)."""
    import signal

    from . import proc

    ours = started_groups(record)
    killed, strangers = [], []
    for pid in lock_holders(path):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        leader = proc.start_time(group)
        # a dead leader's PID is not reused while its group lives on, so a noted
        # group with no leader is still the one the installer made
        if group not in ours or group == os.getpgrp() or leader not in (None, ours[group]):
            strangers.append(pid)
            continue
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        killed.append(pid)
    return killed, strangers


# --- the receipt -----------------------------------------------------------------

def write_receipt(prefix: Path, *, archs: tuple[str, ...], pins: dict, tools: dict,
                  installer_version: str, visible_devices: str = "",
                  lock: dict | None = None, target: str = "") -> dict[str, Any]:
    old = read_receipt(prefix) or {}
    stamps = all_stamps(prefix)
    receipt = {
        "installer_version": installer_version,
        "prefix": str(prefix),
        "archs": list(archs),
        # the target profile (recipes/targets/<name>.toml): one prefix holds one
        "target": target or old.get("target", ""),
        "visible_devices": visible_devices,
        "created": old.get("created", now()),
        "updated": now(),
        "tools": tools or old.get("tools", {}),
        "pins": pins,
        # the lock of what this run planned (installer/lock.py); `lock --from-receipt` reads it
        "lock": lock if lock is not None else old.get("lock"),
        "components": {
            name: {k: stamp.get(k) for k in (
                "status", "version", "fingerprint", "facts", "source", "patches", "env",
                "started", "finished")}
            for name, stamp in stamps.items()
        },
    }
    if old.get("tuned"):
        receipt["tuned"] = old["tuned"]   # written by `tune`, not by a recipe
    write_json_atomic(prefix / RECEIPT, receipt)
    return receipt


def read_receipt(prefix: Path) -> dict[str, Any] | None:
    """The receipt, or None when it is missing or not one we wrote (wrong shape)."""
    data = read_json(prefix / RECEIPT)
    if not well_formed(data, RECEIPT_FIELDS):
        return None
    if not all(isinstance(a, str) for a in data.get("archs", [])):
        return None
    if not all(isinstance(v, dict) for k in ("pins", "components") for v in data.get(k, {}).values()):
        return None
    return data
