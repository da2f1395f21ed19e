"""The step engine on small real recipes: order, skip, redo, force, failure, lock, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_fixtures import order, six_recipes, write_recipe
from installer import state
from installer.cli import cli

REPO = Path(__file__).resolve().parent.parent


def install(runner, recipes, prefix, *args):
    return runner.invoke(cli, ["install", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                               "--gpu-arch", "gfx1201", *args])


@pytest.fixture
def tree(tmp_path):
    return six_recipes(tmp_path / "src"), tmp_path / "prefix"


def test_runs_in_dependency_order_then_skips_everything(runner, tree):
    recipes, prefix = tree
    result = install(runner, recipes, prefix)
    assert result.exit_code == 0, result.output
    ran = order(prefix)
    assert sorted(ran) == sorted(["therock", "torch", "triton-kernels", "flash-attention", "vllm", "activate"])
    for later, earlier in [("torch", "therock"), ("flash-attention", "torch"), ("vllm", "torch"),
                           ("vllm", "triton-kernels"), ("activate", "vllm")]:
        assert ran.index(earlier) < ran.index(later)

    again = install(runner, recipes, prefix)
    assert again.exit_code == 0, again.output
    assert order(prefix) == ran, "a rerun with nothing changed must run nothing"
    assert "up to date" in again.output


def test_pin_change_redoes_the_recipe_and_its_dependents_only(runner, tree):
    recipes, prefix = tree
    assert install(runner, recipes, prefix).exit_code == 0
    (prefix / "order.log").unlink()
    plan = runner.invoke(cli, ["plan", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                               "--set", "torch.version=2.0"])
    assert "pin torch.version: 1.0 -> 2.0" in plan.output
    result = install(runner, recipes, prefix, "--set", "torch.version=2.0")
    assert result.exit_code == 0, result.output
    assert order(prefix) == ["torch", "flash-attention", "vllm", "activate"]


def test_patch_change_redoes_only_that_recipe_and_dependents(runner, tree):
    recipes, prefix = tree
    patches = recipes.parent / "patches" / "vllm"
    patches.mkdir(parents=True)
    (patches / "0001-fix.patch").write_text("one\n")
    assert install(runner, recipes, prefix).exit_code == 0
    (prefix / "order.log").unlink()
    (patches / "0001-fix.patch").write_text("two\n")
    plan = runner.invoke(cli, ["plan", "--recipes-dir", str(recipes), "--prefix", str(prefix)])
    assert "patches changed: 0001-fix.patch" in plan.output
    assert "dependency rebuilt: vllm" in plan.output
    assert install(runner, recipes, prefix).exit_code == 0
    assert order(prefix) == ["vllm", "activate"]


def test_env_change_redoes_the_recipe(runner, tree):
    recipes, prefix = tree
    assert install(runner, recipes, prefix).exit_code == 0
    (prefix / "order.log").unlink()
    write_recipe(recipes, "flash-attention", depends=["torch"], env={"GPU_ARCHS": "{archs}"})
    result = install(runner, recipes, prefix)
    assert result.exit_code == 0, result.output
    assert order(prefix) == ["flash-attention"]
    # the env reached the step's process
    stamp = state.read_stamp(prefix, "flash-attention")
    assert stamp["env"]["GPU_ARCHS"] == "{archs}" and stamp["inputs"]["archs"] == ["gfx1201"]


def test_target_change_redoes_everything(runner, tree):
    recipes, prefix = tree
    assert install(runner, recipes, prefix).exit_code == 0
    (prefix / "order.log").unlink()
    assert install(runner, recipes, prefix, "--gpu-arch", "gfx1200,gfx1201").exit_code == 0
    assert len(order(prefix)) == 6


def test_run_force_and_run_without_changes(runner, tree):
    recipes, prefix = tree
    assert install(runner, recipes, prefix).exit_code == 0
    (prefix / "order.log").unlink()
    args = ["--recipes-dir", str(recipes), "--prefix", str(prefix)]
    quiet = runner.invoke(cli, ["run", "vllm", *args])
    assert quiet.exit_code == 0 and order(prefix) == []
    assert "use --force" in quiet.output
    forced = runner.invoke(cli, ["run", "vllm", "--force", *args])
    assert forced.exit_code == 0, forced.output
    # the forced recipe produced the same fingerprint, so its dependents stay
    assert order(prefix) == ["vllm"]
    changed = runner.invoke(cli, ["run", "triton-kernels", *args, "--set", "triton-kernels.version=9"])
    assert changed.exit_code == 0, changed.output
    assert order(prefix) == ["vllm", "triton-kernels", "vllm", "activate"]


def test_only_and_skip(runner, tree):
    recipes, prefix = tree
    result = install(runner, recipes, prefix, "--only", "vllm")
    assert result.exit_code == 2
    assert "vllm needs torch, which is not installed" in result.output
    assert install(runner, recipes, prefix, "--skip", "flash-attention").exit_code == 0
    assert "flash-attention" not in order(prefix)
    assert install(runner, recipes, prefix, "--only", "flash-attention").exit_code == 0
    assert order(prefix)[-1] == "flash-attention"


def test_failing_step_keeps_log_and_work_dir_and_stamps_nothing(runner, tmp_path):
    recipes = six_recipes(tmp_path / "src")
    prefix = tmp_path / "prefix"
    fail = (f'[[steps]]\nname = "compile"\nrun = [{json.dumps(sys.executable)}, "-c", '
            '"import sys\\nfor i in range(50): print(\'line %d\' % i)\\nopen(\'partial.o\',\'w\')\\nsys.exit(3)"]\n')
    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"], steps=fail)
    result = install(runner, recipes, prefix)
    assert result.exit_code == 1
    assert "vllm: vllm: compile failed with exit code 3" in result.output or \
        "vllm: compile failed with exit code 3" in result.output
    assert "line 49" in result.output and "line 19" not in result.output, "only the last 30 lines"
    assert "Traceback" not in result.output
    log = prefix / ".rdna4" / "logs" / "vllm.log"
    assert "line 0" in log.read_text(), "the full log is on disk"
    # and it ends with the error the screen showed, and its hint
    error_lines = [line for line in log.read_text().splitlines() if line.startswith(("# error: ", "# hint: "))]
    assert len(error_lines) == 2 and "compile failed with exit code 3" in error_lines[0]
    assert (prefix / ".rdna4" / "work" / "vllm" / "partial.o").exists(), "work dir kept"
    # the failed command can be rerun by hand, with the same environment
    script = prefix / ".rdna4" / "work" / "vllm" / "last-command.sh"
    assert f"sh '{script}'" in result.output
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert again.returncode == 3 and "line 49" in again.stdout
    stamp = state.read_stamp(prefix, "vllm")
    assert stamp["status"] == "failed" and "fingerprint" not in stamp
    assert "activate" not in order(prefix)
    status = runner.invoke(cli, ["status", "--json", "--recipes-dir", str(recipes), "--prefix", str(prefix)])
    assert status.exit_code == 1
    data = json.loads(status.output)
    rows = {r["recipe"]: r["status"] for r in data["recipes"]}
    assert rows["vllm"] == "failed" and rows["activate"] == "pending" and rows["torch"] == "done"
    assert data["error"] == "failed: vllm"
    # the table: the failed recipe's error line and log path, no trailing spaces
    table = runner.invoke(cli, ["status", "--recipes-dir", str(recipes), "--prefix", str(prefix)])
    assert table.exit_code == 1
    lines = table.output.splitlines()
    assert all(line == line.rstrip() for line in lines)
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["vllm", "failed"])
    assert lines[at + 1].startswith("      error: ") and "compile failed with exit code 3" in lines[at + 1]
    assert lines[at + 2] == f"      log: {log}"
    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    assert receipt["components"]["vllm"]["status"] == "failed"

    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"])
    (prefix / "order.log").unlink()
    plan = runner.invoke(cli, ["plan", "--recipes-dir", str(recipes), "--prefix", str(prefix)])
    assert "last run failed" in plan.output
    assert install(runner, recipes, prefix).exit_code == 0
    assert order(prefix) == ["vllm", "activate"]
    assert not (prefix / ".rdna4" / "work" / "vllm").exists(), "work dir removed after success"


def test_receipt_and_status(runner, tree):
    recipes, prefix = tree
    assert install(runner, recipes, prefix).exit_code == 0
    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    assert receipt["archs"] == ["gfx1201"]
    assert set(receipt["components"]) == {"therock", "torch", "triton-kernels", "flash-attention",
                                          "vllm", "activate"}
    assert receipt["pins"]["vllm"]["version"] == "1.0"
    assert receipt["tools"]["uv"].startswith("uv ")
    for comp in receipt["components"].values():
        assert comp["status"] == "done" and len(comp["fingerprint"]) == 64
        assert comp["version"] == "1.0" and comp["started"] and comp["finished"]
    status = runner.invoke(cli, ["status", "--recipes-dir", str(recipes), "--prefix", str(prefix)])
    assert status.exit_code == 0
    assert status.output.count(" done ") == 6


def test_plan_json_and_verbose(runner, tree):
    recipes, prefix = tree
    result = runner.invoke(cli, ["plan", "--json", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                                 "--gpu-arch", "gfx1201"])
    data = json.loads(result.output)
    assert [s["recipe"] for s in data["steps"]][0] == "therock"
    assert all(s["action"] == "run" and s["reason"] == "not installed" for s in data["steps"])
    assert data["steps"][0]["pins"] == {"therock.version": "1.0"}
    verbose = runner.invoke(cli, ["plan", "-v", "--recipes-dir", str(recipes), "--prefix", str(prefix),
                                  "--gpu-arch", "gfx1201"])
    assert "pin vllm.version = 1.0" in verbose.output
    assert not prefix.exists(), "plan changes nothing"


# --- real processes -------------------------------------------------------------

def _cli_proc(recipes: Path, prefix: Path, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "installer", "install", "--recipes-dir", str(recipes),
                             "--prefix", str(prefix), "--gpu-arch", "gfx1201", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _sleeper_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    recipes = six_recipes(tmp_path / "src")
    pidfile = tmp_path / "child.pid"
    code = (f"import os,time,pathlib; pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid())); "
            "time.sleep(120)")
    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"],
                 steps=f'[[steps]]\nname = "long build"\nrun = [{json.dumps(sys.executable)}, "-c", {json.dumps(code)}]\n')
    return recipes, tmp_path / "prefix", pidfile


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_kills_the_running_child_and_marks_nothing_done(tmp_path, sig):
    recipes, prefix, pidfile = _sleeper_tree(tmp_path)
    proc = _cli_proc(recipes, prefix)
    _wait_for(pidfile)
    child = int(pidfile.read_text())
    assert _alive(child)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the build child must be killed with the installer"
    stamp = state.read_stamp(prefix, "vllm")
    assert stamp["status"] == "incomplete"
    assert state.read_stamp(prefix, "activate") is None


def test_second_installer_on_the_prefix_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    recipes, prefix, pidfile = _sleeper_tree(tmp_path)
    first = _cli_proc(recipes, prefix)
    _wait_for(pidfile)
    second = _cli_proc(recipes, prefix)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 1
    assert f"is in use by another rdna4-install (PID {first.pid})" in out
    assert "Traceback" not in out

    first.kill()  # SIGKILL: no cleanup at all; the lock file stays behind
    first.communicate(timeout=30)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert (prefix / ".rdna4" / "lock").exists()
    write_recipe(recipes, "vllm", depends=["torch", "triton-kernels"])
    third = _cli_proc(recipes, prefix)
    out, _ = third.communicate(timeout=60)
    assert third.returncode == 0, out
    assert state.read_stamp(prefix, "activate")["status"] == "done"


def test_a_rerun_hint_repeats_the_run_with_its_sets_and_pins_file(tmp_path):
    """The hint after a refused download is this run again (selection, --set, --pins,
    --gpu-arch), with the one pin it proposes replacing the user's."""
    from types import SimpleNamespace

    from installer import engine
    from installer.plan import Settings

    settings = Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=tmp_path, archs=("gfx1201",),
                        pins={}, only=("therock",), sets=("therock.version=10.1.1", "therock.sha256=" + "a" * 64),
                        pins_file=Path("my pins.toml"))
    item = SimpleNamespace(name="therock", recipe=SimpleNamespace(source=None), vars={}, patches=())
    ctx = engine._context(item, settings, ui=None, env={})
    tail = f"--pins 'my pins.toml' --gpu-arch gfx1201 --cache-dir {tmp_path / 'c'} --prefix {tmp_path / 'p'}"
    assert ctx.again_command(pin=("therock.sha256", "b" * 64)) == (
        f"rdna4-install install --only therock --set therock.version=10.1.1 --set therock.sha256={'b' * 64} {tail}")
    assert ctx.rerun_command("--force") == (
        f"rdna4-install run therock --force --set therock.version=10.1.1 --set therock.sha256={'a' * 64} {tail}")
