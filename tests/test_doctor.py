"""Host checks on fake GPU hosts, and on this (GPU-less) machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from installer import detect, doctor

from detect_fixtures import (EXIT_CODES, fake_rocminfo, fake_sysfs, f1_host, fixture,
                             gpuless_host)

MIB = 1024 ** 2


@pytest.fixture
def host(tmp_path, monkeypatch):
    """run_checks against a fake tree with a given rocminfo output and user."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def run(root: Path, *, rocminfo: str | None = None, exit: int = 0, hang: bool = False,
            who: doctor.Identity | None = None, archs_given: bool = False, **kw):
        if rocminfo is not None or hang:
            exe = fake_rocminfo(tmp_path, rocminfo or "", exit=exit, hang=hang)
            monkeypatch.setenv("PATH", str(exe.parent))
        checks = doctor.run_checks(prefix=tmp_path / "prefix", cache_dir=tmp_path / "cache",
                                   need_bytes=kw.pop("need_bytes", MIB), jobs=2,
                                   archs_given=archs_given, sysfs_root=root,
                                   identity=who or user(root), **kw)
        return {c.name: c for c in checks}, checks

    return run


def user(root: Path, *, in_session: bool = True, in_db: bool = True) -> doctor.Identity:
    """A non-root user whose session/database groups do or do not hold /dev/kfd's group."""
    try:
        gid = (root / "dev/kfd").stat().st_gid
    except OSError:
        gid = 4242
    session = {1000} | ({gid} if in_session else set())
    db = {1000} | ({gid} if in_db or in_session else set())
    return doctor.Identity("alice", 1000, frozenset(session), frozenset(db), real=False)


def test_healthy_f1_host_passes(tmp_path, host):
    by_name, checks = host(f1_host(tmp_path / "root"), rocminfo=fixture("F1"))
    for name in ("kernel", "amdgpu", "gpu", "/dev/kfd", "/dev/dri", "groups", "rocminfo"):
        assert by_name[name].status == "pass", by_name[name]
    assert "amdgpu-dkms 6.14.14" in by_name["amdgpu"].detail
    assert "gfx1201" in by_name["gpu"].detail
    assert by_name["gpu notes"].status == "warn"      # the iGPU gets hidden
    # PATH holds only the fake rocminfo, so host tools may fail; the GPU side must not
    assert not doctor.GPU_BLOCKING & {c.name for c in doctor.blocking_failures(checks)}
    out = json.loads(json.dumps({"checks": [c.to_json() for c in checks]}))
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in out["checks"])


def test_amdgpu_not_loaded(tmp_path, host):
    root = fake_sysfs(tmp_path / "root", kfd=None, pci=[{"address": "0000:03:00.0",
                      "device": 0x7550, "class": 0x030000, "revision": 0xC0}])
    by_name, checks = host(root, rocminfo=fixture("E1"), exit=1)
    assert by_name["amdgpu"].status == "fail" and "modprobe amdgpu" in by_name["amdgpu"].fix
    assert by_name["rocminfo"].status == "fail"
    assert "not loaded" in by_name["rocminfo"].detail and "modprobe" in by_name["rocminfo"].fix
    assert by_name["/dev/kfd"].status == "fail"
    # the card is on PCI, so the target is still known; the runtime just cannot use it
    assert by_name["gpu"].status == "pass"
    assert "not usable for compute" in by_name["gpu notes"].detail
    assert {c.name for c in doctor.blocking_failures(checks)} >= {"amdgpu", "rocminfo", "/dev/kfd"}
    assert doctor.failed(checks)


def test_amdgpu_not_live(tmp_path, host):
    root = fake_sysfs(tmp_path / "root", kfd=None, amdgpu="in-tree", initstate="going")
    by_name, _ = host(root, rocminfo=fixture("E8"), exit=1)
    assert by_name["amdgpu"].status == "fail" and "not live" in by_name["amdgpu"].detail
    assert "dmesg" in by_name["rocminfo"].fix


def test_builtin_amdgpu_passes(tmp_path, host):
    by_name, _ = host(f1_host(tmp_path / "root", amdgpu="in-tree", initstate=None))
    assert by_name["amdgpu"].status == "pass" and "built into" in by_name["amdgpu"].detail


def test_user_not_in_the_render_group(tmp_path, host):
    root = f1_host(tmp_path / "root")
    who = user(root, in_session=False, in_db=False)
    by_name, checks = host(root, rocminfo=fixture("E2"), exit=1, who=who)
    assert by_name["/dev/kfd"].status == "fail"
    assert by_name["/dev/dri"].status == "fail"
    assert by_name["groups"].status == "fail"
    assert "usermod -aG" in by_name["groups"].fix and "alice" in by_name["groups"].fix
    assert by_name["rocminfo"].status == "fail" and "usermod" in by_name["rocminfo"].fix
    assert "groups" in {c.name for c in doctor.blocking_failures(checks)}


def test_group_added_but_session_not_restarted(tmp_path, host):
    root = f1_host(tmp_path / "root")
    who = user(root, in_session=False, in_db=True)
    by_name, _ = host(root, rocminfo=fixture("E3"), exit=1, who=who)
    assert by_name["groups"].status == "fail"
    assert "log out and back in" in by_name["groups"].fix
    assert "predates" in by_name["groups"].detail
    assert "log out and back in" in by_name["/dev/kfd"].fix
    assert "usermod" not in by_name["/dev/kfd"].fix
    assert "log out" in by_name["rocminfo"].fix


def test_world_accessible_kfd_needs_no_group(tmp_path, host):
    root = f1_host(tmp_path / "root", kfd_dev=0o666)
    by_name, _ = host(root, rocminfo=fixture("F1"), who=user(root, in_session=False, in_db=False))
    assert by_name["/dev/kfd"].status == "pass" and by_name["groups"].status == "pass"


@pytest.mark.parametrize("name, words", [
    ("E4", "container"), ("E5", "refused"), ("E6", "dmesg"), ("E7", "dmesg"),
])
def test_other_rocminfo_failures_have_a_fix(tmp_path, host, name, words):
    by_name, _ = host(f1_host(tmp_path / "root"), rocminfo=fixture(name), exit=EXIT_CODES[name])
    check = by_name["rocminfo"]
    assert check.status == "fail" and words in (check.fix + check.detail)


def test_rocminfo_hang(tmp_path, host, monkeypatch):
    monkeypatch.setattr("installer.rocminfo.ROCMINFO_TIMEOUT", 1.0)
    by_name, _ = host(f1_host(tmp_path / "root"), rocminfo=fixture("F1")[:3000], hang=True)
    assert by_name["rocminfo"].status == "fail"
    assert "did not finish" in by_name["rocminfo"].detail and "reboot" in by_name["rocminfo"].fix
    assert by_name["gpu"].status == "pass"     # sysfs still knows the GPU


def test_gpuless_fake_host_fails_cleanly(tmp_path, host):
    by_name, checks = host(gpuless_host(tmp_path / "root"))
    for name in ("amdgpu", "gpu", "/dev/kfd", "/dev/dri"):
        assert by_name[name].status == "fail" and by_name[name].blocking, name
    assert by_name["groups"].status == "warn"
    assert by_name["rocminfo"].status == "warn"     # not installed yet
    assert doctor.failed(checks)


def test_build_only_host_only_warns(tmp_path, host):
    by_name, checks = host(gpuless_host(tmp_path / "root"), archs_given=True)
    for name in ("amdgpu", "gpu", "/dev/kfd", "/dev/dri"):
        assert by_name[name].status == "warn" and not by_name[name].blocking, name
        assert "build-only" in by_name[name].detail
    gpu_names = {"amdgpu", "gpu", "/dev/kfd", "/dev/dri", "groups", "rocminfo"}
    _, subset = host(gpuless_host(tmp_path / "root2"), archs_given=True, blocking_only=True)
    assert {c.name for c in subset} == doctor.ALWAYS_BLOCKING
    assert not gpu_names & {c.name for c in subset}


def test_this_gpuless_machine_does_not_crash(tmp_path):
    checks = doctor.run_checks(prefix=tmp_path / "p", cache_dir=tmp_path / "c", need_bytes=MIB,
                               jobs=2, archs_given=False, sysfs_root="/")
    assert {c.status for c in checks} <= {"pass", "warn", "fail"}
    text = doctor.format_checks(checks)
    assert len(text.splitlines()) >= len(checks) + 1
    gpu = next(c for c in checks if c.name == "gpu")
    if not detect.detect(sysfs_root="/").target:     # true on the build machines
        assert gpu.status == "fail" and gpu.blocking and gpu.fix


def test_detection_can_be_reused(tmp_path, host):
    root = gpuless_host(tmp_path / "root")
    fake = detect.Detection([detect.GPU("gfx1201", "x", "0000:03:00.0", 1, False, "kfd", node=1)],
                            ("gfx1201",), "")
    by_name, _ = host(root, detection=fake)
    assert by_name["gpu"].status == "pass"


# ---------------------------------------------------------------- single checks

def test_disk_estimate_is_stated_and_enforced(tmp_path):
    ok = doctor.check_disk(tmp_path / "a" / "b", tmp_path / "c", MIB)
    assert ok.status == "pass" and "need about" in ok.detail and "estimate" in ok.detail
    huge = doctor.check_disk(tmp_path / "a", tmp_path / "c", 1 << 60)
    assert huge.status == "fail" and "--prefix" in huge.fix


def test_memory_and_parallelism():
    low = doctor.check_memory(8, {"MemTotal": 8 << 30, "SwapTotal": 0})
    assert low.status == "warn" and "8 parallel jobs" in low.detail and low.fix
    big = doctor.check_memory(16, {"MemTotal": 64 << 30, "SwapTotal": 8 << 30})
    assert big.status == "pass" and "64.0 GiB RAM + 8.0 GiB swap" in big.detail
    real = doctor.check_memory(2)
    assert "GiB RAM" in real.detail


@pytest.mark.parametrize("os_id, like, pm", [
    ("ubuntu", "debian", "apt"), ("debian", "", "apt"), ("linuxmint", "ubuntu debian", "apt"),
    ("fedora", "", "dnf"), ("rocky", "rhel centos fedora", "dnf"), ("arch", "", "pacman"),
    ("cachyos", "arch", "pacman"), ("opensuse-tumbleweed", "opensuse suse", "zypper"),
    ("sles", "suse", "zypper"), ("gentoo", "", None),
])
def test_package_manager_from_os_release(os_id, like, pm):
    assert doctor.package_manager(os_id, like) == pm


def test_missing_tools_get_distro_commands(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    for pm, command in doctor.PM_COMMANDS.items():
        checks = {c.name: c for c in doctor.check_tools(pm, path=str(empty), lib_dirs=[empty])}
        tools = checks["host tools"]
        assert tools.status == "fail" and "git" in tools.detail and "C++ compiler" in tools.detail
        assert tools.fix.startswith(command)
        assert doctor.PACKAGES["c-toolchain"][pm] in tools.fix
        assert checks["libatomic"].status == "fail"
        assert doctor.PACKAGES["libatomic"][pm] in checks["libatomic"].fix
        assert checks["libnuma"].status == "warn"
    unknown = doctor.check_tools(None, path=str(empty), lib_dirs=[empty])[0]
    assert "your package manager" in unknown.fix


def test_tools_found_on_a_fake_path(tmp_path):
    bindir, libdir = tmp_path / "bin", tmp_path / "lib"
    bindir.mkdir()
    libdir.mkdir()
    for name in ("git", "gcc", "g++"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    (libdir / "libatomic.so.1").write_text("")
    (libdir / "libnuma.so.1").write_text("")
    checks = doctor.check_tools("apt", path=str(bindir), lib_dirs=[libdir])
    assert [c.status for c in checks] == ["pass", "pass", "pass"]
    assert str(bindir / "g++") in checks[0].detail


def test_kernel_versions(tmp_path):
    plain = fake_sysfs(tmp_path / "a", amdgpu="in-tree")
    dkms = fake_sysfs(tmp_path / "b", amdgpu="6.12.12")
    old = doctor.check_kernel("6.8.0-45-generic", plain, "apt")
    assert old.status == "warn" and "linux-generic-hwe" in old.fix
    assert doctor.check_kernel("6.8.0-45-generic", dkms, "apt").status == "pass"
    assert doctor.check_kernel("6.14.0-24-generic", plain, "dnf").status == "pass"
    assert "pacman" in doctor.check_kernel("6.6.1-arch1", plain, "pacman").fix


def test_python_and_uv(tmp_path):
    assert doctor.check_python((3, 9, 1)).status == "fail"
    assert doctor.check_python().status == "pass"
    assert doctor.check_uv(str(tmp_path / "no-uv")).status == "fail"
    real = doctor.check_uv()
    assert real.status == "pass" and real.detail.startswith("uv ")


def test_format_checks_shows_fixes_only_for_problems():
    checks = [doctor.Check("a", "pass", "fine", "never shown"),
              doctor.Check("bb", "fail", "broken", "do this"),
              doctor.Check("c", "warn", "hmm", "maybe that")]
    text = doctor.format_checks(checks)
    assert "never shown" not in text
    assert "fix: do this" in text and "fix: maybe that" in text
    assert text.splitlines()[-1] == "1 failed, 1 warnings, 1 passed"
    assert doctor.failed(checks) and not doctor.failed(checks[:1])


def test_real_identity_is_consistent():
    me = doctor.Identity.current()
    assert me.real and me.uid == os.geteuid() and os.getegid() in me.session_gids


@pytest.mark.parametrize("banner, status", [
    ("c++ (Ubuntu 11.4.0-1ubuntu1~22.04) 11.4.0", "pass"),
    ("c++ (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0", "fail"),   # vLLM's CMakeLists wants GCC >= 11.3
])
def test_host_compiler_and_its_version(tmp_path, banner, status):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("cc", "c++"):
        (bindir / name).write_text(f"#!/bin/sh\necho '{banner}'\n")
        (bindir / name).chmod(0o755)
    check = doctor.check_host_compiler(str(bindir))
    assert check.status == status and banner in check.detail
    if status == "fail":
        assert "11.3" in check.detail and "build.host_compiler=toolchain" in check.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    assert doctor.check_host_compiler(str(empty)).status == "fail"
