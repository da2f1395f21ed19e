"""The suite leaves nothing behind: a representative run (real builds through the
fake ROCm compiler with uv, engine runs, a cached download) in a child
pytest whose temp directory is private; the entries that appear there are listed
before and after, and must be none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPRESENTATIVE = ["tests/test_builds.py", "tests/test_engine.py", "tests/test_cachefiles.py"]


@pytest.mark.slow
def test_a_representative_run_leaves_no_temp_files(tmp_path):
    tmp = tmp_path / "child-tmp"    # what /tmp is to the child: TMPDIR for it and all it runs
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    before = sorted(p.name for p in tmp.iterdir())
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-m", "not slow", f"--basetemp={tmp_path / 'basetemp'}", *REPRESENTATIVE],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = sorted(p.name for p in tmp.iterdir())
    assert before == after == [], f"left in the temp dir: {sorted(set(after) - set(before))}"
    # nor in the one the child's session gives its module fixtures (conftest.py)
    assert sorted(p.name for p in (tmp_path / "basetemp" / "session-tmp").iterdir()) == []


def test_run_sh_changes_no_python_configuration():
    text = (REPO / "tests/run.sh").read_text()
    code = [line.split("#")[0] for line in text.splitlines()]
    assert not [line for line in code if "BREAK_SYSTEM_PACKAGES" in line or "--user" in line]
    assert "--basetemp" in text and 'rm -rf "$BASETEMP"' in text


@pytest.fixture(scope="module")
def module_tmpdir() -> str:
    return os.environ.get("TMPDIR", "")


def test_module_fixtures_get_a_temp_dir_inside_the_run(module_tmpdir, tmp_path_factory):
    """The e2e worlds are module fixtures, set up before a test's TMPDIR: the uv builds
    they run left uv-setuptools-*.lock files in /tmp until the session set one."""
    base = tmp_path_factory.getbasetemp()
    assert module_tmpdir == str(base / "session-tmp") and Path(module_tmpdir).is_dir()
