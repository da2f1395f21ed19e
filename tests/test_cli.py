"""User errors give one line, a hint and a non-zero exit code, never a traceback."""

from __future__ import annotations

import pytest

import hintcheck

from engine_fixtures import order, six_recipes
from installer import __version__
from installer.cli import cli


@pytest.fixture
def recipes(tmp_path):
    return six_recipes(tmp_path / "src")


def invoke(runner, *args):
    result = runner.invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def test_version_and_help(runner):
    assert __version__ in invoke(runner, "--version").output
    out = invoke(runner, "--help").output
    for command in ("install", "plan", "run", "status"):
        assert command in out
    install_help = invoke(runner, "install", "--help").output
    for var in ("RDNA4_PREFIX", "RDNA4_CACHE_DIR", "RDNA4_JOBS", "RDNA4_GPU_ARCH"):
        assert var in install_help


@pytest.mark.parametrize("args, code, words", [
    (["--only", "vlm"], 2, ["unknown recipe 'vlm' in --only", "hint: recipes are:"]),
    (["--skip", "nope"], 2, ["unknown recipe 'nope' in --skip"]),
    (["--without", "nosuch"], 2, ["unknown recipe 'nosuch' in --without", "hint: recipes are:"]),
    (["--set", "vllm.colour=red"], 2, ["unknown pin 'vllm.colour'", "hint: pins are RECIPE.KEY"]),
    (["--set", "novalue"], 2, ["expected RECIPE.KEY=VALUE"]),
    (["--gpu-arch", "gfx1100"], 2, ["gfx1100 is not a supported target", "--allow-unsupported-arch"]),
    (["--gpu-arch", "nvidia"], 2, ["is not a gfx target name"]),
    (["--jobs", "0"], 2, ["Invalid value for '--jobs'"]),
])
def test_bad_input(runner, recipes, tmp_path, args, code, words):
    gpu = [] if any(a.startswith("--gpu-arch") for a in args) else ["--gpu-arch", "gfx1201"]
    result = invoke(runner, "install", "--recipes-dir", str(recipes), "--prefix", str(tmp_path / "p"),
                    *gpu, *args)
    assert result.exit_code == code, result.output
    for word in words:
        assert word in result.output


def test_unsupported_arch_is_allowed_with_a_warning(runner, recipes, tmp_path):
    result = invoke(runner, "install", "--recipes-dir", str(recipes), "--prefix", str(tmp_path / "p"),
                    "--gpu-arch", "gfx1100", "--allow-unsupported-arch")
    assert result.exit_code == 0, result.output
    assert "building for unsupported arch gfx1100" in result.output


def test_unknown_recipe_for_run(runner, recipes, tmp_path):
    result = invoke(runner, "run", "vlm", "--recipes-dir", str(recipes), "--prefix", str(tmp_path / "p"),
                    "--gpu-arch", "gfx1201")
    assert result.exit_code == 2 and "unknown recipe 'vlm' in run" in result.output


def test_unwritable_prefix(runner, recipes, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke(runner, "install", "--recipes-dir", str(recipes), "--prefix", str(blocker / "p"),
                    "--gpu-arch", "gfx1201")
    assert result.exit_code == 1
    assert "is not a directory" in result.output and "hint:" in result.output


def test_malformed_recipe(runner, recipes, tmp_path):
    (recipes / "vllm.toml").write_text('[recipe]\nname = "vllm"\nbogus = 1\n')
    result = invoke(runner, "install", "--recipes-dir", str(recipes), "--prefix", str(tmp_path / "p"),
                    "--gpu-arch", "gfx1201")
    assert result.exit_code == 2
    assert "vllm.toml [recipe]: unknown key 'bogus'" in result.output


def test_bad_option_is_a_usage_error(runner):
    result = invoke(runner, "install", "--frobnicate")
    assert result.exit_code == 2 and "No such option" in result.output


def test_no_gpu_and_no_gpu_arch(runner, recipes, tmp_path):
    result = invoke(runner, "install", "--recipes-dir", str(recipes), "--prefix", str(tmp_path / "p"))
    assert result.exit_code == 2
    assert "no supported GPU found" in result.output and "--gpu-arch gfx1201" in result.output


def test_prefix_without_a_command_means_install(runner, recipes, tmp_path):
    prefix = tmp_path / "p"
    result = invoke(runner, "--prefix", str(prefix), "--recipes-dir", str(recipes), "--gpu-arch", "gfx1201")
    assert result.exit_code == 0, result.output
    assert len(order(prefix)) == 6
    result = invoke(runner, "-q", "--prefix", str(prefix), "--recipes-dir", str(recipes), "--gpu-arch",
                    "gfx1201", "--dry-run")
    assert result.exit_code == 0 and "skip" in result.output


def test_verbose_shows_the_traceback(runner, recipes, tmp_path):
    result = runner.invoke(cli, ["-vv", "install", "--recipes-dir", str(recipes), "--only", "x",
                                 "--prefix", str(tmp_path / "p"), "--gpu-arch", "gfx1201"])
    assert result.exit_code != 0 and result.exception is not None


def test_env_vars_configure_options(runner, recipes, tmp_path, monkeypatch):
    prefix = tmp_path / "from-env"
    monkeypatch.setenv("RDNA4_PREFIX", str(prefix))
    monkeypatch.setenv("RDNA4_GPU_ARCH", "gfx1200")
    monkeypatch.setenv("RDNA4_RECIPES_DIR", str(recipes))
    result = invoke(runner, "install")
    assert result.exit_code == 0, result.output
    assert (prefix / "rdna4-manifest.json").exists()
    assert '"gfx1200"' in (prefix / "rdna4-manifest.json").read_text()


def test_detect_and_doctor_commands_on_a_fake_rdna4_host(runner, tmp_path, monkeypatch):
    import json

    from detect_fixtures import f1_host

    root = tmp_path / "host"
    f1_host(root)
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin") + ":/usr/bin:/bin")
    found = json.loads(invoke(runner, "detect", "--json").output)
    assert found["target"] == ["gfx1201"]
    assert found["gpus"][0]["source"]
    doctor = invoke(runner, "doctor", "--json", "--prefix", str(tmp_path / "p"))
    checks = {c["name"]: c for c in json.loads(doctor.output)["checks"]}
    assert checks["gpu"]["status"] == "pass"
    assert doctor.exit_code == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)


def test_doctor_on_this_gpu_less_host_fails_cleanly(runner, tmp_path):
    result = invoke(runner, "doctor", "--prefix", str(tmp_path / "p"))
    assert result.exit_code == 1
    assert "FAIL  gpu" in result.output and "fix:" in result.output


def test_install_runs_doctors_blocking_checks_first(runner, recipes, tmp_path):
    # a plan that needs more disk than any machine has is refused before anything runs
    text = (recipes / "vllm.toml").read_text().replace('depends = ', 'disk_gb = 1000000000\ndepends = ', 1)
    (recipes / "vllm.toml").write_text(text)
    prefix = tmp_path / "p"
    result = runner.invoke(cli, ["install", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                                 "--gpu-arch", "gfx1201"])
    assert result.exit_code == 1, result.output
    assert "error: disk:" in result.output and "hint:" in result.output
    assert order(prefix) == [], "nothing ran"
    skipped = runner.invoke(cli, ["install", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                                  "--gpu-arch", "gfx1201", "--no-checks"])
    assert skipped.exit_code == 0, skipped.output
    assert len(order(prefix)) == 6


def test_status_lists_recipes_in_dependency_order(runner, recipes, tmp_path):
    import json

    result = runner.invoke(cli, ["status", "--json", "--recipes-dir", str(recipes), "--prefix", str(tmp_path)])
    names = [r["recipe"] for r in json.loads(result.output)["recipes"]]
    assert names.index("therock") < names.index("torch") < names.index("vllm") < names.index("activate")
    assert {r["status"] for r in json.loads(result.output)["recipes"]} == {"pending"}


def test_install_dry_run_changes_nothing(runner, recipes, tmp_path):
    prefix = tmp_path / "p"
    result = invoke(runner, "install", "--dry-run", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                    "--gpu-arch", "gfx1201")
    assert result.exit_code == 0 and result.output.count("will run") == 6
    assert not prefix.exists()


def test_install_without_gpu_or_gpu_arch_gives_plans_advice_before_any_host_check(runner, tmp_path, monkeypatch):
    # a build box where rocminfo exists but the driver is not loaded: doctor would say modprobe
    from detect_fixtures import fake_rocminfo, fixture, gpuless_host

    root = gpuless_host(tmp_path / "root")
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
    exe = fake_rocminfo(tmp_path, fixture("E1"), exit=1)
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    prefix = ["--prefix", str(tmp_path / "p")]
    plan = invoke(runner, "plan", *prefix)
    install = invoke(runner, "install", *prefix)
    assert plan.exit_code == install.exit_code == 2
    errors = [line for line in install.output.splitlines() if line.startswith(("error:", "hint:"))]
    assert errors == [line for line in plan.output.splitlines() if line.startswith(("error:", "hint:"))]
    assert install.output.startswith("error: no supported GPU found")
    assert "pass --gpu-arch gfx1201" in install.output
    assert "modprobe" not in install.output and not (tmp_path / "p").exists()
    # the command the hint names shows why: the driver is not loaded (and what to do)
    why = invoke(runner, *hintcheck.hint_argv(install.output))
    assert why.exit_code == 1 and "amdgpu kernel module is not loaded" in why.output, why.output


def test_status_of_a_prefix_that_does_not_exist_fails(runner, tmp_path):
    missing = tmp_path / "nothing-here"
    result = invoke(runner, "status", "--prefix", str(missing))
    assert result.exit_code == 1
    assert f"error: nothing is installed in {missing}" in result.output
    assert f"hint: install with: rdna4-install install --prefix '{missing}'" in result.output
    assert not missing.exists()
