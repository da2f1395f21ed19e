"""Stamps are claims to check (issue 12): a damaged prefix heals on a plain rerun.

One prefix is installed from the loopback world (tests/e2e_fixtures.py), then
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
from e2e_fixtures import (build_world, hint_command, leftovers, one_line_error, receipt_core,
                          recipe_statuses, run_cli, snapshot)

pytestmark = [pytest.mark.network, pytest.mark.slow]

RECIPES = {"therock", "triton-kernels", "torch", "activate", "flash-attention", "vllm"}


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
