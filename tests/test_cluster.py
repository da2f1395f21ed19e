"""`--with ray` and `rdna4-install cluster`: Ray from the real PyPI in a prefix built from the
local stand-ins (tests/e2e_fixtures.py), a real head node started, queried, used and stopped.

Only Ray processes this test started are ever stopped: `cluster stop` refuses while a Ray
node from elsewhere runs, and the cleanup kills only processes naming this test's temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import hintcheck
from e2e_fixtures import REPO, build_world

from installer import cluster, state
from installer.errors import InstallerError, UsageError


# --- no network: the guards ------------------------------------------------------------------

def _fake_proc(root: Path, pid: int, comm: str, exe: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    os.symlink(exe, d / "exe")


def test_stop_guard_finds_ray_nodes_of_other_installs_only(tmp_path):
    venv = tmp_path / "prefix" / "venv"
    ours = venv / "lib/python3.12/site-packages/ray/core/src/ray/raylet/raylet"
    procs = tmp_path / "proc"
    _fake_proc(procs, 101, "raylet", str(ours))
    _fake_proc(procs, 102, "gcs_server", "/opt/other/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server")
    _fake_proc(procs, 103, "python3", "/usr/bin/python3")
    (procs / "self").mkdir()
    assert cluster.foreign_nodes(venv, procs) == [
        (102, "/opt/other/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server")]


def test_verbs_need_ray_and_join_needs_an_address(tmp_path):
    with pytest.raises(InstallerError, match="Ray is not installed") as exc:
        cluster.argv(tmp_path, "status")
    assert exc.value.hint == f"rdna4-install run ray activate --with ray --prefix '{tmp_path}'"
    ray = tmp_path / "venv" / "bin" / "ray"
    ray.parent.mkdir(parents=True)
    ray.write_text("")
    with pytest.raises(UsageError, match="join needs the head's ADDRESS"):
        cluster.argv(tmp_path, "join")
    assert cluster.argv(tmp_path, "join", "10.0.0.1:6379", ["--num-cpus", "1"]) == [
        str(ray), "start", "--address", "10.0.0.1:6379", "--num-cpus", "1"]
    assert cluster.argv(tmp_path, "head", None, ["--port", "6380"])[1:] == ["start", "--head", "--port", "6380"]


def test_a_verb_other_than_join_takes_no_address(tmp_path):
    ray = tmp_path / "venv" / "bin" / "ray"
    ray.parent.mkdir(parents=True)
    ray.write_text("")
    with pytest.raises(UsageError, match="status takes no ADDRESS"):
        cluster.argv(tmp_path, "status", "10.0.0.1:6379")


def _ray_step(runner, prefix: Path, *extra: str) -> dict:
    from installer.cli import cli

    result = runner.invoke(cli, ["plan", "--json", "--prefix", str(prefix), "--gpu-arch", "gfx1201", *extra])
    assert result.exit_code == 0, result.output
    return {s["recipe"]: s for s in json.loads(result.output)["steps"]}["ray"]


def test_with_ray_is_kept_by_reruns_until_set_off(tmp_path, runner, exact_pins):
    prefix = tmp_path / "p"
    assert _ray_step(runner, prefix)["reason"].startswith("not needed: ray.enabled is false")
    assert _ray_step(runner, prefix, "--with", "ray")["action"] == "run"
    # what the last install recorded keeps Ray in a plain rerun
    state.write_json_atomic(prefix / state.RECEIPT, {"archs": ["gfx1201"], "pins": {"ray": {"enabled": "true"}}})
    assert _ray_step(runner, prefix)["action"] == "run"
    assert _ray_step(runner, prefix, "--set", "ray.enabled=false")["action"] == "skip"


# --- real Ray from PyPI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with build_world(tmp_path_factory.mktemp("world")) as w:
        yield w


def _cli(world, home: Path, *args: str, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    env = world.env(home)
    env.update(PYTHONPATH=str(REPO), RDNA4_NO_CHECKS="1", **extra)
    return subprocess.run([sys.executable, "-m", "installer", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=home)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_ours(marker: str) -> list[int]:
    """SIGKILL the processes whose command line names `marker` (this test's temp dir)."""
    killed = []
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if marker in (pid / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid.name), signal.SIGKILL)
                killed.append(int(pid.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


WORKER = """
import json, os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR")
@ray.remote(num_cpus=1)
def env():
    return {k: os.environ.get(k) for k in ("VLLM_ROCM_USE_AITER", "RAY_USAGE_STATS_ENABLED",
            "RDNA4_PREFIX", "ROCM_PATH", "PYTORCH_ROCM_ARCH", "VIRTUAL_ENV", "HSA_OVERRIDE_GFX_VERSION",
            "NCCL_SOCKET_IFNAME")}
# one task pinned to each node: the head's workers and the joined node's
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
refs = [env.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
print("RESULT " + json.dumps(ray.get(refs, timeout=45)))
"""


@pytest.mark.network
@pytest.mark.slow
def test_with_ray_then_a_local_head_that_workers_see_the_activation_in(world, tmp_path, tmp_path_factory):
    home = tmp_path / "home"      # conftest's clean_env made it
    prefix = tmp_path / "p"
    base = _cli(world, home, "install", "--prefix", prefix, "--gpu-arch", "gfx1201",
                "--only", "therock", "--only", "torch", "--only", "activate")
    assert base.returncode == 0, base.stderr[-3000:]

    # without Ray the cluster commands say how to add it, and that command works
    missing = _cli(world, home, "cluster", "status", "--prefix", prefix)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    hint = next(ln for ln in missing.stderr.splitlines() if ln.startswith("hint: "))
    added = _cli(world, home, *hintcheck.hint_argv(hint))
    assert added.returncode == 0, added.stderr[-3000:]

    receipt = state.read_receipt(prefix)
    assert receipt["pins"]["ray"] == {"enabled": "true", "version": "2.56.1",
                                      "index_url": "https://pypi.org/simple"}
    assert receipt["components"]["ray"]["status"] == "done"
    assert receipt["components"]["ray"]["version"] == "2.56.1"
    text = (prefix / "activate").read_text()
    assert "export RAY_USAGE_STATS_ENABLED=0\n" in text and "unset CUDA_VISIBLE_DEVICES\n" in text
    # a rerun without --with keeps Ray (and so the activation's Ray variables)
    plan = _cli(world, home, "plan", "--prefix", prefix, "--json")
    steps = {s["recipe"]: s for s in json.loads(plan.stdout)["steps"]}
    assert steps["ray"]["reason"] == "up to date" and steps["activate"]["reason"] == "up to date"

    # Ray's socket paths under --temp-dir must stay below 108 bytes: a short pytest dir
    port, temp = _free_port(), tmp_path_factory.mktemp("r")
    if cluster.foreign_nodes(prefix / "venv"):
        pytest.skip("a Ray node of another install runs on this machine; this test never stops it")
    foreign = None
    try:
        # the user's own settings for the link between nodes reach Ray too, and a stray
        # override from the caller's shell does not
        head = _cli(world, home, "cluster", "head", "--prefix", prefix, "--port", port, "--num-cpus", "1",
                    "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", temp, timeout=300,
                    NCCL_SOCKET_IFNAME="lo", HSA_OVERRIDE_GFX_VERSION="11.0.0")
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        assert "Ray runtime started" in head.stdout
        assert (prefix / ".rdna4" / "logs" / "cluster.log").read_text().count("ray start --head") == 1

        # a second node joins (on the same machine here, as Ray allows)
        join = _cli(world, home, "cluster", "join", f"127.0.0.1:{port}", "--prefix", prefix, "--num-cpus", "1",
                    "--num-gpus", "0", "--temp-dir", temp, timeout=300,
                    NCCL_SOCKET_IFNAME="lo", HSA_OVERRIDE_GFX_VERSION="11.0.0")
        assert join.returncode == 0, join.stdout[-3000:] + join.stderr[-3000:]

        # the autoscaler reports a few seconds after the nodes are up ("No cluster status" before)
        deadline = time.monotonic() + 90
        while True:
            status = _cli(world, home, "cluster", "status", "--prefix", prefix, "--address",
                          f"127.0.0.1:{port}", timeout=120)
            assert status.returncode == 0, status.stderr[-3000:]
            if "0.0/2.0 CPU" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        active = status.stdout.split("Active:")[1].split("Pending:")[0]
        assert active.count(" node_") == 2 and "0.0/2.0 CPU" in status.stdout, status.stdout

        # the driver runs with a bare environment: what the task reports came from the head.
        # Ray would rebuild a driver started under `uv run` (tests/run.sh) for its workers
        # with `uv run` (ray _private/worker.py): this driver is not one of those.
        driver = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c", WORKER, f"127.0.0.1:{port}"],
                                env={"PATH": "/usr/bin:/bin", "HOME": str(home), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
                                capture_output=True, text=True, timeout=300, cwd=home)
        assert driver.returncode == 0, driver.stderr[-3000:]
        seen = json.loads(next(ln for ln in driver.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        assert len(seen) == 2
        assert seen[0] == seen[1] == {"VLLM_ROCM_USE_AITER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "RDNA4_PREFIX": str(prefix), "ROCM_PATH": str(prefix / "rocm"),
                        "PYTORCH_ROCM_ARCH": "gfx1201", "VIRTUAL_ENV": str(prefix / "venv"),
                        "HSA_OVERRIDE_GFX_VERSION": None, "NCCL_SOCKET_IFNAME": "lo"}

        # another install's Ray node (a `raylet` from elsewhere): stop refuses, its hint
        # (--all, which is `ray stop` as is) stops both
        other = tmp_path / "other" / "raylet"
        other.parent.mkdir()
        shutil.copy2(shutil.which("sleep"), other)
        foreign = subprocess.Popen([str(other), "300"])
        while (Path("/proc") / str(foreign.pid) / "comm").read_text().strip() != "raylet":
            time.sleep(0.05)
        refused = _cli(world, home, "cluster", "stop", "--prefix", prefix)
        assert refused.returncode == 1 and f"(pid {foreign.pid}: {other})" in refused.stderr
        hint = next(ln for ln in refused.stderr.splitlines() if ln.startswith("hint: "))
        stopped_all = _cli(world, home, *hintcheck.hint_argv(hint), timeout=300)
        assert stopped_all.returncode == 0, stopped_all.stderr[-3000:]
        assert foreign.wait(timeout=60) is not None
    finally:
        if foreign is not None and foreign.poll() is None:
            foreign.kill()
            foreign.wait()
        stop = _cli(world, home, "cluster", "stop", "--prefix", prefix, timeout=300)
        deadline = time.monotonic() + 30
        while _still_running(str(temp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = _kill_ours(str(temp))
    assert stop.returncode == 0, stop.stdout[-3000:] + stop.stderr[-3000:]
    assert not leftover, f"cluster stop left {leftover} running"


def _still_running(marker: str) -> bool:
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            if marker in (pid / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def test_with_ray_cannot_add_to_a_lock(tmp_path, runner, exact_pins):
    from installer.cli import cli

    # a lock is the whole stack: Ray goes into it when it is made, not on top at install
    result = runner.invoke(cli, ["install", "--lock", str(tmp_path / "stack.lock"), "--with", "ray",
                                 "--gpu-arch", "gfx1201", "--prefix", str(tmp_path / "p"), "--dry-run"])
    assert result.exit_code == 2
    assert "--with ray cannot add to it" in result.output and "rdna4-install lock --with ray" in result.output
    assert not (tmp_path / "p").exists()
    # the hint makes that lock, and the lock installs Ray
    lock_file = tmp_path / "ray.lock"
    made = runner.invoke(cli, [*hintcheck.hint_argv(result.output, fill={"FILE": str(lock_file)}),
                               "--gpu-arch", "gfx1201"])
    assert made.exit_code == 0, made.output
    assert tomllib.loads(lock_file.read_text())["pins"]["ray"]["enabled"] == "true"
