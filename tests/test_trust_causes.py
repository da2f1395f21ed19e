"""Right causes, with paths (issue 12): each refusal names the path and the real cause
in one line, exits non-zero without a traceback, writes nothing, and the way out
works. Read-only file systems come from a read-only bind mount in a private mount
namespace, "another user's" from running the installer as nobody; both need root
and are skipped without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

from engine_fixtures import order, record_step, run_installer, six_recipes, write_recipe

REPO = Path(__file__).resolve().parent.parent
GPU = ("--gpu-arch", "gfx1201")


@pytest.fixture
def recipes(tmp_path):
    return six_recipes(tmp_path / "src")


def one_line(result, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


def _root_can(*argv: str) -> bool:
    if os.geteuid() != 0 or not shutil.which(argv[0]):
        return False
    return subprocess.run(list(argv), capture_output=True).returncode == 0


def read_only(folder: Path) -> tuple:
    """A wrapper that runs a command with `folder` bind-mounted read-only."""
    if not _root_can("unshare", "-m", "true"):
        pytest.skip("needs root and mount namespaces")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ("unshare", "-m", "sh", "-c", script, str(folder))


# --- prefix and cache: which cause, which path ---------------------------------------------

def test_immutable_prefix(recipes, tmp_path):
    prefix = tmp_path / "frozen"
    prefix.mkdir()
    if not _root_can("chattr", "+i", str(prefix)):
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE)")
    try:
        result = run_installer(recipes, "install", *GPU, "--prefix", str(prefix))
        one_line(result, 1, f"prefix {prefix} is immutable")
        assert "another user" not in result.stderr
    finally:
        subprocess.run(["chattr", "-i", str(prefix)], check=True)
    assert os.listdir(prefix) == []


def test_read_only_prefix_and_cache(recipes, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    wrap = read_only(ro)
    prefix = run_installer(recipes, "install", *GPU, "--prefix", str(ro / "p"), wrapper=wrap)
    one_line(prefix, 1, f"prefix {ro / 'p'}: {ro} is on a read-only file system")
    cache = run_installer(recipes, "install", *GPU, "--prefix", str(tmp_path / "p"),
                          "--cache-dir", str(ro / "cache"), wrapper=wrap)
    one_line(cache, 1, f"cache {ro / 'cache'}: {ro} is on a read-only file system")
    assert not (tmp_path / "p").exists(), "the prefix is not created when the cache is refused"
    doctor = run_installer(recipes, "doctor", *GPU, "--prefix", str(tmp_path / "p"),
                           "--cache-dir", str(ro / "cache"), wrapper=wrap)
    assert doctor.returncode == 1
    disk = next(ln for ln in doctor.stdout.splitlines() if " disk " in ln)
    assert disk.startswith("FAIL") and "read-only file system" in disk, doctor.stdout


def test_another_users_folder(recipes):
    python = f"/usr/bin/python3.{sys.version_info[1]}"
    if not os.path.exists(python) or not _root_can("setpriv", "--reuid", "65534", "true"):
        pytest.skip("needs root, setpriv and a system python")
    # pytest's tmp folders (and the TMPDIR conftest points into them) are private to
    # root; nobody needs a path it can walk, so this one folder goes to /tmp and is removed
    with tempfile.TemporaryDirectory(prefix="rdna4-test-", dir="/tmp") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        owner = base / "roots"
        owner.mkdir(mode=0o755)
        (base / "sysfs").mkdir()
        shutil.copytree(recipes.parent, base / "src")
        deps = Path(click.__file__).parent.parent   # click etc., readable by anyone
        wrap = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                "env", f"HOME={base / 'nobody'}", f"PYTHONPATH={REPO}:{deps}",
                f"RDNA4_SYSFS_ROOT={base / 'sysfs'}", f"XDG_CACHE_HOME={base / 'cache'}")
        result = run_installer(base / "src" / "recipes", "install", *GPU, "--prefix", str(owner / "p"),
                               wrapper=wrap, python=python)
        one_line(result, 1, f"{owner} belongs to another user (uid 0)")
        assert os.listdir(owner) == []


def test_cache_home_that_is_a_file(recipes, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {"XDG_CACHE_HOME": str(blocker)}
    prefix = tmp_path / "p"
    result = run_installer(recipes, "install", *GPU, "--prefix", str(prefix), env=env)
    one_line(result, 1, f"cache {blocker}/rdna4-install is not a directory ({blocker} is a file)")
    assert not prefix.exists()
    doctor = run_installer(recipes, "doctor", *GPU, "--prefix", str(prefix), env=env)
    disk = next(ln for ln in doctor.stdout.splitlines() if " disk " in ln)
    assert doctor.returncode == 1 and disk.startswith("FAIL") and str(blocker) in disk, doctor.stdout
    # the way out the hint names: another cache dir
    ok = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix),
                       "--cache-dir", str(tmp_path / "cache"), env=env)
    assert ok.returncode == 0, ok.stderr


def test_too_little_space_at_the_prefix_blocks_unless_no_checks(tmp_path):
    recipes = six_recipes(tmp_path / "src")
    text = (recipes / "vllm.toml").read_text().replace("depends = ", "disk_gb = 0.05\ndepends = ", 1)
    (recipes / "vllm.toml").write_text(text)
    small = tmp_path / "small"
    small.mkdir()
    if not _root_can("unshare", "-m", "true"):
        pytest.skip("needs root and mount namespaces")
    # the prefix on a 4 MiB file system, the cache on the big one: the prefix alone
    # cannot hold the plan's 50 MiB even though the two together could
    wrap = ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=4m none "$0" && exec "$@"', str(small))
    prefix = small / "p"
    blocked = run_installer(recipes, "install", *GPU, "--prefix", str(prefix), wrapper=wrap)
    one_line(blocked, 1, "disk:", f"prefix {prefix}")
    doctor = run_installer(recipes, "doctor", *GPU, "--prefix", str(prefix), wrapper=wrap)
    disk = next(ln for ln in doctor.stdout.splitlines() if " disk " in ln)
    assert disk.startswith("FAIL") and f"prefix {prefix}" in disk, doctor.stdout
    forced = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix), wrapper=wrap)
    assert forced.returncode == 0, forced.stderr


# --- selection, pins, names -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["install", "--only", "vllm", "--skip", "vllm"],
                                  ["run", "activate", "--skip", "activate"],
                                  ["run", "vllm", "--only", "therock"],
                                  ["run", "nosuch"]])
def test_nothing_selected_or_unknown_writes_nothing(recipes, tmp_path, args):
    prefix = tmp_path / "p"
    result = run_installer(recipes, *args, *GPU, "--prefix", str(prefix))
    one_line(result, 2, "nosuch" if "nosuch" in args else "nothing is selected")
    assert not prefix.exists()


def test_jobs_beyond_the_host_are_capped_with_a_warning(tmp_path):
    recipes = six_recipes(tmp_path / "src")
    code = "open(os.environ['ORDER_LOG'] + '.jobs', 'w').write(os.environ['JOBS'])"
    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"], env={"JOBS": "{jobs}"},
                 steps=record_step("vllm", code))
    prefix = tmp_path / "p"
    result = run_installer(recipes, "install", *GPU, "--no-checks", "--jobs", "10000", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    assert "warning: --jobs 10000 is more than this host can run" in result.stderr
    used = int((prefix / "order.log.jobs").read_text())
    assert 1 <= used <= 2 * (os.cpu_count() or 1)
    doctor = run_installer(recipes, "doctor", *GPU, "--jobs", "10000", "--prefix", str(prefix))
    jobs = next(ln for ln in doctor.stdout.splitlines() if " jobs " in ln)
    assert jobs.startswith("WARN") and f"using {used}" in jobs, doctor.stdout


@pytest.mark.parametrize("how", ["set", "pins"])
def test_an_emptied_pin_fails_at_plan_time_naming_it(recipes, tmp_path, how):
    pins = tmp_path / "mine.toml"
    pins.write_text('[vllm]\nversion = ""\n')
    extra = ["--set", "vllm.version="] if how == "set" else ["--pins", str(pins)]
    for command in ("plan", "install"):
        result = run_installer(recipes, command, *GPU, *extra, "--prefix", str(tmp_path / "p"))
        one_line(result, 2, "pin vllm.version is empty", "--set" if how == "set" else str(pins))
    assert not (tmp_path / "p").exists() and order(tmp_path / "p") == []


def test_a_bad_commit_is_blamed_on_the_override_not_the_recipe(tmp_path, exact_pins):
    result = run_installer(REPO / "recipes", "plan", *GPU, "--offline", "--prefix", str(tmp_path / "p"),
                           "--set", "flash-attention.commit=zzzz")
    one_line(result, 2, "--set flash-attention.commit=zzzz", "'zzzz' is not a full 40-hex SHA")
    assert "flash-attention.toml" not in result.stderr
