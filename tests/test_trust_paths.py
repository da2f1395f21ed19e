"""Paths (issue 12): what the installer writes for the venv works with any prefix under
any locale, and a prefix no tool could use is refused up front with the reason.

Python < 3.13 decodes .pth files in the locale's encoding (not UTF-8 mode's), so an
absolute non-ASCII path in one kills the venv's interpreter at start-up under
LC_ALL=C. Checked with a real uv venv, and end to end with the loopback world.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_fixtures import build_world, run_cli
from engine_fixtures import run_installer, six_recipes
from installer import pyenv
from installer.proc import find_uv

C_LOCALE = {"LC_ALL": "C", "LANG": "C"}
ODD = "präfix ü ☃"


def _c_locale_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHON"))}
    return {**env, **C_LOCALE}


@pytest.mark.parametrize("where", ["sdk", "toolchain"])
def test_amdsmi_pth_loads_under_the_c_locale_with_a_non_ascii_prefix(tmp_path, where):
    prefix = tmp_path / ODD
    venv = prefix / "venv"
    subprocess.run([find_uv(), "venv", "-q", "--no-config", "--python", sys.executable, str(venv)], check=True)
    site = pyenv.site_packages(venv)
    base = (site / "_rocm_sdk_core" if where == "sdk" else prefix / "rocm") / "share" / "amd_smi"
    (base / "amdsmi").mkdir(parents=True)
    (base / "amdsmi" / "__init__.py").write_text("WHERE = __file__\n")
    assert pyenv.register_amdsmi(site, prefix) == base
    assert (site / pyenv.AMDSMI_PTH).read_bytes().isascii()
    run = subprocess.run([str(venv / "bin" / "python"), "-c", "import amdsmi; print(amdsmi.WHERE)"],
                         env=_c_locale_env(), capture_output=True)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert os.fsdecode(run.stdout.strip()) == str(base / "amdsmi" / "__init__.py")


@pytest.mark.parametrize("name, words", [
    ("a:b", ["contains ':'", "PATH"]),
    ("a\nb", ["control character"]),
    (b"a\xffb", ["not valid UTF-8"]),
])
def test_a_prefix_no_tool_can_use_is_refused_up_front(tmp_path, name, words):
    recipes = six_recipes(tmp_path / "src")
    prefix = os.fsencode(tmp_path) + b"/" + (name if isinstance(name, bytes) else name.encode())
    run = run_installer(recipes, "install", "--gpu-arch", "gfx1201", "--prefix", prefix)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), run.stderr
    assert not os.path.lexists(prefix), "refused before anything was created"


@pytest.mark.network
@pytest.mark.slow
def test_install_and_activation_under_lc_all_c_with_a_non_ascii_prefix(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    with build_world(tmp_path / "world") as world:
        prefix = tmp_path / ODD
        for key, value in C_LOCALE.items():
            monkeypatch.setenv(key, value)   # the world's env (and so the installer's) copies os.environ
        result = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1201",
                         "--no-checks")
        assert result.returncode == 0, result.stderr[-3000:]
        env = {**world.env(home), **C_LOCALE}
        script = (f'. "{prefix}/activate" && python -c "import torch, vllm, flash_attn, amdsmi; '
                  f'print(torch.version.hip)"')
        shell = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env, capture_output=True)
        assert shell.returncode == 0, shell.stderr.decode(errors="replace")[-3000:]
        assert shell.stdout.strip(), "torch reports a HIP version"
