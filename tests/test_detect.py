"""GPU detection: fake sysfs trees, with captured rocminfo outputs (tests/detect_fixtures.py)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from installer import detect, targetprofile
from installer.errors import UsageError

from detect_fixtures import (EXIT_CODES, P_PCI, S3_KFD, S4_KFD, CPU_NODE, f1_host,
                             fake_rocminfo, fake_sysfs, fixture, gpuless_host)


@pytest.fixture
def no_rocm(monkeypatch, tmp_path):
    """No ROCm on PATH, no GPU variables, sysfs root unset."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in ("RDNA4_SYSFS_ROOT", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                "CUDA_VISIBLE_DEVICES", "HSA_OVERRIDE_GFX_VERSION", "HSA_OVERRIDE_GFX_VERSION_1"):
        monkeypatch.delenv(var, raising=False)
    return empty


# ---------------------------------------------------------------- KFD

@pytest.mark.parametrize("version, name", [
    # gfx_target_version values as the kernel's amdkfd/kfd_device.c stores them
    (120001, "gfx1201"), (120000, "gfx1200"), (110501, "gfx1151"), (110000, "gfx1100"),
    (110003, "gfx1103"), (100306, "gfx1036"), (90010, "gfx90a"), (90012, "gfx90c"),
    (90402, "gfx942"), (0, None), (None, None),
])
def test_gfx_target_version_decoding(version, name):
    assert detect.gfx_name(version) == name


# ---------------------------------------------------------------- detect()

def test_f1_machine_all_sources(tmp_path, no_rocm, monkeypatch):
    root = f1_host(tmp_path / "root")
    exe = fake_rocminfo(tmp_path, fixture("F1"))
    monkeypatch.setenv("PATH", str(exe.parent))
    d = detect.detect(sysfs_root=root)
    dgpu, igpu = d.gpus
    assert dgpu.to_json() == {"arch": "gfx1201", "marketing_name": "AMD Radeon RX 9070 XT",
                              "pci": "0000:03:00.0", "vram_mib": 16695296 // 1024,
                              "integrated": False, "source": "rocminfo+kfd+pci"}
    assert (igpu.arch, igpu.integrated, igpu.pci, igpu.source, igpu.vram_mib) == (
        "gfx1036", True, "0000:76:00.0", "rocminfo+kfd+pci", None)
    assert d.target == ("gfx1201",)
    # the iGPU (no unique id) is hidden by naming the dGPU by UUID
    assert d.visible_devices == "GPU-2b09110b94528d60"
    assert d.visible_env == {"ROCR_VISIBLE_DEVICES": "GPU-2b09110b94528d60"}
    assert d.module_version == "6.14.14"
    assert d.rocminfo is not None and d.rocminfo.failure is None
    out = json.loads(json.dumps(d.to_json()))
    assert set(out) == {"gpus", "target", "profile", "visible_devices", "warnings"}
    assert out["target"] == ["gfx1201"] and out["profile"] == "rdna4"
    assert any("hidden at run time" in w and "gfx1036" in w for w in out["warnings"])


def test_sysfs_alone_gives_the_same_gpus(tmp_path, no_rocm):
    root = f1_host(tmp_path / "root")
    d = detect.detect(sysfs_root=root)
    assert d.rocminfo is None
    assert [(g.arch, g.pci, g.integrated, g.source) for g in d.gpus] == [
        ("gfx1201", "0000:03:00.0", False, "kfd+pci"),
        ("gfx1036", "0000:76:00.0", True, "kfd+pci")]
    # KFD unique_id in hex is rocminfo's Uuid (S1 node 1 vs F1 agent 2)
    assert d.gpus[0].uuid == "GPU-2b09110b94528d60"
    assert d.gpus[0].vram_mib == 17095983104 >> 20
    assert d.gpus[0].marketing_name == "AMD Radeon RX 9070 XT"    # device 7550 rev c0
    assert d.visible_devices == "GPU-2b09110b94528d60"


def test_sysfs_root_comes_from_the_environment(tmp_path, no_rocm, monkeypatch):
    root = f1_host(tmp_path / "root")
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(root))
    assert detect.detect().target == ("gfx1201",)


def test_pci_only_uses_the_id_table(tmp_path, no_rocm):
    root = fake_sysfs(tmp_path / "root", kfd=None, pci=P_PCI)
    d = detect.detect(sysfs_root=root)
    assert [(g.arch, g.pci, g.integrated, g.source) for g in d.gpus] == [
        ("gfx1201", "0000:03:00.0", False, "pci"), ("gfx1036", "0000:76:00.0", True, "pci")]
    assert d.target == ("gfx1201",)
    assert d.visible_devices == ""          # no runtime index known: nothing to hide by
    assert sum("not usable for compute" in w for w in d.warnings) == 2


def test_f3_with_s4_rx9060xt(tmp_path, no_rocm, monkeypatch):
    root = fake_sysfs(tmp_path / "root", kfd=S4_KFD, amdgpu="6.16.13",
                      pci=[{"address": "0000:04:00.0", "device": 0x7590, "class": 0x030000,
                            "revision": 0xC0, "driver": "amdgpu"}])
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, fixture("F3")).parent))
    d = detect.detect(sysfs_root=root)
    [g] = d.gpus
    assert (g.arch, g.marketing_name, g.pci, g.source) == (
        "gfx1200", "AMD Radeon RX 9060 XT", "0000:04:00.0", "rocminfo+kfd+pci")
    assert d.target == ("gfx1200",) and d.visible_devices == "" and d.warnings == []


def test_f4_with_s3_strix_halo_alone_is_the_strix_halo_target(tmp_path, no_rocm, monkeypatch):
    root = fake_sysfs(tmp_path / "root", kfd=S3_KFD, amdgpu="in-tree")
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, fixture("F4")).parent))
    d = detect.detect(sysfs_root=root)
    [g] = d.gpus
    assert (g.arch, g.integrated, g.pci, g.vram_mib) == ("gfx1151", True, "0000:c1:00.0", None)
    assert (d.target, d.profile, d.visible_devices) == (("gfx1151",), "strix-halo", "")
    assert detect.choose_target(d, None, False) == ("gfx1151",)


def test_override_is_seen_and_the_real_arch_wins(tmp_path, no_rocm, monkeypatch):
    # ROCm/ROCm#5657: an RX 9060 XT reported as gfx1100 under HSA_OVERRIDE_GFX_VERSION
    text = fixture("F3").replace("  Name:                    gfx1200   ",
                                 "  Name:                    gfx1100   ", 1)
    assert text != fixture("F3")
    root = fake_sysfs(tmp_path / "root", kfd=S4_KFD)
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, text).parent))
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "11.0.0")
    d = detect.detect(sysfs_root=root)
    [g] = d.gpus
    assert (g.arch, g.reported_arch) == ("gfx1200", "gfx1100")
    assert d.target == ("gfx1200",)
    assert any("HSA_OVERRIDE_GFX_VERSION=11.0.0" in w and "gfx1100" in w for w in d.warnings)
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION")
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION_1", "11.0.0")
    d = detect.detect(sysfs_root=root)
    assert any("HSA_OVERRIDE_GFX_VERSION_1=11.0.0" in w for w in d.warnings)


def test_override_without_kfd_is_caught_by_the_chip_id(tmp_path, no_rocm, monkeypatch):
    text = fixture("F3").replace("Name:                    gfx1200", "Name:                    gfx1100", 1)
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, text).parent))
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root"))
    assert [(g.arch, g.reported_arch, g.source) for g in d.gpus] == [
        ("gfx1200", "gfx1100", "rocminfo")]
    assert any("an HSA_OVERRIDE_GFX_VERSION setting is active" in w for w in d.warnings)


@pytest.mark.parametrize("name", [f"E{i}" for i in range(1, 9)])
def test_rocminfo_failures_fall_back_to_sysfs(tmp_path, no_rocm, monkeypatch, name):
    root = f1_host(tmp_path / "root")
    exe = fake_rocminfo(tmp_path, fixture(name), exit=EXIT_CODES[name])
    monkeypatch.setenv("PATH", str(exe.parent))
    d = detect.detect(sysfs_root=root)
    assert d.target == ("gfx1201",)
    assert [g.source for g in d.gpus] == ["kfd+pci", "kfd+pci"]
    assert d.rocminfo.failure is not None
    assert any(w.startswith("rocminfo failed") for w in d.warnings)


def test_e9_hang_is_stopped_by_the_timeout(tmp_path, no_rocm, monkeypatch):
    monkeypatch.setattr("installer.rocminfo.ROCMINFO_TIMEOUT", 1.0)
    root = f1_host(tmp_path / "root")
    half = fixture("F1")[:4000]   # output stops mid-agent, then nothing (ROCm/ROCm#5812)
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, half, hang=True).parent))
    start = time.monotonic()
    d = detect.detect(sysfs_root=root)
    assert time.monotonic() - start < 8
    assert d.rocminfo.timed_out and d.rocminfo.failure.kind == "hang"
    assert d.target == ("gfx1201",)


def test_rocminfo_from_the_prefix_toolchain(tmp_path, no_rocm):
    prefix = tmp_path / "prefix"
    exe = fake_rocminfo(tmp_path, fixture("F3"))
    (prefix / "rocm" / "bin").mkdir(parents=True)
    (prefix / "rocm" / "bin" / "rocminfo").symlink_to(exe)
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root"), prefix=prefix)
    assert d.rocminfo.path == str(prefix / "rocm" / "bin" / "rocminfo")
    assert d.target == ("gfx1200",)


def test_visibility_variables_do_not_reach_rocminfo(tmp_path, no_rocm, monkeypatch):
    exe = fake_rocminfo(tmp_path, fixture("F3"))
    # a rocminfo that honours ROCR_VISIBLE_DEVICES=-1 would list no GPU
    exe.write_text(exe.read_text().replace("exit 0", '[ -n "$ROCR_VISIBLE_DEVICES" ] && exit 3\nexit 0'))
    monkeypatch.setenv("PATH", str(exe.parent))
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "-1")
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root"))
    assert d.rocminfo.failure is None
    assert any("ROCR_VISIBLE_DEVICES=-1 is set" in w for w in d.warnings)


# ---------------------------------------------------------------- S6 negative cases

def test_cpu_only_topology_with_an_rdna4_card_on_pci(tmp_path, no_rocm):
    # kernel too old or PCIe atomics rejected: lspci shows 1002:7550, KFD has node 0 only
    root = fake_sysfs(tmp_path / "root", kfd={0: CPU_NODE}, pci=P_PCI[2:3], amdgpu="in-tree")
    d = detect.detect(sysfs_root=root)
    [g] = d.gpus
    assert (g.arch, g.source) == ("gfx1201", "pci")
    assert any("KFD has no node" in w for w in d.warnings)


def test_unreadable_kfd_node_is_reported(tmp_path, no_rocm, monkeypatch):
    root = f1_host(tmp_path / "root")
    hidden = root / "sys/class/kfd/kfd/topology/nodes/2/properties"
    real_read = type(hidden).read_text

    def read_text(self, *a, **kw):
        # a device cgroup makes the kernel answer EPERM (kfd_topology.c); root
        # ignores file modes, so the error is injected here
        if self == hidden:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_read(self, *a, **kw)

    monkeypatch.setattr(type(hidden), "read_text", read_text)
    d = detect.detect(sysfs_root=root)
    assert any("KFD node 2 is hidden" in w for w in d.warnings)
    assert [(g.arch, g.source) for g in d.gpus] == [("gfx1201", "kfd+pci"), ("gfx1036", "pci")]


def test_missing_kfd_and_gpuless_host(tmp_path, no_rocm):
    d = detect.detect(sysfs_root=gpuless_host(tmp_path / "root"))
    assert d.gpus == [] and d.target == () and d.visible_devices == ""
    assert not d.kfd_present
    assert "no AMD GPU found" in detect.format_table(d)
    with pytest.raises(UsageError):
        detect.choose_target(d, None, False)
    assert detect.choose_target(d, "gfx1201", False) == ("gfx1201",)


def test_this_machine_does_not_crash():
    d = detect.detect()
    json.dumps(d.to_json())
    assert isinstance(detect.format_table(d), str)


# ---------------------------------------------------------------- several GPUs

def _dgpu(index, version, device, location, unique):
    return {"cpu_cores_count": 0, "simd_count": 128, "gfx_target_version": version,
            "vendor_id": 4098, "device_id": device, "location_id": location, "domain": 0,
            "drm_render_minor": 127 + index, "unique_id": unique}


def test_two_rdna4_archs_and_an_igpu(tmp_path, no_rocm):
    kfd = {0: CPU_NODE, 1: _dgpu(1, 120001, 0x7550, 768, 0x81BA7E079F6F7889),
           2: _dgpu(2, 120000, 0x7590, 1024, 0x5C9359C20EF65D63),
           3: {**_dgpu(3, 100306, 0x13C0, 30208, 0), "simd_count": 4}}
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root", kfd=kfd))
    assert [g.arch for g in d.gpus] == ["gfx1201", "gfx1200", "gfx1036"]
    assert d.target == ("gfx1200", "gfx1201")
    assert d.visible_devices == "GPU-81ba7e079f6f7889,GPU-5c9359c20ef65d63"
    assert detect.choose_target(d, None, False) == ("gfx1200", "gfx1201")


def test_gpu_without_unique_id_is_named_by_index(tmp_path, no_rocm):
    kfd = {0: CPU_NODE, 1: {**_dgpu(1, 100306, 0x13C0, 30208, 0), "simd_count": 4},
           2: _dgpu(2, 120001, 0x7550, 768, 0)}
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root", kfd=kfd))
    assert d.visible_devices == "1"      # ROCr index among GPU agents, iGPU first here


# ---------------------------------------------------------------- choose_target

def _detection(*archs):
    gpus = [detect.GPU(a, "x", None, None, False, "kfd", node=i) for i, a in enumerate(archs)]
    profile = detect.propose(gpus, targetprofile.load_all())
    return detect.Detection(gpus, tuple(sorted({g.arch for g in gpus if g.targeted})), "", profile=profile)


def test_choose_target_accepts_lists_and_refuses_other_arches():
    d = _detection()
    assert detect.choose_target(d, "gfx1201,gfx1200", False) == ("gfx1200", "gfx1201")
    assert detect.choose_target(d, ["gfx1201", "gfx1201"], False) == ("gfx1201",)
    with pytest.raises(UsageError) as err:
        detect.choose_target(d, "gfx1100", False)
    assert "--allow-unsupported-arch" in err.value.hint
    assert detect.choose_target(d, "gfx1100", True) == ("gfx1100",)
    assert any("unsupported arch gfx1100" in w for w in d.warnings)
    with pytest.raises(UsageError):
        detect.choose_target(d, "rx9070", True)


def test_choose_target_warns_when_the_choice_differs_from_the_host():
    d = _detection("gfx1201")
    assert detect.choose_target(d, None, False) == ("gfx1201",)
    assert d.warnings == []
    assert detect.choose_target(d, "gfx1200", False) == ("gfx1200",)
    assert any("this host's target is gfx1201" in w for w in d.warnings)


def test_format_table_lists_every_gpu(tmp_path, no_rocm, monkeypatch):
    root = f1_host(tmp_path / "root")
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, fixture("F1")).parent))
    table = detect.format_table(detect.detect(sysfs_root=root))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ARCH", "NAME", "PCI"]
    assert "gfx1201" in lines[1] and "discrete" in lines[1] and "yes" in lines[1]
    assert "gfx1036" in lines[2] and "integrated" in lines[2]
    assert "target: gfx1201" in table
    assert "ROCR_VISIBLE_DEVICES=GPU-2b09110b94528d60" in table


def test_gpu_json_has_exactly_the_documented_keys():
    g = detect.GPU("gfx1201", "n", "0000:03:00.0", 1, False, "pci")
    assert list(g.to_json()) == ["arch", "marketing_name", "pci", "vram_mib", "integrated", "source"]
    assert dataclasses.is_dataclass(detect.Detection)


# ---------------------------------------------------------------- AMD's tables

def test_rdna4_is_what_amds_table_files_with_gfx1201():
    from installer import targets

    rdna4 = targetprofile.load_all()["rdna4"].archs
    assert rdna4 == targets.same_family("gfx1201") == targets.same_family("gfx1200")
    assert targets.family("gfx1201") == "RDNA4" and targets.family("gfx1100") == "RDNA3"
    # newer than the pinned table: still named as LLVM's offload-arch would
    assert detect.gfx_name(150203) == "gfx1523"


def test_gpu_arch_must_be_a_target_amd_knows():
    none = detect.Detection([], (), "")
    with pytest.raises(UsageError, match="gfx9999 is not a GFX target AMD knows"):
        detect.choose_target(none, "gfx9999", allow_unsupported=True)
    with pytest.raises(UsageError, match=r"gfx1100 is not a supported target \(gfx1100 is RDNA3\)"):
        detect.choose_target(none, "gfx1100", allow_unsupported=False)
    assert detect.choose_target(none, "gfx1100", allow_unsupported=True) == ("gfx1100",)


AMDGPU_IDS = """# List of AMDGPU IDs
#
# Syntax:
# device_id,\trevision_id,\tproduct_name        <-- single tab after comma

1.0.0
7550,\tC0,\tAMD Radeon RX 9070 XT (this host's amdgpu.ids)
7590,\tC0,\tAMD Radeon RX 9060 XT
"""


@pytest.mark.parametrize("where", ["usr/share/libdrm/amdgpu.ids", "opt/amdgpu/share/libdrm/amdgpu.ids"])
def test_marketing_names_come_from_the_hosts_amdgpu_ids(tmp_path, no_rocm, where):
    pci = [{"address": "0000:03:00.0", "device": 0x7550, "class": 0x030000, "revision": 0xC0},
           {"address": "0000:04:00.0", "device": 0x7551, "class": 0x030000, "revision": 0xC0}]
    root = fake_sysfs(tmp_path / "root", kfd=None, pci=pci)
    ids = root / where
    ids.parent.mkdir(parents=True)
    ids.write_text(AMDGPU_IDS)
    by_pci = {g.pci: g for g in detect.detect(sysfs_root=root).gpus}
    assert by_pci["0000:03:00.0"].marketing_name == "AMD Radeon RX 9070 XT (this host's amdgpu.ids)"
    # a card the host's file does not list: the built-in table
    assert by_pci["0000:04:00.0"].marketing_name == "AMD Radeon AI PRO R9700"
    assert {g.arch for g in by_pci.values()} == {"gfx1201"}
def test_an_apu_seen_only_by_rocminfo_is_not_targeted(tmp_path, no_rocm, monkeypatch):
    """No KFD, no PCI: only rocminfo's "Memory Properties: APU" says it is integrated
    (the chip id is one no table knows), so that flag alone must keep it out."""
    gpu_at = fixture("F3").index("  Name:                    gfx1200")
    head, tail = fixture("F3")[:gpu_at], fixture("F3")[gpu_at:]
    tail = tail.replace("  Memory Properties:       \n", "  Memory Properties:       APU\n", 1)
    tail = tail.replace("Chip ID:                 30096(0x7590)", "Chip ID:                 4660(0x1234)", 1)
    assert "APU" in tail and "0x1234" in tail
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, head + tail).parent))
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "root"))
    [g] = d.gpus
    assert (g.arch, g.integrated, g.source) == ("gfx1200", True, "rocminfo")
    assert not g.targeted and d.target == ()


def test_an_override_on_an_rdna4_host_warns_even_without_a_mismatch(tmp_path, no_rocm, monkeypatch):
    root = fake_sysfs(tmp_path / "root", kfd=S4_KFD)
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, fixture("F3")).parent))
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "12.0.0")
    d = detect.detect(sysfs_root=root)
    [g] = d.gpus
    assert (g.arch, g.reported_arch) == ("gfx1200", None) and d.target == ("gfx1200",)
    assert d.warnings == ["HSA_OVERRIDE_GFX_VERSION is set; rdna4 GPUs need no override (unset it)"]
