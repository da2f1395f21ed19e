"""The torch venv against a loopback TheRock index and a decoy "PyPI", with real uv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from installer import proc, pyenv
from installer.actions import StepContext
from installer.errors import InstallerError, StepFailed, UsageError
from tests.index_fixtures import (build_decoy_pypi, build_nightly_gap, build_torch_stack, build_wheel,
                                  cp_tag, request_log, serve_index)

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def make_ctx(prefix: Path, uv_cache: Path, archs=("gfx1201",)) -> StepContext:
    work = prefix / ".rdna4" / "work" / "torch"
    work.mkdir(parents=True, exist_ok=True)
    (prefix / ".rdna4" / "logs").mkdir(parents=True, exist_ok=True)
    # uv must not fetch an interpreter here: the tests use the one running them
    # (explicit cache: module fixtures run before conftest's clean_env)
    env = proc.base_env({"UV_PYTHON_DOWNLOADS": "never", "UV_CACHE_DIR": str(uv_cache)})
    return StepContext(name="torch", prefix=prefix, cache_dir=prefix.parent / "cache", work_dir=work,
                       log=prefix / ".rdna4" / "logs" / "torch.log", env=env, vars={}, archs=archs, jobs=2)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    amd = root / "amd"
    pins = build_torch_stack(amd)
    # older and foreign builds the resolver must pass over
    other_tag = "cp313-cp313-linux_x86_64" if PY != "3.13" else "cp312-cp312-linux_x86_64"
    build_wheel(amd, "torch", "2.12.0+rocm10.1.0", tag=cp_tag(), files={"torch/__init__.py": ""})
    build_wheel(amd, "torch", "2.15.0+rocm10.1.0", tag=other_tag, files={"torch/__init__.py": ""})
    build_wheel(amd, "torch", "2.14.0+rocm10.2.0", tag=cp_tag(), files={"torch/__init__.py": ""})
    build_wheel(amd, "torchvision", "0.27.0+rocm10.1.0", tag=cp_tag(), files={"torchvision/__init__.py": ""})
    pypi = root / "pypi"
    build_decoy_pypi(pypi)
    return {"amd": serve_index(amd), "pypi": serve_index(pypi), "pins": pins}


def install(ctx, indexes, **over):
    pins = dict(indexes["pins"])
    args = dict(index_url=indexes["amd"], rocm=pins["rocm"], torch=pins["torch"],
                torchvision=pins["torchvision"], torchaudio=pins["torchaudio"], triton=pins["triton"],
                therock_version=pins["rocm"], pypi_url=indexes["pypi"])
    args.update(over)
    pyenv.install_torch_step(ctx, **args)


def venv_run(prefix: Path, code: str) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    return subprocess.run([str(pyenv.venv_python(prefix)), "-c", code], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory, indexes, uv_cache):
    """One venv with the pinned stack, shared by the tests that only read or guard it."""
    prefix = tmp_path_factory.mktemp("prefix") / "p"
    ctx = make_ctx(prefix, uv_cache)
    pyenv.create_venv_step(ctx, python=sys.executable)
    install(ctx, indexes)
    return ctx


def test_pins_hold_and_pypi_decoy_is_never_chosen(installed, indexes):
    ctx, pins = installed, indexes["pins"]
    versions = pyenv.installed_versions(pyenv.venv_dir(ctx.prefix))
    assert versions["torch"] == pins["torch"] == "2.13.0+rocm10.1.0"
    assert versions["triton"] == pins["triton"]
    assert versions["rocm"] == versions["rocm-sdk-core"] == versions["rocm-sdk-device-gfx1201"] == "10.1.0"
    assert versions["amd-torch-device-gfx1201"] == pins["torch"]
    assert versions["torchvision"] == pins["torchvision"]
    # uv never even looked at PyPI's torch page: TheRock's index answered first
    assert not any("torch" in path for path in request_log(indexes["pypi"]))
    assert venv_run(ctx.prefix, "import torch; print(torch.__version__, torch.version.hip)") \
        == "2.13.0+rocm10.1.0 7.16.26385"
    assert ctx.facts["torch"] == pins["torch"] and ctx.facts["rocm"] == "10.1.0"
    assert ctx.facts["python"] == ".".join(map(str, sys.version_info[:3]))
    assert ctx.facts["resolved_from_index"] == []


def test_amdsmi_registered_in_place_and_runtime_fixes(installed, uv_cache):
    venv = pyenv.venv_dir(installed.prefix)
    site = pyenv.site_packages(venv)
    sdk_smi = site / "_rocm_sdk_core" / "share" / "amd_smi"
    line = (site / pyenv.AMDSMI_PTH).read_text().strip()
    assert line.isascii() and (site / line).resolve() == sdk_smi.resolve(), "relative, so ASCII (issue 12)"
    assert not (site / "amdsmi").exists()  # not copied
    assert venv_run(installed.prefix, "import amdsmi; print(amdsmi.__file__)") \
        == str(sdk_smi.resolve() / "amdsmi" / "__init__.py")
    assert "rtld_global: bool = False" in (site / "rocm_sdk" / "__init__.py").read_text()
    hip = site / "_rocm_sdk_core" / "lib" / "libamdhip64.so.7"
    assert hip.is_symlink() and hip.samefile(site / "_rocm_sdk_devel" / "lib" / "libamdhip64.so.7")
    assert (site / "_rocm_sdk_devel" / "lib" / "librocm_smi64.so.7").samefile(
        site / "_rocm_sdk_core" / "lib" / "librocm_smi64.so.1")
    # the edit gave this venv its own file: uv's shared cache keeps the original
    cached = [p for p in uv_cache.rglob("rocm_sdk/__init__.py")]
    assert cached and all("rtld_global: bool = True" in p.read_text() for p in cached)
    assert len(installed.facts["runtime_fixes"]) == 3


def test_check_step_runs_against_the_venv(installed):
    pyenv.check_torch_step(installed)
    assert installed.facts["hip"] == "7.16.26385"
    assert installed.facts["rocm"] == "10.1.0"


def test_constraints_and_guard(installed, indexes, tmp_path):
    venv = pyenv.venv_dir(installed.prefix)
    lines = pyenv.write_constraints(venv).read_text().splitlines()
    assert "torch==2.13.0+rocm10.1.0" in lines and "rocm==10.1.0" in lines
    assert f"triton=={indexes['pins']['triton']}" in lines
    before = pyenv.installed_versions(venv)

    # an ordinary requirement from "PyPI" goes through
    after = pyenv.guarded_install(installed, ["--default-index", indexes["pypi"], "tiny-dep"])
    assert after == before
    assert venv_run(installed.prefix, "import tiny_dep; print('ok')") == "ok"

    # a requirement that wants PyPI's torch is refused by the constraints
    req = tmp_path / "requirements.txt"
    req.write_text("tiny-dep\ntorch==99.0.0\n")
    with pytest.raises(StepFailed) as err:
        pyenv.guarded_install(installed, ["--default-index", indexes["pypi"], "-r", str(req)])
    assert "torch 2.13.0+rocm10.1.0" in err.value.message
    assert pyenv.installed_versions(venv) == before


def test_guard_names_what_moved_when_constraints_are_bypassed(tmp_path, indexes, uv_cache):
    # --exact uninstalls everything not requested: constraints cannot stop that,
    # the before/after comparison must
    ctx = make_ctx(tmp_path / "p", uv_cache)
    pyenv.create_venv_step(ctx, python=sys.executable)
    install(ctx, indexes)
    with pytest.raises(InstallerError) as err:
        pyenv.guarded_install(ctx, ["--default-index", indexes["pypi"], "--exact", "tiny-dep"])
    assert "torch 2.13.0+rocm10.1.0 removed" in err.value.message
    assert "triton" in err.value.message


def test_check_unchanged_reports_moves_removals_and_additions():
    before = {"torch": "2.13.0+rocm10.1.0", "triton": "3.8.0", "rocm": "10.1.0"}
    pyenv.check_unchanged(before, dict(before))
    after = {"torch": "99.0.0", "rocm": "10.1.0", "amdsmi": "7.0.2"}
    with pytest.raises(InstallerError) as err:
        pyenv.check_unchanged(before, after)
    msg = err.value.message
    assert "torch 2.13.0+rocm10.1.0 -> 99.0.0" in msg
    assert "triton 3.8.0 removed" in msg and "amdsmi 7.0.2 added" in msg
    assert "rocm" not in msg.replace("+rocm10.1.0", "")


def test_auto_pins_resolve_newest_matching_build(tmp_path, indexes, uv_cache):
    ctx = make_ctx(tmp_path / "p", uv_cache)
    pyenv.create_venv_step(ctx, python=PY)
    install(ctx, indexes, torch="auto", torchvision="auto", torchaudio="auto", triton="", rocm="")
    # 2.15.0+rocm10.1.0 is for another CPython, 2.14.0 for another ROCm, 2.12.0 is older
    assert ctx.facts["torch"] == "2.13.0+rocm10.1.0"
    assert ctx.facts["torchvision"] == "0.28.0+rocm10.1.0"  # the pair of 2.13, not 0.27
    assert ctx.facts["triton"] == indexes["pins"]["triton"]  # the one torch pins
    assert ctx.facts["resolved_from_index"] == ["torch", "torchvision", "torchaudio"]


@pytest.mark.parametrize("over, needle", [
    ({"therock_version": "10.0.0"}, "tarball is ROCm 10.0.0"),
    ({"torch": "2.13.0+rocm10.0.0"}, "torch 2.13.0+rocm10.0.0 is not built for the tarball's ROCm 10.1.0"),
    ({"triton": "3.8.0+git4cff872c.rocm10.0.0"}, "triton"),
])
def test_version_mismatch_stops_before_installing(tmp_path, indexes, uv_cache, over, needle):
    ctx = make_ctx(tmp_path / "p", uv_cache)
    with pytest.raises(InstallerError) as err:
        install(ctx, indexes, **over)
    assert "ROCm version mismatch" in err.value.message and needle in err.value.message
    assert not pyenv.venv_dir(ctx.prefix).exists()


def test_mismatch_with_the_unpacked_tarball(tmp_path, indexes, uv_cache):
    prefix = tmp_path / "p"
    ctx = make_ctx(prefix, uv_cache)
    (prefix / "rocm-10.0.0").mkdir()
    (prefix / "rocm").symlink_to("rocm-10.0.0")
    with pytest.raises(InstallerError) as err:
        install(ctx, indexes)
    assert "is ROCm 10.0.0 but therock.version is 10.1.0" in err.value.message


def test_nightly_installs_with_prereleases(tmp_path, indexes, uv_cache):
    amd = tmp_path / "nightly"
    build_nightly_gap(amd)
    url = serve_index(amd)

    # the nightly installs: its prerelease versions need --prerelease allow
    ctx = make_ctx(tmp_path / "p", uv_cache)
    pyenv.create_venv_step(ctx, python=PY)
    pyenv.install_torch_step(ctx, index_url=url, rocm="", torch="auto", torchvision="auto",
                             torchaudio="", triton="", therock_version="10.2.0a20260930",
                             pypi_url=indexes["pypi"])
    assert ctx.facts["torch"] == "2.15.0a0+rocm10.2.0a20260930"
    assert ctx.facts["torchvision"] == "0.30.0a0+rocm10.2.0a20260930"
    assert ctx.facts["torchaudio"] == ""
    pyenv.check_torch_step(ctx)

    # a torch that is no HIP build fails the check (unlink first: the file is a
    # hard link into the shared uv cache)
    version_py = pyenv.site_packages(pyenv.venv_dir(ctx.prefix)) / "torch" / "version.py"
    version_py.unlink()
    version_py.write_text('__version__ = "2.15.0a0+rocm10.2.0a20260930"\nhip = None\n')
    with pytest.raises(InstallerError, match="not a ROCm"):
        pyenv.check_torch_step(ctx)


def test_bad_inputs_are_usage_errors(tmp_path, indexes, uv_cache):
    ctx = make_ctx(tmp_path / "p", uv_cache)
    with pytest.raises(UsageError, match="torch.index_url must be an https URL"):
        install(ctx, indexes, index_url="http://example.com/simple/")
    with pytest.raises(UsageError, match="tarball version is not known"):
        install(ctx, indexes, therock_version="latest")
    with pytest.raises(UsageError, match="bad target arch list"):
        pyenv.install_torch_step(make_ctx(tmp_path / "q", uv_cache, archs=("gfx1201;x",)),
                                 index_url=indexes["amd"], rocm="", torch="auto", torchvision="",
                                 torchaudio="", triton="", therock_version="10.1.0")


def test_find_uv_falls_back_to_the_uv_package(monkeypatch, tmp_path):
    assert Path(pyenv.find_uv()).name == "uv"
    monkeypatch.setenv("PATH", str(tmp_path))  # no uv on PATH
    import uv
    assert pyenv.find_uv() == uv.find_uv_bin()
    monkeypatch.setitem(sys.modules, "uv", None)
    with pytest.raises(InstallerError, match="uv not found"):
        pyenv.find_uv()


# what a user's shell may carry: each would move where torch comes from, or stop uv
# from reaching the index at all (UV_OFFLINE with a cache that lacks the wheels)
HOSTILE_UV = {"UV_INDEX_URL": "https://download.pytorch.org/whl/cu126",
              "UV_EXTRA_INDEX_URL": "https://download.pytorch.org/whl/cu126",
              "UV_INDEX": "https://download.pytorch.org/whl/cu126", "UV_TORCH_BACKEND": "cu126",
              "UV_INDEX_STRATEGY": "unsafe-best-match", "UV_OFFLINE": "1", "UV_NO_BINARY": "1",
              "UV_CONSTRAINT": "/nonexistent/constraints.txt", "PIP_INDEX_URL": "https://pypi.invalid/"}


def test_the_callers_uv_variables_never_reach_uv(tmp_path, indexes, monkeypatch):
    """In the caller's shell (proc.base_env must not pass them) and in a step's
    env (pyenv.uv_env must strip them): either way uv installs the pinned stack."""
    for key, value in HOSTILE_UV.items():
        monkeypatch.setenv(key, value)
    env = proc.base_env()
    assert not [k for k in HOSTILE_UV if k in env]
    # a fresh uv cache: with UV_OFFLINE leaked, nothing could be installed
    fresh = tmp_path / "uv-cache"
    ctx = make_ctx(tmp_path / "p", fresh)
    ctx.env.update(HOSTILE_UV)
    pyenv.create_venv_step(ctx, python=sys.executable)
    install(ctx, indexes)
    versions = pyenv.installed_versions(pyenv.venv_dir(ctx.prefix))
    assert versions["torch"] == indexes["pins"]["torch"]
    assert any(fresh.iterdir())


# --- the guard's parts on a venv laid out by hand (no uv needed to read it) ---

def fake_venv(prefix: Path, dists: dict[str, str], extra: dict[str, bytes] | None = None) -> Path:
    """PREFIX/venv with one dist-info per name -> version (METADATA as wheels write it)."""
    venv = pyenv.venv_dir(prefix)
    site = venv / "lib" / f"python{PY}" / "site-packages"
    for name, version in dists.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       "Summary: a: b\n\nName: not-the-name\nVersion: 0.0.0\n")
    for rel, data in (extra or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    site.mkdir(parents=True, exist_ok=True)
    return venv


def test_installed_versions_reads_only_the_guarded_headers(tmp_path):
    venv = fake_venv(tmp_path / "p", {"torch": "2.13.0+rocm10.1.0", "Rocm-SDK-Core": "10.1.0",
                                      "amd-torch-device-gfx1201": "2.13.0+rocm10.1.0", "tiny-dep": "1.0.0"},
                     extra={"broken-1.0.dist-info/METADATA": b"Name: triton\nVersion: 3.8.0\nAuthor: Jos\xe9\n",
                            "noversion-1.0.dist-info/METADATA": b"Name: torchvision\n"})
    assert pyenv.installed_versions(venv) == {"torch": "2.13.0+rocm10.1.0", "rocm-sdk-core": "10.1.0",
                                              "amd-torch-device-gfx1201": "2.13.0+rocm10.1.0",
                                              "triton": "3.8.0"}


def test_constraints_hold_every_guarded_package_and_need_torch(tmp_path):
    venv = fake_venv(tmp_path / "p", {"torch": "2.13.0+rocm10.1.0", "rocm": "10.1.0"})
    path = pyenv.write_constraints(venv, {"rocm": "10.1.0", "torch": "2.13.0+rocm10.1.0"})
    assert path.read_text() == "rocm==10.1.0\ntorch==2.13.0+rocm10.1.0\n"
    # `installed` is what the caller read; without it the venv is read
    assert pyenv.write_constraints(venv).read_text() == path.read_text()
    with pytest.raises(InstallerError) as err:
        pyenv.write_constraints(venv, {"rocm": "10.1.0"})
    assert err.value.message == f"torch is not installed in {venv}"
    assert err.value.hint == f"rdna4-install run torch --force --prefix {tmp_path / 'p'}"


def test_check_unchanged_says_how_to_recover():
    with pytest.raises(InstallerError) as err:
        pyenv.check_unchanged({"torch": "1", "rocm": "2"}, {"torch": "3"})
    assert err.value.message == "an install changed the torch stack: torch 1 -> 3; rocm 2 removed"
    assert err.value.hint == ("the venv is no longer coherent: rerun the torch recipe and drop or loosen "
                              "the requirement that moved it")


def test_expect_installed_names_each_package_off_its_pin():
    pins = {"rocm": "10.1.0", "torch": "2.13.0+rocm10.1.0", "torchvision": "0.28.0+rocm10.1.0",
            "torchaudio": "2.11.0+rocm10.1.0", "triton": "3.8.0+rocm10.1.0"}
    good = {"rocm": "10.1", "rocm-sdk-core": "10.1.0", "torch": "2.13.0+rocm10.1.0",
            "rocm-sdk-device-gfx1201": "10.1.0", "amd-torch-device-gfx1201": "2.13.0+rocm10.1.0",
            "torchvision": "0.28.0+rocm10.1.0", "torchaudio": "2.11.0+rocm10.1.0", "triton": "3.8.0+rocm10.1.0"}
    pyenv.expect_installed(good, pins, ["gfx1201"])
    pyenv.expect_installed({k: v for k, v in good.items() if k != "triton"}, {**pins, "triton": ""}, ["gfx1201"])
    for key in ("torchvision", "torchaudio", "triton"):
        with pytest.raises(InstallerError) as err:
            pyenv.expect_installed({**good, key: "9.9.9"}, pins, ["gfx1201"])
        assert err.value.message == (f"the venv does not hold the pinned stack: {key} 9.9.9 "
                                     f"(wanted {pins[key]})")
        assert err.value.hint == "check that torch.index_url serves these exact versions"
    missing = {k: v for k, v in good.items() if k not in ("torch", "rocm-sdk-device-gfx1201")}
    with pytest.raises(InstallerError) as err:
        pyenv.expect_installed(missing, pins, ["gfx1201"])
    assert err.value.message == ("the venv does not hold the pinned stack: torch missing (wanted "
                                 "2.13.0+rocm10.1.0); rocm-sdk-device-gfx1201 missing (wanted 10.1.0)")


def test_uv_env_keeps_only_settings_that_cannot_move_torch():
    env = {"PATH": "/usr/bin", "HOME": "/root", "PYTHONPATH": "/x", "PYTHONHOME": "/x", "VIRTUAL_ENV": "/x",
           "CONDA_PREFIX": "/x", "LD_LIBRARY_PATH": "/x", "PIP_INDEX_URL": "https://pypi.invalid/",
           "UV_INDEX_URL": "https://pypi.invalid/", "UV_CACHE_DIR": "/c", "UV_PYTHON_DOWNLOADS": "never"}
    assert pyenv.uv_env(env) == {"PATH": "/usr/bin", "HOME": "/root", "UV_CACHE_DIR": "/c",
                                 "UV_PYTHON_DOWNLOADS": "never", "UV_HTTP_TIMEOUT": "300"}
    assert pyenv.uv_env({"UV_HTTP_TIMEOUT": "900"}) == {"UV_HTTP_TIMEOUT": "900"}


@pytest.mark.parametrize("url", ["http://example.com/simple/", "ftp://example.com/", "https:///simple/",
                                 "file:///srv/simple/"])
def test_an_index_url_must_be_https_or_loopback(url):
    with pytest.raises(UsageError) as err:
        pyenv.check_index_url(url, "torch.index_url")
    assert err.value.message == f"torch.index_url must be an https URL (http only to loopback): {url!r}"
    assert err.value.hint == "fix the pin in recipes/pins.toml or the --set value"
    assert pyenv.check_index_url("http://127.0.0.1:8000/simple/", "x") == "http://127.0.0.1:8000/simple/"


@pytest.mark.parametrize("offline", [False, True])
def test_a_failed_guarded_install_says_what_held_the_stack(tmp_path, uv_cache, offline):
    from installer import mirror

    prefix = tmp_path / "p"
    venv = fake_venv(prefix, {"torch": "2.13.0+rocm10.1.0", "rocm": "10.1.0"})
    ctx = make_ctx(prefix, uv_cache)
    ctx.offline = offline
    ctx.env["UV_INDEX_URL"] = "https://pypi.invalid/"
    mirror.use(mirror.Mirror(rules=((pyenv.PYPI_URL, "https://pypi.mirror.example/simple"),)))
    try:
        with pytest.raises(StepFailed) as err:   # the venv has no python: uv fails at once
            pyenv.guarded_install(ctx, ["tiny-dep"])
    finally:
        mirror.use(None)
    constraints = venv / pyenv.CONSTRAINTS
    assert err.value.message.startswith("uv pip install ")
    assert err.value.message.endswith(f"; torch, triton and rocm are held at torch 2.13.0+rocm10.1.0 "
                                      f"by {constraints}")
    assert err.value.hint == f"full log: {ctx.log}"  # uv's own failure keeps its hint
    assert isinstance(err.value.tail, list)
    assert constraints.read_text() == "rocm==10.1.0\ntorch==2.13.0+rocm10.1.0\n"
    rerun = (ctx.work_dir / "last-command.sh").read_text()
    assert f"--constraints {constraints} --build-constraints {constraints} " \
           f"--default-index https://pypi.mirror.example/simple{' --offline' if offline else ''} tiny-dep" in rerun
    assert "UV_INDEX_URL" not in rerun
    # the caller's own --default-index wins over the mirror's
    with pytest.raises(StepFailed):
        pyenv.guarded_install(ctx, ["--default-index", "https://other.example/simple", "tiny-dep"], env=ctx.env)
    assert "pypi.mirror.example" not in (ctx.work_dir / "last-command.sh").read_text()
