"""Own only what you made, the prefix part (issue 12): `/`, system folders, the home
folder and a non-empty folder the installer did not create are refused with the
path and what to do; nothing is written; the printed alternatives work.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_fixtures import order, run_installer, six_recipes
from installer import state

GPU = ("--gpu-arch", "gfx1201")


@pytest.fixture
def recipes(tmp_path):
    return six_recipes(tmp_path / "src")


def refused(result, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    hints = [ln for ln in result.stderr.splitlines() if ln.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, result.stderr
    for word in words:
        assert word in errors[0] + hints[0], (word, result.stderr)
    return hints[0]


def test_root_prefix_writes_nothing(recipes):
    before = sorted(os.listdir("/"))
    for args in (["install", "--no-checks"], ["install", "--force"], ["run", "therock", "--force"]):
        refused(run_installer(recipes, *args, *GPU, "--prefix", "/"), "prefix / is a system or home folder")
    assert sorted(os.listdir("/")) == before
    for name in (".rdna4", "rocm", state.RECEIPT, "activate"):
        assert not os.path.lexists(Path("/") / name)


@pytest.mark.parametrize("where", ["/usr", "/etc", "/usr/local", "home", "link-to-usr"])
def test_system_and_home_folders_are_refused(recipes, tmp_path, where):
    home = Path(os.environ["HOME"])
    if where == "home":
        prefix = home
    elif where == "link-to-usr":
        prefix = tmp_path / "usr-link"
        prefix.symlink_to("/usr")
    else:
        prefix = Path(where)
    before = sorted(os.listdir(prefix))
    hint = refused(run_installer(recipes, "install", *GPU, "--prefix", str(prefix)), str(prefix))
    assert sorted(os.listdir(prefix)) == before, "nothing written"
    # the suggested folder works
    suggested = hint.split("--prefix ", 1)[1].strip("'")
    ok = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", suggested)
    assert ok.returncode == 0, ok.stderr


def test_a_foreign_non_empty_folder_needs_force(recipes, tmp_path):
    prefix = tmp_path / "projects"
    prefix.mkdir()
    mine = prefix / "notes.txt"
    mine.write_text("the user's\n")
    hint = refused(run_installer(recipes, "install", *GPU, "--prefix", str(prefix)),
                   str(prefix), "notes.txt", "--force")
    assert sorted(os.listdir(prefix)) == ["notes.txt"], "nothing written"
    plan = run_installer(recipes, "plan", *GPU, "--prefix", str(prefix))
    assert plan.returncode == 0, "reading it is fine"

    # both ways out the hint names work: a folder inside it, or --force
    inside = hint.split("--prefix ", 1)[1].split("'")[1]
    assert run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", inside).returncode == 0
    forced = run_installer(recipes, "install", *GPU, "--no-checks", "--force", "--prefix", str(prefix))
    assert forced.returncode == 0, forced.stderr
    assert mine.read_text() == "the user's\n"
    assert len(order(prefix)) == 6
    # from now on it is the installer's prefix: reruns need no --force
    again = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix))
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr


def test_an_empty_folder_and_an_earlier_prefix_are_fine(recipes, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(empty)).returncode == 0
    # a prefix whose .rdna4 was lost still has our receipt: still ours
    import shutil
    shutil.rmtree(state.meta_dir(empty))
    rerun = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(empty))
    assert rerun.returncode == 0, rerun.stderr
