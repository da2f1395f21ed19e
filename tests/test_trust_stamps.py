"""Stamps are claims to check (issue 12): a damaged prefix heals on a plain rerun.

The fast half uses small real recipes (tests/engine_fixtures.py) that declare
[outputs] of every kind. The end-to-end half: one prefix is installed from the loopback world (tests/e2e_fixtures.py), then
damaged one way at a time: PREFIX/rocm removed, PREFIX/venv removed, bin/rocminfo
replaced by a directory. Each time `plan` and `status` say what is gone, the
commands a user would try next (and the hints printed) work, a plain `install`
heals it, and the receipt is the clean install's again (modulo timestamps). Nothing
outside the prefix and the cache is touched.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from engine_fixtures import order, record_step, run_installer, six_recipes, write_recipe
from e2e_fixtures import (build_world, hint_command, leftovers, one_line_error, receipt_core,
                          recipe_statuses, run_cli, snapshot)


RECIPES = {"therock", "triton-kernels", "torch", "activate", "flash-attention", "vllm"}


GPU = ("--gpu-arch", "gfx1201")
# what a recipe's step does: (re)make its outputs, clearing whatever is in their place
MAKE = ("import os, pathlib, shutil; p = pathlib.Path(os.environ['P']); "
        "[shutil.rmtree(x) for x in (p / 'bin' / 'tool', p / 'current') if x.is_dir() and not x.is_symlink()]; "
        "(p / 'bin').mkdir(parents=True, exist_ok=True); (p / 'bin' / 'tool').write_text('x'); "
        "(p / 'data').mkdir(exist_ok=True); (p / 'tool-1').mkdir(exist_ok=True); "
        "os.path.lexists(p / 'current') or os.symlink('tool-1', p / 'current'); "
        "site = p / 'venv' / 'lib' / 'python3.11' / 'site-packages'; site.mkdir(parents=True, exist_ok=True); "
        "(site / (os.environ['DIST'] + '-1.0.dist-info')).mkdir(exist_ok=True)")


@pytest.fixture
def small(tmp_path):
    """six_recipes, with therock making a file, a folder and a link, torch owning the
    venv and vllm a distribution in it; all declared as [outputs]."""
    recipes = six_recipes(tmp_path / "src")
    write_recipe(recipes, "therock", env={"P": "{prefix}", "DIST": "unused"}, steps=record_step("therock", MAKE),
                 extra='\n[outputs]\nfiles = ["{prefix}/bin/tool"]\ndirs = ["{prefix}/data"]\n'
                       'links = ["{prefix}/current"]\n')
    write_recipe(recipes, "torch", depends=["therock"], env={"P": "{prefix}", "DIST": "torch"},
                 steps=record_step("torch", MAKE), extra='\n[outputs]\ndirs = ["{venv}"]\n')
    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"], env={"P": "{prefix}", "DIST": "vllm"},
                 steps=record_step("vllm", MAKE), extra='\n[outputs]\ndists = ["vllm"]\n')
    prefix = tmp_path / "prefix"
    first = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix))
    assert first.returncode == 0, first.stderr
    (prefix / "order.log").unlink()
    return recipes, prefix


def _plan_line(recipes, prefix, name):
    plan = run_installer(recipes, "plan", *GPU, "--prefix", str(prefix))
    assert plan.returncode == 0, plan.stderr
    return next(ln for ln in plan.stdout.splitlines() if f" {name} " in ln)


@pytest.mark.parametrize("damage, words", [
    (lambda p: (p / "bin" / "tool").unlink(), "bin/tool is missing"),
    (lambda p: ((p / "bin" / "tool").unlink(), (p / "bin" / "tool").mkdir()), "bin/tool is not a file"),
    (lambda p: shutil.rmtree(p / "data"), "data is missing"),
    (lambda p: shutil.rmtree(p / "tool-1"), "current points at tool-1, which is missing"),
    (lambda p: ((p / "current").unlink(), (p / "current").mkdir()), "current is not a link"),
])
def test_each_kind_of_output_is_checked_and_healed(small, damage, words):
    recipes, prefix = small
    damage(prefix)
    line = _plan_line(recipes, prefix, "therock")
    assert "will run" in line and words in line, line
    status = run_installer(recipes, "status", "--prefix", str(prefix))
    assert "damaged" in status.stdout and words in status.stdout, status.stdout
    heal = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix))
    assert heal.returncode == 0, heal.stderr
    assert order(prefix) == ["therock"], "only the damaged recipe is redone"
    assert "will run" not in _plan_line(recipes, prefix, "therock")


def test_a_recipe_in_a_tree_its_dependency_rebuilds_is_redone_with_it(small):
    recipes, prefix = small
    site = prefix / "venv" / "lib" / "python3.11" / "site-packages"
    shutil.rmtree(site / "vllm-1.0.dist-info")
    assert "vllm is not installed in" in _plan_line(recipes, prefix, "vllm")
    heal = run_installer(recipes, "install", *GPU, "--no-checks", "--prefix", str(prefix))
    assert heal.returncode == 0 and order(prefix) == ["vllm"], heal.stderr
    (prefix / "order.log").unlink()
    # torch redone (its venv recreated) takes vllm, which lives in that venv, with it
    forced = run_installer(recipes, "run", "torch", "--force", "--dry-run", "--prefix", str(prefix))
    line = next(ln for ln in forced.stdout.splitlines() if " vllm " in ln)
    assert "will run" in line and "redone with torch" in line, forced.stdout


def test_declaring_outputs_changes_no_fingerprint_and_outputs_stay_inside(small, tmp_path):
    recipes, prefix = small
    path = recipes / "flash-attention.toml"
    path.write_text(path.read_text() + '\n[outputs]\nfiles = ["{prefix}/bin/tool"]\n')
    assert "up to date" in _plan_line(recipes, prefix, "flash-attention"), "not rebuilt for it"
    path.write_text(path.read_text().replace('"{prefix}/bin/tool"', '"{prefix}/../elsewhere"'))
    bad = run_installer(recipes, "plan", *GPU, "--prefix", str(prefix))
    assert bad.returncode == 2 and "is not inside the prefix" in bad.stderr and "Traceback" not in bad.stderr


def test_doctor_counts_a_damaged_recipe_in_its_disk_estimate(small):
    recipes, prefix = small
    text = (recipes / "therock.toml").read_text().replace("depends = ", "disk_gb = 7\ndepends = ", 1)
    (recipes / "therock.toml").write_text(text)
    def need():
        doctor = run_installer(recipes, "doctor", *GPU, "--prefix", str(prefix))
        return next(ln for ln in doctor.stdout.splitlines() if " disk " in ln)
    assert "need about 0 GiB" in need()
    (prefix / "bin" / "tool").unlink()
    assert "need about 7 GiB" in need()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with build_world(tmp_path_factory.mktemp("world")) as w:
        yield w


@pytest.fixture(scope="module")
def installed(world, tmp_path_factory):
    """A clean install and its receipt; the cases below damage and heal it in turn."""
    home = tmp_path_factory.mktemp("home")
    prefix = tmp_path_factory.mktemp("inst") / "prefix"
    first = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks")
    assert first.returncode == 0, first.stderr[-4000:]
    return home, prefix, receipt_core(prefix)


def _lines(core: dict) -> list[str]:
    # line by line, so a failure shows the one fact that differs
    return json.dumps(core, indent=1, sort_keys=True).splitlines()


def _outside(world, home, prefix):
    return snapshot(world.root, home, prefix.parent,
                    ignore=(prefix, world.root / "cache", home / ".cache"))


def _heals(world, home, prefix, clean, *, redone: set[str]):
    """`status` names the damage; a plain install redoes exactly `redone` and nothing
    else; afterwards the receipt is the clean one and nothing outside was touched."""
    before = _outside(world, home, prefix)
    statuses = recipe_statuses(world, home, prefix)
    assert {n for n, s in statuses.items() if s == "damaged"} <= redone, statuses
    heal = run_cli(world, home, "install", "--prefix", str(prefix), "--no-checks")
    assert heal.returncode == 0, heal.stderr[-4000:]
    assert "Traceback" not in heal.stderr
    ran = {line.split()[2] for line in heal.stderr.splitlines() if line.startswith("==> [")}
    assert ran == redone, heal.stderr
    assert _lines(receipt_core(prefix)) == _lines(clean)
    assert recipe_statuses(world, home, prefix) == {n: "done" for n in RECIPES}
    again = run_cli(world, home, "plan", "--prefix", str(prefix))
    assert "will run" not in again.stdout, again.stdout
    assert _outside(world, home, prefix) == before, "a run touched files outside the prefix and cache"
    assert leftovers(prefix) == []


@pytest.mark.network
@pytest.mark.slow
def test_removed_rocm_link_is_named_and_healed(world, installed):
    home, prefix, clean = installed
    (prefix / "rocm").unlink()
    plan = run_cli(world, home, "plan", "--prefix", str(prefix))
    assert plan.returncode == 0, plan.stderr
    line = next(ln for ln in plan.stdout.splitlines() if " therock " in ln)
    assert "will run" in line and f"{prefix}/rocm is missing" in line, plan.stdout
    status = run_cli(world, home, "status", "--prefix", str(prefix))
    assert f"{prefix}/rocm is missing" in status.stdout, status.stdout
    _heals(world, home, prefix, clean, redone={"therock"})


@pytest.mark.network
@pytest.mark.slow
def test_removed_venv_redoes_everything_built_into_it(world, installed):
    home, prefix, clean = installed
    shutil.rmtree(prefix / "venv")
    plan = run_cli(world, home, "plan", "--prefix", str(prefix))
    torch = next(ln for ln in plan.stdout.splitlines() if " torch " in ln)
    assert "will run" in torch and f"{prefix}/venv is missing" in torch, plan.stdout
    for name in ("flash-attention", "vllm"):
        line = next(ln for ln in plan.stdout.splitlines() if f" {name} " in ln)
        assert "will run" in line, plan.stdout

    # what a user might try first: only vLLM. It cannot work without the venv; the
    # refusal names the cause and its hint is a command that heals the prefix
    only = run_cli(world, home, "run", "vllm", "--prefix", str(prefix))
    one_line_error(only, 2, f"{prefix}/venv is missing")
    assert not (prefix / "venv").exists(), "refused before doing anything"
    hint = hint_command(only)
    assert hint[:1] == ["install"], hint
    _heals_with(world, home, prefix, clean, hint)


def _heals_with(world, home, prefix, clean, argv):
    result = run_cli(world, home, *argv, *(["--no-checks"] if argv[0] == "install" else []))
    assert result.returncode == 0, result.stderr[-4000:]
    assert _lines(receipt_core(prefix)) == _lines(clean)
    assert recipe_statuses(world, home, prefix) == {n: "done" for n in RECIPES}


@pytest.mark.network
@pytest.mark.slow
def test_rocminfo_replaced_by_a_directory(world, installed):
    home, prefix, clean = installed
    rocminfo = prefix / "rocm" / "bin" / "rocminfo"
    rocminfo.unlink()
    rocminfo.mkdir()
    plan = run_cli(world, home, "plan", "--prefix", str(prefix))
    line = next(ln for ln in plan.stdout.splitlines() if " therock " in ln)
    assert "will run" in line and f"{rocminfo} is not a file (it is a directory)" in line, plan.stdout
    _heals(world, home, prefix, clean, redone={"therock"})
    assert rocminfo.is_file() and os.access(rocminfo, os.X_OK)


@pytest.mark.network
@pytest.mark.slow
def test_run_honours_only_and_skip(world, installed):
    home, prefix, clean = installed
    shutil.rmtree(prefix / "venv")   # torch and everything in its venv now need redoing
    try:
        forced = run_cli(world, home, "run", "therock", "--force", "--only", "therock", "--prefix", str(prefix))
        assert forced.returncode == 0, forced.stderr[-3000:]
        ran = [line.split()[2] for line in forced.stderr.splitlines() if line.startswith("==> [")]
        assert ran == ["therock"], forced.stderr
        skipped = run_cli(world, home, "run", "torch", "--skip", "vllm", "--skip", "flash-attention",
                          "--prefix", str(prefix), "--dry-run")
        assert skipped.returncode == 0, skipped.stderr
        runs = {ln.split()[2] for ln in skipped.stdout.splitlines() if "will run" in ln}
        assert runs == {"torch"}, skipped.stdout
        nothing = run_cli(world, home, "run", "vllm", "--skip", "vllm", "--prefix", str(prefix))
        one_line_error(nothing, 2, "nothing is selected")
    finally:
        _heals_with(world, home, prefix, clean, ["install", "--prefix", str(prefix)])


@pytest.mark.network
@pytest.mark.slow
def test_a_damage_stat_cannot_see_fails_with_a_hint_that_heals(world, installed):
    home, prefix, clean = installed
    python = prefix / "venv" / "bin" / "python"
    python.unlink()                     # still a file, but no Python: only running it tells
    python.write_text("#!/bin/sh\nexit 3\n")
    python.chmod(0o755)
    failed = run_cli(world, home, "run", "vllm", "--force", "--prefix", str(prefix))
    one_line_error(failed, 1, "the venv python does not run")
    hint = hint_command(failed)
    assert hint[:3] == ["run", "torch", "--force"], hint
    _heals_with(world, home, prefix, clean, hint)
