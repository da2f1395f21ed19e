"""What a SIGKILLed installer leaves behind, and how the next run deals with it.

Fast, offline companions of tests/test_e2e_kill.py (which kills whole installs):
an orphaned step command, a git mirror with a killed fetch's locks, and the
temp files of killed write-then-rename steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from build_fixtures import git, make_ctx, triton_like_repo

from installer import download, proc, sources, state, wheelcache
from installer.errors import InstallerError
from installer.recipes import Source

REPO = Path(__file__).resolve().parent.parent

# takes the prefix lock, starts a step command through proc, then dies like `kill -9`
KILLED_INSTALLER = """
import os, signal, sys
from pathlib import Path
from installer import proc, state
prefix = Path(sys.argv[1])
state.PrefixLock(prefix).acquire()
child = proc.spawn(["sleep", "60"], env=proc.base_env(), log=prefix / "child.log")
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_next_run_kills_what_a_killed_installer_left_running(tmp_path):
    prefix = tmp_path / "prefix"
    got = subprocess.run([sys.executable, "-c", KILLED_INSTALLER, str(prefix)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)
    assert got.returncode == -signal.SIGKILL, got.stderr
    orphan = int(got.stdout.split()[0])
    try:
        assert _alive(orphan)
        started = time.monotonic()
        lock = state.PrefixLock(prefix).acquire()
        try:
            assert time.monotonic() - started < state.PrefixLock.ORPHAN_WAIT
            for _ in range(100):
                if not _alive(orphan):
                    break
                time.sleep(0.02)
            assert not _alive(orphan)
        finally:
            lock.release()
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


# a user's process (not started by rdna4-install) that holds the children lock,
# with a second process in its group standing in for the user's shell
USER_HOLDER = """
import fcntl, subprocess, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
shell = subprocess.Popen(["sleep", "60"])
print(shell.pid, flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def user_holder(lock: Path):
    """USER_HOLDER running in a session of its own; yields (its PID, its "shell"'s PID)
    and kills its group afterwards."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    user = subprocess.Popen([sys.executable, "-c", USER_HOLDER, str(lock)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        yield user.pid, int(user.stdout.readline())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(user.pid, signal.SIGKILL)
        user.wait()
        user.stdout.close()


def test_a_user_process_holding_the_children_lock_is_never_signalled(tmp_path):
    prefix = tmp_path / "prefix"
    with user_holder(prefix / ".rdna4" / "children.lock") as (pid, shell):
        started = time.monotonic()
        with pytest.raises(InstallerError) as err:
            state.PrefixLock(prefix).acquire()
        assert f"PID {pid}" in err.value.message and "did not start" in err.value.message
        assert f"kill {pid}" in err.value.hint
        assert time.monotonic() - started < state.PrefixLock.ORPHAN_WAIT   # told at once
        time.sleep(0.2)
        assert _alive(pid) and _alive(shell)
    # the prefix lock was given back: once the user's process is gone, it is free
    state.PrefixLock(prefix).acquire().release()


def test_a_noted_group_whose_pid_was_reused_is_not_ours(tmp_path):
    """The record holds the start time: the same PID in a later process is someone else's."""
    lock, record = tmp_path / ".rdna4" / "children.lock", tmp_path / ".rdna4" / "children"
    with user_holder(lock) as (pid, shell):
        record.write_text(f"{pid} 1\n")     # an older process's start time
        assert state.kill_holders(lock, record) == ([], [pid]) and _alive(pid) and _alive(shell)
        record.write_text(f"{pid} {proc.start_time(pid)}\n")
        assert state.kill_holders(lock, record) == ([pid], [])
        for _ in range(500):    # the group's SIGKILL reaches both; under load /proc lags a little
            if not _alive(pid) and not _alive(shell):
                break
            time.sleep(0.02)
        assert not _alive(pid) and not _alive(shell)


def test_a_live_installer_still_blocks_the_prefix(tmp_path):
    """The children lock must not turn a running install into an "orphan"."""
    prefix = tmp_path / "prefix"
    first = state.PrefixLock(prefix).acquire()
    try:
        code = ("import sys; from pathlib import Path; from installer import state\n"
                "try:\n    state.PrefixLock(Path(sys.argv[1])).acquire()\nexcept Exception as e:\n"
                "    print(e)\n    sys.exit(3)")
        holder = subprocess.run([sys.executable, "-c", code, str(prefix)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)
        assert holder.returncode == 3 and f"PID {os.getpid()}" in holder.stdout
    finally:
        first.release()


def test_a_fetch_into_a_mirror_a_killed_fetch_left_locked(tmp_path):
    repo, sha = triton_like_repo(tmp_path / "up" / "triton")
    ctx = make_ctx(tmp_path, "triton-kernels", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "cache",
                   source=Source(kind="git", url=str(repo), commit=sha))
    mirror = sources.mirror_dir(ctx.cache_dir, str(repo))
    mirror.parent.mkdir(parents=True)
    git("init", "-q", "--bare", str(mirror), cwd=tmp_path)
    # what `git fetch` holds while it runs: SIGKILL leaves all of it
    (mirror / "shallow.lock").write_text("")
    (mirror / "refs" / "pins").mkdir(parents=True)
    (mirror / "refs" / "pins" / f"{sha}.lock").write_text("")
    (mirror / "objects" / "incoming-k1ll3d").mkdir()
    (mirror / "objects" / "pack" / "tmp_pack_k1ll3d").write_bytes(b"PACK")

    src = sources.fetch_git(ctx, sparse=["python/triton_kernels"])
    assert git("rev-parse", "HEAD", cwd=src) == sha
    assert not list(mirror.rglob("*.lock")) and not list(mirror.glob("objects/incoming-*"))
    assert not list(mirror.glob("objects/pack/tmp_*"))


def _dead_pid() -> int:
    return int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout)


def test_sweeps_remove_temps_of_dead_writers_only(tmp_path):
    prefix, cache = tmp_path / "p", tmp_path / "cache"
    dead, live = _dead_pid(), os.getpid()
    stale = [prefix / ".rdna4" / "state" / ".torch.json.x1.tmp", prefix / ".rdna4-manifest.json.x1.tmp",
             prefix / f".activate.tmp{dead}", prefix / ".rocm-10.1.0.tmp-x1" / "bin" / "clang",
             prefix / ".rocm-10.1.0.old-x1" / "tree" / "x", cache / "downloads" / f"urls.tmp{dead}",
             cache / "wheels" / "vllm" / f".tmp-{dead}-0123456789ab-x1" / "v.whl"]
    keep = [prefix / ".rdna4" / "state" / "torch.json", prefix / "activate",
            cache / "wheels" / "vllm" / f".tmp-{live}-0123456789ab-x2" / "v.whl",  # a live store()
            cache / "downloads" / "partial" / "abc-x.tar.gz.part"]                   # resumed later
    for path in stale + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    os.symlink("rocm-10.1.0", prefix / f".rocm.link-{dead}")

    state.sweep(prefix)
    wheelcache.sweep(cache)
    download.sweep(cache)

    assert [p for p in stale if p.exists()] == []
    assert not os.path.lexists(prefix / f".rocm.link-{dead}")
    assert [p for p in keep if not p.exists()] == []


def test_orphans_that_outlast_the_wait_stop_the_run_naming_them(tmp_path, monkeypatch):
    """A noted group is killed, but if its processes still hold the children lock when
    ORPHAN_WAIT is over, the run stops and names them (here the wait is cut to nothing)."""
    prefix = tmp_path / "prefix"
    lock, record = prefix / ".rdna4" / "children.lock", prefix / ".rdna4" / "children"
    monkeypatch.setattr(state.PrefixLock, "ORPHAN_WAIT", 0.0)
    with user_holder(lock) as (pid, shell):
        record.write_text(f"{pid} {proc.start_time(pid)}\n")
        with pytest.raises(InstallerError) as err:
            state.PrefixLock(prefix).acquire()
        assert err.value.message == (f"processes left by an interrupted rdna4-install still use {prefix} "
                                     f"(PIDs {pid})")
        assert err.value.hint == "stop them (kill -9 PID) and rerun"
    state.PrefixLock(prefix).acquire().release()    # the prefix lock was given back


def test_a_strangers_hold_is_named_in_full(tmp_path):
    prefix = tmp_path / "prefix"
    lock = prefix / ".rdna4" / "children.lock"
    with user_holder(lock) as (pid, shell):
        with pytest.raises(InstallerError) as err:
            state.PrefixLock(prefix).acquire()
    assert err.value.message == (f"{lock} is held by PID {pid}, which rdna4-install did not start; "
                                 "it signals only processes it started")
    assert err.value.hint == f"stop that process (kill {pid}) and rerun"
