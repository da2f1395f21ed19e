"""The one module that starts subprocesses.

Everything else calls `run` (a logged build step), `capture` (a short probe
such as rocminfo or `git rev-parse`) or `spawn` (a server kept running, for
`bench`). Children get an explicit environment and their own process group, so
Ctrl-C, a timeout or a stop kills the whole tree they started (ninja, cc1plus).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .errors import InstallerError, StepFailed

# Variables a child may inherit from the caller. Anything else (PIP_*, UV_*,
# PYTHONPATH, LD_LIBRARY_PATH, CUDA/HIP settings from another install) would
# make a build depend on the user's shell, so steps get them only when the
# recipe's env table sets them explicitly.
ENV_ALLOW = (
    "HOME", "USER", "LOGNAME", "PATH", "SHELL", "TERM", "LANG", "LC_ALL", "LC_CTYPE",
    "TMPDIR", "TZ",
    # proxies and certificates, so downloads work behind a corporate proxy
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    # compiler caches the user set up on purpose
    "CCACHE_DIR", "CCACHE_MAXSIZE",
    # uv's own cache and Python store are shared between prefixes
    "UV_CACHE_DIR", "UV_PYTHON_INSTALL_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME",
)

TAIL_LINES = 30

# Open descriptors every run/spawn child inherits (state.PrefixLock's children
# lock), so processes left running by a killed installer can be found later.
_INHERITED: set[int] = set()


def inherit_fd(fd: int, keep: bool = True) -> None:
    """Pass `fd` to (or, with keep=False, stop passing it to) every child started from now on."""
    if keep:
        _INHERITED.add(fd)
    else:
        _INHERITED.discard(fd)


# Where every run/spawn child's PID (= its process group: each starts a session)
# is noted, with its start time, so the next installer signals only groups this
# one created (state.kill_holders); None = not noted (no prefix lock held).
_CHILDREN_RECORD: Path | None = None


def record_children(path: Path | None) -> None:
    """Note every child started from now on in `path` (None stops it)."""
    global _CHILDREN_RECORD
    _CHILDREN_RECORD = path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22):
    with the PID it names one process, even after the PID is reused. None = gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ")"
    fields = text.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _note_child(pid: int) -> None:
    if _CHILDREN_RECORD is not None:
        with open(_CHILDREN_RECORD, "a", encoding="ascii") as fh:
            fh.write(f"{pid} {start_time(pid) or '?'}\n")


def base_env(extra: Mapping[str, str] | None = None, allow: Iterable[str] = ENV_ALLOW,
             drop: Iterable[str] = ()) -> dict[str, str]:
    """The caller's allow-listed variables, overlaid with `extra`, minus `drop`."""
    env = {k: os.environ[k] for k in allow if k in os.environ}
    env.setdefault("PATH", os.defpath)
    if extra:
        env.update(extra)
    for key in drop:
        env.pop(key, None)
    return env


def which(name: str, path: str | None = None) -> str | None:
    return shutil.which(name, path=path)


def find_uv() -> str | None:
    """The uv on PATH, else the one installed with rdna4-install (the `uv` package)."""
    found = shutil.which("uv")
    if found:
        return found
    try:
        import uv  # the PyPI package that ships the uv binary

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return None


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the leader is gone; make sure no grandchild survives it
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def _start(argv: Sequence[str], **kw) -> subprocess.Popen:
    try:
        child = subprocess.Popen([str(a) for a in argv], start_new_session=True,
                                 pass_fds=tuple(sorted(_INHERITED)), **kw)
        _note_child(child.pid)
        return child
    except FileNotFoundError:
        raise InstallerError(f"command not found: {argv[0]}",
                             hint="install it or check PATH") from None
    except PermissionError:
        raise InstallerError(f"command not executable: {argv[0]}") from None


def run(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | str | None = None,
        log: Path | None = None, on_line: Callable[[str], None] | None = None,
        timeout: float | None = None, what: str | None = None) -> None:
    """Run a step command, streaming stdout+stderr to `log` and `on_line`.

    A non-zero exit raises StepFailed carrying the last lines of output; a
    Ctrl-C kills the child's process group and re-raises.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    logf = open(log, "a", encoding="utf-8", errors="replace") if log else None
    try:
        if logf:
            logf.write(f"$ {' '.join(map(str, argv))}\n")
            logf.flush()
        proc = _start(argv, env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout if timeout else None
        try:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                tail.append(line)
                if logf:
                    logf.write(line + "\n")
                if on_line:
                    on_line(line)
                if deadline and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
            code = proc.wait(timeout=(deadline - time.monotonic()) if deadline else None)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if proc.stdout:
                proc.stdout.close()
        if logf:
            logf.write(f"[exit {code}]\n")
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{what or argv[0]} timed out after {timeout:.0f}s",
                         hint=f"log: {log}" if log else None) from None
    finally:
        if logf:
            logf.close()
    if code != 0:
        err = StepFailed(f"{what or Path(str(argv[0])).name} failed with exit code {code}",
                         hint=f"full log: {log}" if log else None)
        err.tail = list(tail)  # type: ignore[attr-defined]
        raise err


@dataclass(frozen=True)
class Captured:
    returncode: int  # 127 when the program does not exist, -1 on timeout
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def capture(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: Path | str | None = None, timeout: float | None = 60,
            input: str | None = None) -> Captured:
    """Run a short command and return its output; never raises for a bad exit."""
    try:
        proc = subprocess.Popen([str(a) for a in argv], start_new_session=True,
                                env=dict(env) if env is not None else None, cwd=cwd,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        return Captured(127, "", str(exc))
    try:
        out, err = proc.communicate(input=input.encode() if input is not None else None,
                                    timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace=1.0)
        out, err = proc.communicate()
        return Captured(-1, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), True)
    except BaseException:
        _kill_group(proc, grace=1.0)
        raise
    return Captured(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


class Child:
    """A background process (e.g. `vllm serve`) with its output in a log file."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log: Path,
                 cwd: Path | str | None = None):
        self.log = log
        self._logf = open(log, "ab")
        self.proc = _start(argv, env=dict(env), cwd=cwd, stdout=self._logf,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc, grace=grace)
        else:
            try:  # the leader exited; its children may not have
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._logf.close()


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log: Path,
          cwd: Path | str | None = None) -> Child:
    return Child(argv, env=env, log=log, cwd=cwd)
