"""Unified memory (strix-halo): doctor's GTT/TTM check through the CLI, and the judge of what
torch reports as device memory against sysfs."""

from __future__ import annotations

import json

import pytest

from detect_fixtures import MEM_128_KIB, PAGE, f1_host, gpuless_host, strix_halo_host
from installer import unifiedmem
from installer.cli import cli

GIB = 1024 ** 3
HALF_PAGES = MEM_128_KIB * 1024 // PAGE // 2           # 16469033: the kernel default
RAISED_PAGES = 124 * GIB // PAGE                        # 32505856: the peers' 124 GiB
# 90% of 125.65 GiB is 113.08 GiB: amd-ttm --set 113 writes 113 GiB / 4 KiB pages
TARGET_LINES = [
    "pipx install amd-debug-tools && amd-ttm --set 113",
    "or by hand: echo 'options ttm pages_limit=29622272' | sudo tee /etc/modprobe.d/ttm.conf",
    "or on the kernel command line: ttm.pages_limit=29622272",
]


@pytest.fixture
def doctor_on(runner, tmp_path, monkeypatch):
    """`rdna4-install doctor` on a fake host: (exit code, output, checks by name from --json)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin") + ":/usr/bin:/bin")   # no rocminfo

    def run(root, *args):
        monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
        text = runner.invoke(cli, ["doctor", "--prefix", str(tmp_path / "p"), *args])
        js = runner.invoke(cli, ["doctor", "--json", "--prefix", str(tmp_path / "p"), *args])
        assert "Traceback" not in text.output + js.output
        checks = {c["name"]: c for c in json.loads(js.output)["checks"]}
        # the memory check only warns: it never decides doctor's exit code
        assert text.exit_code == js.exit_code == (1 if any(c["status"] == "fail"
                                                           for c in checks.values()) else 0)
        return text.exit_code, text.output, checks

    return run


@pytest.mark.parametrize("setting, kw, limit", [
    ("kernel default (gttsize -1, pages_limit half)", {}, "62.8 GiB (50% of RAM)"),
    ("no gttsize parameter file", {"gttsize": None}, "62.8 GiB (50% of RAM)"),
    # gttsize raised alone: GTT is 124 GiB but TTM still stops the GPU at half
    ("gttsize raised, TTM left at half", {"gttsize": 126976}, "62.8 GiB (50% of RAM)"),
])
def test_doctor_warns_with_the_lines_when_gtt_is_about_half(tmp_path, doctor_on, setting, kw, limit):
    root = strix_halo_host(tmp_path / "host", **kw)
    _, out, checks = doctor_on(root)
    check = checks["unified memory"]
    assert check["status"] == "warn", setting
    assert "carve-out (VRAM) 0.5 GiB" in check["detail"] and "RAM 125.6 GiB" in check["detail"]
    assert f"the GPU may map {limit}" in check["detail"]
    assert f"pages_limit {HALF_PAGES} pages" in check["detail"]
    assert "let the GPU map 113 GiB of 125.6 GiB RAM" in check["fix"]
    assert "strixhalo.html" in check["fix"]
    fix_lines = [line.strip() for line in check["fix"].splitlines()]
    for want in TARGET_LINES:
        assert any(line.startswith(want) for line in fix_lines), (want, fix_lines)
    assert not any("remove amdgpu.gttsize" in line for line in fix_lines)  # none set low
    # the text output shows the same lines, each on its own line under "fix:"
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("WARN  unified memory"))
    assert "fix: let the GPU map 113 GiB" in lines[at + 1]
    for offset, want in enumerate(TARGET_LINES, start=2):
        assert lines[at + offset].strip().startswith(want)


def test_a_low_gttsize_must_go_too(tmp_path, doctor_on):
    root = strix_halo_host(tmp_path / "host", gttsize=65536)        # 64 GiB: half of 128 GB
    _, _, checks = doctor_on(root)
    check = checks["unified memory"]
    assert check["status"] == "warn" and "amdgpu.gttsize 65536 MiB" in check["detail"]
    assert "and remove amdgpu.gttsize=65536" in check["fix"]


def test_no_warning_once_raised(tmp_path, doctor_on):
    root = strix_halo_host(tmp_path / "host", pages_limit=RAISED_PAGES)
    _, out, checks = doctor_on(root)
    check = checks["unified memory"]
    assert check["status"] == "pass"
    assert "the GPU may map 124.0 GiB (99% of RAM)" in check["detail"]
    assert "1.6 GiB left for the OS" in check["detail"]     # above amd-ttm's 90%: said, not warned
    assert "amd-ttm --set" not in out and "pages_limit=" not in out


def test_dkms_amdttm_gets_its_own_parameter_name(tmp_path, doctor_on):
    root = strix_halo_host(tmp_path / "host", ttm_module="amdttm")
    _, _, checks = doctor_on(root)
    fix = checks["unified memory"]["fix"]
    assert "options amdttm pages_limit=29622272' | sudo tee /etc/modprobe.d/amdttm.conf" in fix
    assert "amdttm.pages_limit=29622272" in fix


def test_missing_numbers_warn_without_lines(tmp_path, doctor_on):
    root = strix_halo_host(tmp_path / "host", mem_total_kib=None, pages_limit=None, gttsize=None)
    _, _, checks = doctor_on(root)
    check = checks["unified memory"]
    assert check["status"] == "warn" and "lacks some numbers" in check["detail"]
    assert "amd-ttm" not in check["fix"]


@pytest.mark.parametrize("host, args", [
    ("f1", ()),                                  # RX 9070 XT + gfx1036 iGPU
    ("strix+dgpu", ()),                          # the card wins: target rdna4
    ("strix", ("--target", "rdna4")),
    ("gpuless", ("--gpu-arch", "gfx1151")),      # building for Strix Halo elsewhere
])
def test_no_memory_check_on_a_dgpu_target_or_without_the_apu(tmp_path, doctor_on, host, args):
    build = {"f1": f1_host, "strix+dgpu": lambda r: strix_halo_host(r, dgpu=True),
             "strix": strix_halo_host, "gpuless": gpuless_host}[host]
    _, out, checks = doctor_on(build(tmp_path / "host"), *args)
    assert "unified memory" not in checks and "unified memory" not in out
    assert "amd-ttm" not in out


def test_target_or_gpu_arch_chooses_the_apu_beside_a_card(tmp_path, doctor_on):
    root = strix_halo_host(tmp_path / "host", dgpu=True)
    for args in (("--target", "strix-halo"), ("--gpu-arch", "gfx1151")):
        _, _, checks = doctor_on(root, *args)
        assert checks["unified memory"]["status"] == "warn", args
        assert "GPU at 0000:c1:00.0" in checks["unified memory"]["detail"]


def test_unknown_target_is_one_line(runner, tmp_path):
    result = runner.invoke(cli, ["doctor", "--prefix", str(tmp_path / "p"), "--target", "nosuch"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown target 'nosuch'" in result.output and "strix-halo" in result.output


# ---------------------------------------------------------------- torch versus sysfs

def memory(tmp_path, **kw) -> unifiedmem.Memory:
    root = strix_halo_host(tmp_path / "host", **kw)
    return unifiedmem.read(root, unifiedmem.gpu_address(root, ["gfx1151"]))


def test_read_finds_the_apu_and_its_numbers(tmp_path):
    m = memory(tmp_path)
    assert (m.pci, m.vram, m.gttsize_mib, m.pages_limit, m.ttm_module) == (
        "0000:c1:00.0", 512 << 20, -1, HALF_PAGES, "ttm")
    assert m.ram == MEM_128_KIB * 1024 and m.limit == HALF_PAGES * PAGE
    assert unifiedmem.gpu_address(f1_host(tmp_path / "f1"), ["gfx1151"]) is None


def test_torch_reporting_the_carve_out_fails(tmp_path):
    m = memory(tmp_path)
    ok, text = unifiedmem.judge(512 << 20, 400 << 20, m)
    assert not ok
    assert "torch reports 0.5 GiB device memory" in text and "the BIOS carve-out" in text
    assert "62.8 GiB GTT pool" in text and "refuses to start" in text
    assert "--kv-cache-memory-bytes" in text and "--gpu-memory-utilization" in text


def test_torch_reporting_the_gtt_pool_with_too_little_free_fails(tmp_path):
    m = memory(tmp_path)
    total, free = m.limit, int(m.limit * 0.80)        # the desktop and page cache hold 20%
    ok, text = unifiedmem.judge(total, free, m)
    assert not ok
    assert "the GTT pool, shared with the CPU" in text and "0.92 x 62.8 GiB" in text
    assert "Free memory on device" in text
    # a utilization under torch's free/total (0.80) passes vLLM's start check
    assert "--gpu-memory-utilization 0.75" in text and "--kv-cache-memory-bytes 16G" in text


def test_torch_reporting_the_gtt_pool_with_room_passes_with_advice(tmp_path):
    m = memory(tmp_path, pages_limit=RAISED_PAGES)
    ok, text = unifiedmem.judge(m.limit, int(m.limit * 0.97), m)
    assert ok and "the GTT pool" in text and "--kv-cache-memory-bytes" in text


def test_torch_reporting_something_else_fails(tmp_path):
    m = memory(tmp_path)
    ok, text = unifiedmem.judge(32 * GIB, 30 * GIB, m)
    assert not ok and "neither the 0.5 GiB carve-out nor the 62.8 GiB GTT limit" in text


def test_a_large_carve_out_equal_to_gtt_is_fine(tmp_path):
    root = strix_halo_host(tmp_path / "host")
    big = unifiedmem.read(root, "0000:c1:00.0")
    big = unifiedmem.Memory(**{**big.__dict__, "vram": big.limit})
    ok, text = unifiedmem.judge(big.limit, big.limit // 2, big)
    assert ok and "both about 62.8 GiB" in text


def test_no_sysfs_numbers_is_not_a_failure(tmp_path):
    m = memory(tmp_path, mem_total_kib=None, pages_limit=None, gttsize=None)
    m = unifiedmem.Memory(**{**m.__dict__, "vram": None})
    ok, text = unifiedmem.judge(64 * GIB, 60 * GIB, m)
    assert ok and "no carve-out/GTT numbers" in text


# ---------------------------------------------------------------- verify on an APU prefix

def _apu_prefix(tmp_path, total, free):
    from test_verify import _line, fake_prefix

    from installer import state, verify

    lines = [_line(n, "skip", "no GPU") for n in verify.SCRIPT_PROBES if n != "torch.device-memory"]
    lines.append(_line("torch.device-memory", "pass", json.dumps(
        {"free": free, "total": total, "total_memory": total})))
    prefix = fake_prefix(tmp_path / "p", lines, archs=("gfx1151",), flash_attention="none")
    receipt = state.read_receipt(prefix)
    state.write_json_atomic(prefix / state.RECEIPT, {**receipt, "target": "strix-halo"})
    return prefix


def test_verify_judges_torchs_memory_against_sysfs_and_leaves_the_verdict(tmp_path, monkeypatch):
    from installer import verify

    root = strix_halo_host(tmp_path / "host")
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
    prefix = _apu_prefix(tmp_path, 512 << 20, 400 << 20)          # torch sees the carve-out
    probes = {p.name: p for p in verify.run(prefix)}
    argv = (prefix / "argv").read_text().splitlines()
    assert json.loads(argv[1])["unified_memory"] is True          # the probe measures only on APUs
    memory_probe = probes["torch.device-memory"]
    assert memory_probe.status == "fail" and "the BIOS carve-out" in memory_probe.detail
    note = unifiedmem.note_path(prefix).read_text().splitlines()
    assert "--kv-cache-memory-bytes" in note[-2]
    # what sourcing compares before repeating it: each watched sysfs file with its value then
    pci = root / "sys/bus/pci/devices/0000:c1:00.0"
    assert note[:4] == [f"{512 << 20} {pci / 'mem_info_vram_total'}",
                        f"{HALF_PAGES * PAGE} {pci / 'mem_info_gtt_total'}",
                        f"{HALF_PAGES} {root / 'sys/module/ttm/parameters/pages_limit'}", ""]
    # after the fix torch sees the GTT pool with room to spare: pass, and the note goes away
    m = unifiedmem.read(root, "0000:c1:00.0")
    (prefix / "argv").unlink()
    fixed = _apu_prefix(tmp_path / "again", m.limit, int(m.limit * 0.95))
    (fixed / ".rdna4").mkdir(exist_ok=True)
    unifiedmem.record(fixed, "stale")
    probe = {p.name: p for p in verify.run(fixed)}["torch.device-memory"]
    assert probe.status == "pass" and "the GTT pool" in probe.detail
    assert not unifiedmem.note_path(fixed).exists()


def test_verify_on_an_rdna4_prefix_leaves_the_probe_alone(tmp_path, monkeypatch):
    from test_verify import ALL_PASS, fake_prefix

    from installer import verify

    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(strix_halo_host(tmp_path / "host", dgpu=True)))
    prefix = fake_prefix(tmp_path / "p", [json.dumps(d) for d in ALL_PASS], flash_attention="none")
    probes = {p.name: p for p in verify.run(prefix)}
    assert probes["torch.device-memory"].detail == "torch.device-memory ok"
    assert "unified_memory" not in json.loads((prefix / "argv").read_text().splitlines()[1])
    assert not unifiedmem.note_path(prefix).exists()


def test_the_real_probe_skips_off_an_apu_and_without_torch():
    import sys
    from pathlib import Path

    from installer import verify

    for expect, words in (({"archs": ["gfx1201"]}, "not a unified-memory target"),
                          ({"archs": ["gfx1151"], "unified_memory": True}, "needs torch")):
        probes = {p.name: p for p in verify.run_script_probes(Path(sys.executable), expect,
                                                              {"PATH": "/usr/bin:/bin"})}
        assert probes["torch.device-memory"].status == "skip"
        assert words in probes["torch.device-memory"].detail


@pytest.mark.parametrize("pm, tail", [
    ("apt", " && sudo update-initramfs -u"), ("dnf", " && sudo dracut -f"),
    ("pacman", " && sudo mkinitcpio -P"),
    (None, ", then regenerate the initramfs (update-initramfs -u, dracut -f or mkinitcpio -P)"),
])
def test_the_by_hand_line_regenerates_the_initramfs_the_distros_way(tmp_path, pm, tail):
    lines = unifiedmem.raise_lines(memory(tmp_path), pm)
    assert lines[2] == ("  or by hand: echo 'options ttm pages_limit=29622272' | "
                        "sudo tee /etc/modprobe.d/ttm.conf" + tail)
