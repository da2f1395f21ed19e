"""End to end on a GPU-less machine: install.sh from this checkout installs the tool,
which installs the whole stack for gfx1201 from local stand-ins of every upstream
(tests/e2e_fixtures.py). Then reruns, a patch change, activation in a fresh shell,
a concurrent install, and every kind of bad input.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

import hintcheck

from build_fixtures import compiler_calls
from e2e_fixtures import REPO, VLLM_PATCH, build_world, leftovers, one_line_error, recipe_statuses, run_cli
from therock_fixtures import make_toolchain_tarball

from installer.state import all_stamps as stamps

pytestmark = [pytest.mark.network, pytest.mark.slow]

RECIPES = ["therock", "triton-kernels", "torch", "activate", "flash-attention", "vllm"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with build_world(tmp_path_factory.mktemp("world")) as w:
        yield w


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir(exist_ok=True)
    return h


def test_install_sh_then_rerun_patch_change_and_activation(world, tmp_path, home):
    prefix = tmp_path / "my prefix"          # a space, as users' paths have
    env = world.env(home)
    env.update(RDNA4_INSTALLER_SOURCE=str(REPO), UV_TOOL_DIR=str(tmp_path / "uv-tools"),
               UV_TOOL_BIN_DIR=str(tmp_path / "uv-bin"), RDNA4_NO_CHECKS="1")
    # the `curl | sh` path: the script arrives on stdin
    first = subprocess.run(["sh", "-s", "--", "--prefix", str(prefix), "--gpu-arch", "gfx1201"],
                           input=(REPO / "install.sh").read_text(), env=env, capture_output=True,
                           text=True, timeout=900, cwd=home)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "Traceback" not in first.stderr
    tool = tmp_path / "uv-bin" / "rdna4-install"
    assert tool.exists(), "install.sh installed the tool"
    for n, name in enumerate(RECIPES, 1):
        assert re.search(rf"\[{n}/6\] {re.escape(name)}\b", first.stderr), name

    # every recipe done; the receipt lists every pin and what each resolved to
    assert recipe_statuses(world, home, prefix) == {name: "done" for name in RECIPES}
    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    for table, values in world.pins.items():
        for key, value in values.items():
            assert receipt["pins"][table][key] == value, f"{table}.{key}"
    assert receipt["pins"]["vllm"]["version"] == "0.33.0", "pins not overridden still listed"
    comps = receipt["components"]
    assert comps["therock"]["facts"]["sha256"] and comps["therock"]["facts"]["version"] == "10.1.0"
    assert comps["vllm"]["facts"]["code_objects"], "the vLLM check read the code objects"
    assert all(archs == ["gfx1201"] for archs in comps["vllm"]["facts"]["code_objects"].values())
    assert comps["vllm"]["patches"] == {"0001-test.patch": comps["vllm"]["patches"]["0001-test.patch"]}
    fa_source = comps["flash-attention"]["facts"]["source"]
    assert fa_source["commit"] == world.pins["flash-attention"]["commit"]
    # a CK build fetches CK and never aiter (the Triton backend's submodule)
    assert set(fa_source["submodules"]) == {"csrc/composable_kernel"}

    # the arch reached every compile; the Triton switch never reached flash-attention's
    calls = compiler_calls(prefix / "rocm")
    device = [c for c in calls if any(a.startswith("--offload-arch=") for a in c["argv"])]
    assert device and all("--offload-arch=gfx1201" in c["argv"] for c in device)
    assert all(c["env"]["FLASH_ATTENTION_TRITON_AMD_ENABLE"] is None for c in device
               if c["env"]["GPU_ARCHS"])

    # the activation script works in a fresh shell and undoes itself
    script = (f'. "{prefix}/activate" && python -c "import torch, vllm, flash_attn; '
              f'print(torch.version.hip)" && echo "R=$ROCM_PATH A=$PYTORCH_ROCM_ARCH" && '
              f'rdna4_deactivate && echo "after=${{ROCM_PATH:-unset}}"')
    shell = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], env=env, capture_output=True,
                           text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert f"R={prefix}/rocm A=gfx1201" in shell.stdout and "after=unset" in shell.stdout

    # a rerun does nothing: no step runs, no compiler runs, no download
    before_calls, before_stamps = len(compiler_calls(prefix / "rocm")), stamps(prefix)
    gets = len(world.http.log)
    again = subprocess.run([str(tool), "--prefix", str(prefix), "--gpu-arch", "gfx1201"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=home)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
    assert len(compiler_calls(prefix / "rocm")) == before_calls
    assert stamps(prefix) == before_stamps
    assert len(world.http.log) == gets

    # a changed vLLM patch rebuilds vLLM and nothing else
    world.vllm_patch.write_text(VLLM_PATCH.format(value=2))
    try:
        plan = run_cli(world, home, "plan", "--prefix", str(prefix))
        assert re.search(r"will run\s+vllm .*patches changed: 0001-test.patch", plan.stdout), plan.stdout
        assert plan.stdout.count("will run") == 1
        changed = run_cli(world, home, "run", "vllm", "--prefix", str(prefix))
        assert changed.returncode == 0, changed.stderr
        after = stamps(prefix)
        assert [n for n in RECIPES if after[n]["finished"] != before_stamps[n]["finished"]] == ["vllm"]
        assert len(compiler_calls(prefix / "rocm")) > before_calls
    finally:
        world.vllm_patch.write_text(VLLM_PATCH.format(value=1))

    # switching to --editable redoes vLLM as an editable install whose source stays
    editable = run_cli(world, home, "run", "vllm", "--editable", "--prefix", str(prefix))
    assert editable.returncode == 0, editable.stderr[-3000:]
    src = prefix / ".rdna4" / "work" / "vllm" / "src"
    where = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c", "import vllm; print(vllm.__file__)"],
                           capture_output=True, text=True, cwd=home)
    assert where.stdout.strip() == str(src / "vllm" / "__init__.py"), where
    assert leftovers(prefix, world.root / "cache") == []


def test_second_prefix_reuses_the_cache_and_a_concurrent_install_is_refused(world, tmp_path, home):
    prefix = tmp_path / "second"
    args = ["--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks"]
    env = world.env(home)
    env["PYTHONPATH"] = str(REPO)
    # status of a prefix not made yet says how to make it; that hint is the first install
    # (the host's GPU is given by the environment, as on a build box for a gfx1201 card)
    env.update(RDNA4_GPU_ARCH="gfx1201", RDNA4_NO_CHECKS="1")
    status = subprocess.run([sys.executable, "-m", "installer", "status", "--prefix", str(prefix)], env=env,
                            cwd=home, capture_output=True, text=True)
    assert status.returncode == 1 and not prefix.exists(), status.stderr
    gets = len(world.http.log)
    first = subprocess.Popen([sys.executable, "-m", "installer", *hintcheck.hint_argv(status.stderr, env)],
                             env=env, cwd=home,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = prefix / ".rdna4" / "lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()):
        assert time.monotonic() < deadline and first.poll() is None, "first install never took the lock"
        time.sleep(0.02)
    second = run_cli(world, home, "install", *args)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    if "is in use by another rdna4-install" not in second.stderr:
        pytest.fail(f"the second install was not refused: {second.stderr[-2000:]}")
    assert second.returncode == 1 and f"(PID {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    # the cache was warm: the tarball and the sdist were not downloaded again
    assert not [r for r in world.http.log[gets:] if r["method"] == "GET" and r["path"].endswith(".tar.gz")]
    facts = json.loads((prefix / "rdna4-manifest.json").read_text())["components"]
    assert facts["vllm"]["facts"]["wheel_cache"] == "hit"
    assert facts["flash-attention"]["facts"]["wheel_cache"] == "hit"


@pytest.mark.parametrize("case", [
    "no-gpu", "unsupported-arch", "unwritable-prefix", "unknown-recipe", "bad-set-key",
    "sha256-mismatch", "offline-miss", "corrupt-tarball", "unreachable-server",
])
def test_bad_input(world, tmp_path, home, case):
    prefix = tmp_path / "p"
    gpu = ["--gpu-arch", "gfx1201"]
    if case == "no-gpu":
        r = run_cli(world, home, "install", "--prefix", str(prefix))
        return one_line_error(r, 2, "no supported GPU found", "--gpu-arch gfx1201")
    if case == "unsupported-arch":
        r = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1100")
        return one_line_error(r, 2, "gfx1100 is not a supported target", "--allow-unsupported-arch")
    if case == "unwritable-prefix":
        (tmp_path / "file").write_text("")
        r = run_cli(world, home, "install", "--prefix", str(tmp_path / "file" / "p"), *gpu)
        return one_line_error(r, 1, "is not a directory", "--prefix")
    if case == "unknown-recipe":
        r = run_cli(world, home, "run", "vllmm", "--prefix", str(prefix), *gpu)
        return one_line_error(r, 2, "unknown recipe 'vllmm'", "recipes are:")
    if case == "bad-set-key":
        r = run_cli(world, home, "install", "--prefix", str(prefix), *gpu, "--set", "vllm.verison=1")
        return one_line_error(r, 2, "unknown pin 'vllm.verison'", "RECIPE.KEY")
    # a fresh cache per case (the world env's RDNA4_CACHE_DIR is shared by every test)
    cache = tmp_path / "fresh-cache"
    base = ["install", "--prefix", str(prefix), *gpu, "--no-checks", "--cache-dir", str(cache)]
    if case == "sha256-mismatch":
        r = run_cli(world, home, *base, "--set", "therock.sha256=" + "0" * 64)
        one_line_error(r, 1, "0" * 16)
        # (the vLLM sdist is there: the preflight checked the patches against it first)
        assert not list(cache.rglob("therock-dist-*.tar.gz")), "a mismatched download is deleted"
        # the hint pins the file the server has; it installs it (on a box whose GPU and
        # host checks pass, which the environment stands in for)
        assert not (prefix / "rocm").exists()
        env = {**world.env(home), "RDNA4_NO_CHECKS": "1"}
        fixed = hintcheck.run_hint(r.stderr, env, cwd=home)
        assert fixed.returncode == 0, fixed.stderr[-3000:]
        assert (prefix / "rocm" / "bin").is_dir()
        return
    if case == "offline-miss":
        r = run_cli(world, home, *base, "--offline")
        return one_line_error(r, 1, "offline")
    if case == "corrupt-tarball":
        bad = world.root / "files" / "therock" / "therock-dist-linux-gfx120X-all-10.1.1.tar.gz"
        make_toolchain_tarball(bad, "10.1.1", truncate=True)
        try:
            # the world pins torch for 10.1.0 exactly; let it follow 10.1.1, which has no torch
            # wheels, and install only the toolchain, so the preflight passes and the unpack fails
            follow = ["--set", "torch.rocm=", "--set", "torch.torch=2.13.0", "--set", "torch.torchvision=0.28.0",
                      "--set", "torch.torchaudio=2.11.0.3", "--set", "torch.triton="]
            r = run_cli(world, home, *base, "--set", "therock.version=10.1.1", *follow, "--only", "therock")
            one_line_error(r, 1)
            assert re.search(r"corrupt|truncated|incomplete", r.stderr, re.I), r.stderr
            assert not (prefix / "rocm").exists() and not (prefix / "rocm-10.1.1").exists()
            # the server fixes its file: the hint downloads it again, with this run's pins
            make_toolchain_tarball(bad, "10.1.1")
            again = hintcheck.run_hint(r.stderr, {**world.env(home), "RDNA4_NO_CHECKS": "1"}, cwd=home)
            assert again.returncode == 0, again.stderr[-3000:]
            assert (prefix / "rocm").resolve() == prefix / "rocm-10.1.1"
        finally:
            bad.unlink()
        return
    if case == "unreachable-server":
        r = run_cli(world, home, *base, "--set", "therock.index_url=http://127.0.0.1:9/therock/")
        one_line_error(r, 1, "127.0.0.1:9")
        return
    raise AssertionError(case)


@pytest.mark.parametrize("option, backend", [
    (["--flash-attention-backend", "triton"], "TRUE"),
    (["--without", "flash-attention"], None),
])
def test_flash_attention_backend_choices(world, tmp_path, home, option, backend):
    prefix = tmp_path / "p"
    result = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks",
                     *option)
    assert result.returncode == 0, result.stderr[-3000:]
    state = stamps(prefix)
    activate = (prefix / "activate").read_text()
    site = next((prefix / "venv" / "lib").glob("python*/site-packages"))
    if backend is None:
        assert "flash-attention" not in state, "left out, not built"
        assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in activate
        assert not list(site.glob("flash_attn*"))
        plan = run_cli(world, home, "plan", "--prefix", str(prefix), "--without", "flash-attention")
        assert re.search(r"skip\s+flash-attention .*not needed: flash-attention.backend is none", plan.stdout)
    else:
        assert state["flash-attention"]["facts"]["backend"] == "triton"
        assert f"export FLASH_ATTENTION_TRITON_AMD_ENABLE={backend}" in activate
        assert (site / "flash_attn" / "__init__.py").exists()
        assert not list(site.glob("flash_attn_2_cuda*.so")), "the Triton backend builds no CK extension"
    # switching back to CK rebuilds flash-attention and rewrites the activation script
    back = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks")
    assert back.returncode == 0, back.stderr[-3000:]
    assert "export FLASH_ATTENTION_TRITON_AMD_ENABLE=FALSE" in (prefix / "activate").read_text()
    assert list(site.glob("flash_attn_2_cuda*.so"))


def test_verify_and_bench_on_the_installed_prefix(world, tmp_path, home):
    from bench_fixtures import FAKE_VLLM, RESULT, read_state, wait_dead

    prefix = tmp_path / "p"
    result = run_cli(world, home, "install", "--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks")
    assert result.returncode == 0, result.stderr[-3000:]

    # no GPU here: the hardware probes skip, what the install put on disk passes
    verify = run_cli(world, home, "verify", "--json", "--prefix", str(prefix))
    probes = {p["name"]: p for p in json.loads(verify.stdout)["probes"]}
    assert verify.returncode == 0, verify.stdout
    for name in ("torch.import", "torch.version", "vllm.import", "flash_attn.backend",
                 "vllm.code-objects", "flash_attn.code-objects"):
        assert probes[name]["status"] == "pass", probes[name]
    for name in ("torch.gpu-arch", "torch.fp8-scaled-mm", "torch.idle-cpu", "vllm.fp8-kernel",
                 "flash_attn.vs-sdpa"):
        assert probes[name]["status"] == "skip", probes[name]
    assert "gfx1201" in probes["vllm.code-objects"]["detail"]
    table = run_cli(world, home, "verify", "--prefix", str(prefix))
    assert re.search(r"torch\.version\s+pass\s+torch 2\.13\.0\+rocm10\.1\.0", table.stdout)

    # bench drives `vllm serve` / `vllm bench serve` from the venv (a stand-in server here)
    bindir = prefix / "venv" / "bin"
    (bindir / "vllm").write_text(FAKE_VLLM.format(python=sys.executable, result=repr(RESULT)))
    (bindir / "vllm").chmod(0o755)
    (bindir / "fake-mode").write_text("ok")
    (bindir / "fake-state").mkdir()
    bench = run_cli(world, home, "bench", "--prefix", str(prefix), "--num-prompts", "20",
                    "--ready-timeout", "30")
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert re.search(r"output throughput.*251\.37.*248\.12", bench.stdout, re.I | re.S), bench.stdout
    assert list((prefix / "bench").glob("*.json"))
    assert wait_dead(read_state(bindir / "fake-state", "pids.json")) == [], "the server was stopped"


def test_vllm_from_its_git_tag(world, tmp_path, home):
    from e2e_fixtures import git_head

    prefix = tmp_path / "p"
    sha = git_head(world.vllm_git)
    base = ["install", "--prefix", str(prefix), "--gpu-arch", "gfx1201", "--no-checks",
            "--set", "vllm.source=git", "--set", f"vllm.git_url={world.vllm_git}"]
    short = run_cli(world, home, *base, "--set", f"vllm.commit={sha[:9]}")
    one_line_error(short, 2, "full 40-character SHA", "git rev-parse")
    result = run_cli(world, home, *base, "--set", f"vllm.commit={sha}")
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads((prefix / "rdna4-manifest.json").read_text())["components"]["vllm"]["facts"]
    assert facts["source"]["kind"] == "git" and facts["source"]["commit"] == sha
    assert facts["source"]["tag"] == "v0.33.0"
    assert facts["patches"] == {"0001-test.patch": "applied"}
    assert facts["code_objects"]


def test_a_new_vllm_version_rederives_its_sdist_and_builds_it(world, tmp_path, home):
    """The README's `run vllm --set vllm.version=X`: URL, sha256 and tag follow X, and X is built
    (it used to keep the old sdist and only relabel it)."""
    import hashlib

    from e2e_fixtures import VLLM_NEXT

    prefix = tmp_path / "p"
    sel = ["--prefix", str(prefix), "--gpu-arch", "gfx1201", *world.derive_vllm]
    first = run_cli(world, home, "install", "--no-checks", *sel)
    assert first.returncode == 0, first.stderr[-3000:]
    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    assert receipt["components"]["vllm"]["facts"]["source"]["url"].endswith("/vllm-0.33.0.tar.gz")
    again = run_cli(world, home, "run", "vllm", *sel, "--set", f"vllm.version={VLLM_NEXT}")
    assert again.returncode == 0, again.stderr[-3000:]
    receipt = json.loads((prefix / "rdna4-manifest.json").read_text())
    source = receipt["components"]["vllm"]["facts"]["source"]
    sdist = world.root / "pypi" / f"vllm-{VLLM_NEXT}.tar.gz"
    assert source["url"].endswith(f"/vllm-{VLLM_NEXT}.tar.gz")
    assert source["sha256"] == hashlib.sha256(sdist.read_bytes()).hexdigest()
    pins = receipt["pins"]["vllm"]
    assert pins["version"] == VLLM_NEXT and pins["tag"] == f"v{VLLM_NEXT}"
    assert pins["sdist_sha256"] == source["sha256"]
    assert receipt["lock"]["pins"]["vllm"]["version"] == VLLM_NEXT
    installed = subprocess.run([str(prefix / "venv" / "bin" / "python"), "-c",
                                "import importlib.metadata as m, vllm; print(m.version('vllm'), vllm.__version__)"],
                               capture_output=True, text=True)
    assert installed.stdout.split() == [VLLM_NEXT, VLLM_NEXT], installed.stderr
