"""Shared fixtures: a clean environment for every test and a CLI runner.

No test may see the real host's GPU, caches or config: HOME, XDG dirs, the
sysfs root, TMPDIR and every RDNA4_/PIP_/UV_ variable are pointed into tmp_path.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import hintcheck
from pins_fixtures import exact_pins  # noqa: F401 (a fixture for every test module)

REPO = Path(__file__).resolve().parent.parent


def _checkout_status() -> set[str]:
    """What `git status` lists in the checkout (empty outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._checkout_before = _checkout_status()  # type: ignore[attr-defined]
    # what commands the installer showed, and which of them tests ran (tests/hintcheck.py); in
    # os.environ from the start, so environments that module fixtures copy carry them too
    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    logs = (base / "hints-shown.jsonl", base / "hints-ran.txt")
    session.config._hint_logs = logs  # type: ignore[attr-defined]
    os.environ[hintcheck.SHOWN], os.environ[hintcheck.RAN] = map(str, logs)
    # module fixtures (the e2e worlds) run before a test's own TMPDIR is set: what they
    # start (uv's build locks, say) leaves its temp files in basetemp, not in /tmp
    session_tmp = base / "session-tmp"
    session_tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(session_tmp)


def _whole_suite(config: pytest.Config) -> bool:
    """No file, -k or -m selection: the run the README's test command makes."""
    tests = REPO / "tests"
    given = [Path(a.split("::")[0]).resolve() for a in config.args]
    return (all(p == tests for p in given) and not config.option.keyword
            and not config.option.markexpr)


def _hint_audit(session: pytest.Session) -> None:
    logs = getattr(session.config, "_hint_logs", None)
    if logs is None or session.testsfailed or not _whole_suite(session.config):
        return
    report = hintcheck.report(*logs)
    if report:
        print("\n" + report, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _hint_audit(session)
    # a test that writes into the checkout (a command run with the repo as its cwd) fails the run
    before = getattr(session.config, "_checkout_before", None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    new = sorted(_checkout_status() - before)
    if new:
        print("\nthe test run changed the checkout:\n  " + "\n  ".join(new), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory) -> Path:
    # one uv cache for the whole session: tests share downloads from the local indexes
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uv_cache: Path) -> Path:
    for key in list(os.environ):
        if key not in (hintcheck.SHOWN, hintcheck.RAN) and key.startswith((
                "RDNA4_", "PIP_", "UV_", "VIRTUAL_ENV", "CONDA", "PYTHONPATH",
                "HSA_", "HIP_", "ROCR_", "ROCM_", "PYTORCH_ROCM")):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    sysfs = tmp_path / "no-gpu-sysfs"
    sysfs.mkdir()
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(sysfs))
    monkeypatch.setenv("UV_CACHE_DIR", str(uv_cache))
    # what the tools a test runs leave in their temp dir (uv's build locks, say) goes
    # with the test's tmp_path instead of piling up in /tmp
    tmp = tmp_path / ".tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return home


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def python() -> str:
    return sys.executable
