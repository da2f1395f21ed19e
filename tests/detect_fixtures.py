"""Fake GPUs for tests: rocminfo executables and sysfs trees.

The captured outputs in tests/data/detect/ come from the fact sheet
(rebuilt from public ROCm issue reports: ROCm/ROCm#5814 F1, #5999 F3, #5745 F4):
rocminfo-F1/F3/F4 (RX 9070 XT + gfx1036 iGPU, RX 9060 XT, Strix Halo + NPU),
rocminfo-E1..E8 (failure outputs, ESC bytes real) and the S1 KFD properties
files. S3/S4 and the PCI fixture P are small tables there and live below.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping

DATA = Path(__file__).parent / "data" / "detect"

# exit status of each captured failure (rocminfo.cc's exit paths, ROCm/rocminfo)
EXIT_CODES = {"E1": 1, "E2": 1, "E3": 1, "E4": 1, "E5": 1, "E6": 8, "E7": 8, "E8": 1}


def fixture(name: str) -> str:
    """A captured rocminfo output, bytes as stored (trailing spaces, ESC codes)."""
    with open(DATA / f"rocminfo-{name}.txt", encoding="utf-8", newline="") as f:
        return f.read()


def fake_rocminfo(tmp_path: Path, text: str = "", *, hang: bool = False, exit: int = 0,
                  name: str = "rocminfo") -> Path:
    """Write an executable that prints `text`, then hangs or exits with `exit`.

    Returns its path; put its parent first on PATH. The hang keeps what was
    printed so far in the pipe, like a stuck rocminfo.
    """
    bindir = tmp_path / "fakebin"
    bindir.mkdir(parents=True, exist_ok=True)
    data = bindir / f"{name}.out"
    with open(data, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    # absolute paths: tests often run these with a PATH holding only fakes
    system_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"])
    cat, sleep = shutil.which("cat", path=system_path), shutil.which("sleep", path=system_path)
    tail = f"exec {sleep} 600\n" if hang else f"exit {exit}\n"
    exe = bindir / name
    exe.write_text(f"#!/bin/sh\n{cat} '{data}'\n{tail}")
    exe.chmod(0o755)
    return exe


# ------------------------------------------------------------------ sysfs

def s1_kfd() -> dict[int, str]:
    """S1: the F1 machine's KFD nodes (CPU, RX 9070 XT, gfx1036 iGPU)."""
    return {n: (DATA / f"kfd-S1-node{n}.properties").read_text() for n in (0, 1, 2)}


S1_MEM_BANKS = {1: (DATA / "kfd-S1-node1-mem_banks0.properties").read_text()}

CPU_NODE = {"cpu_cores_count": 32, "simd_count": 0, "gfx_target_version": 0, "vendor_id": 0,
            "device_id": 0, "location_id": 0, "domain": 0, "drm_render_minor": 0}

# S3: Strix Halo node 1 (ROCm/ROCm#5745)
S3_KFD = {0: CPU_NODE, 1: {"cpu_cores_count": 0, "simd_count": 80, "gfx_target_version": 110501,
                           "vendor_id": 4098, "device_id": 5510, "location_id": 49408,
                           "domain": 0, "drm_render_minor": 128, "unique_id": 0}}

# S4: RX 9060 XT node 1 (ROCm/ROCm#5999); vendor_id is the AMD constant
S4_KFD = {0: {**CPU_NODE, "cpu_cores_count": 4},
          1: {"cpu_cores_count": 0, "simd_count": 64, "gfx_target_version": 120000,
              "vendor_id": 4098, "device_id": 30096, "location_id": 1024, "domain": 0}}

# P: PCI functions of the F1 machine (ROCm/ROCm#5814): bridges and audio must be rejected
P_PCI = [
    {"address": "0000:01:00.0", "device": 0x1478, "class": 0x060400, "revision": 0x24},
    {"address": "0000:02:00.0", "device": 0x1479, "class": 0x060400, "revision": 0x24},
    {"address": "0000:03:00.0", "device": 0x7550, "class": 0x030000, "revision": 0xC0,
     "driver": "amdgpu"},
    {"address": "0000:03:00.1", "device": 0xAB40, "class": 0x040300, "revision": 0x00},
    {"address": "0000:76:00.0", "device": 0x13C0, "class": 0x030000, "revision": 0xC5,
     "driver": "amdgpu"},
    {"address": "0000:76:00.1", "device": 0x1640, "class": 0x040300, "revision": 0x00},
]


def _props(value: str | Mapping[str, int]) -> str:
    if isinstance(value, str):
        return value
    return "".join(f"{k} {v}\n" for k, v in value.items())


def fake_sysfs(root: Path, *, kfd: Mapping[int, str | Mapping[str, int]] | None = None,
               mem_banks: Mapping[int, str | Mapping[str, int]] | None = None,
               pci: Iterable[Mapping] = (), amdgpu: str | None = None,
               initstate: str | None = "live", kfd_dev: int | None = None,
               render: Mapping[int, int] | None = None,
               p2p: Mapping[int, Iterable[int]] | None = None) -> Path:
    """Build a fake /sys + /dev tree under `root` (point RDNA4_SYSFS_ROOT at it).

    kfd: node index -> properties text or dict (None: no /sys/class/kfd at all).
    p2p: node index -> the nodes its p2p_links/<i>/properties name as node_to.
    pci: dicts with address, device, class, revision and optional driver, vram.
    amdgpu: None (module absent), "in-tree", or a DKMS version such as "6.16.13".
    initstate: "live", another state, or None (amdgpu built into the kernel).
    kfd_dev: mode of a fake /dev/kfd (None: absent); render: minor -> mode.
    """
    root.mkdir(parents=True, exist_ok=True)
    if kfd is not None:
        nodes = root / "sys/class/kfd/kfd/topology/nodes"
        nodes.mkdir(parents=True)
        (nodes.parent / "generation_id").write_text("1\n")
        for index, props in kfd.items():
            node = nodes / str(index)
            node.mkdir()
            (node / "properties").write_text(_props(props))
            text = _props(props)
            is_gpu = re.search(r"^simd_count [1-9]", text, re.M) is not None
            (node / "gpu_id").write_text(f"{4000 + index if is_gpu else 0}\n")
            (node / "name").write_text("ip discovery\n" if is_gpu else "\n")
            if mem_banks and index in mem_banks:
                bank = node / "mem_banks" / "0"
                bank.mkdir(parents=True)
                (bank / "properties").write_text(_props(mem_banks[index]))
            # kfd_topology.c iolink_show: one properties file per link, "name value" lines
            for i, to in enumerate((p2p or {}).get(index, ())):
                link = node / "p2p_links" / str(i)
                link.mkdir(parents=True)
                (link / "properties").write_text(_props(
                    {"type": 2, "version_major": 0, "version_minor": 0, "node_from": index,
                     "node_to": to, "weight": 40, "min_latency": 0, "max_latency": 0,
                     "min_bandwidth": 312, "max_bandwidth": 64000,
                     "recommended_transfer_size": 0, "flags": 1}))
    devices = root / "sys/bus/pci/devices"
    devices.mkdir(parents=True, exist_ok=True)
    drivers = root / "sys/bus/pci/drivers"
    for fn in pci:
        d = devices / fn["address"]
        d.mkdir()
        (d / "vendor").write_text(f"0x{fn.get('vendor', 0x1002):04x}\n")
        (d / "device").write_text(f"0x{fn['device']:04x}\n")
        (d / "class").write_text(f"0x{fn['class']:06x}\n")
        (d / "revision").write_text(f"0x{fn.get('revision', 0):02x}\n")
        if fn.get("driver"):
            (drivers / fn["driver"]).mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(drivers / fn["driver"], d), d / "driver")
        if fn.get("vram"):
            (d / "mem_info_vram_total").write_text(f"{fn['vram']}\n")
    if amdgpu is not None:
        module = root / "sys/module/amdgpu"
        module.mkdir(parents=True)
        if initstate is not None:
            (module / "initstate").write_text(f"{initstate}\n")
        if amdgpu != "in-tree":
            (module / "version").write_text(f"{amdgpu}\n")
    if kfd_dev is not None:
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev/kfd").write_text("")
        (root / "dev/kfd").chmod(kfd_dev)
    for minor, mode in (render or {}).items():
        dri = root / "dev/dri"
        dri.mkdir(parents=True, exist_ok=True)
        (dri / f"renderD{minor}").write_text("")
        (dri / f"renderD{minor}").chmod(mode)
    return root


def f1_host(root: Path, **kw) -> Path:
    """The F1 machine: S1 KFD nodes, the P PCI functions, DKMS 6.14.14, devices 0660."""
    args = dict(kfd=s1_kfd(), mem_banks=S1_MEM_BANKS, pci=P_PCI, amdgpu="6.14.14",
                kfd_dev=0o660, render={128: 0o660, 129: 0o660})
    args.update(kw)
    return fake_sysfs(root, **args)


def r9700(location_id: int, unique_id: int) -> dict[str, int]:
    """A Radeon AI PRO R9700 KFD node (0x7551, GC 12.0.1)."""
    return {"cpu_cores_count": 0, "simd_count": 128, "gfx_target_version": 120001,
            "vendor_id": 4098, "device_id": 0x7551, "location_id": location_id, "domain": 0,
            "drm_render_minor": 128, "unique_id": unique_id}


R9700_UUIDS = ("GPU-1a2b3c4d5e6f7081", "GPU-2b3c4d5e6f708192")
# S1's gfx1036 iGPU (Raphael/Granite Ridge), without a unique id as iGPUs have
IGPU_1036 = {"cpu_cores_count": 0, "simd_count": 4, "gfx_target_version": 100306,
             "vendor_id": 4098, "device_id": 0x13C0, "location_id": 0x7600, "domain": 0,
             "unique_id": 0}


def dual_r9700_host(root: Path, *, p2p: bool = True, igpu: bool = True, cards: int = 2) -> Path:
    """A workstation with `cards` R9700s (KFD nodes 1..), optionally the gfx1036 iGPU after
    them, and with p2p each card's p2p_links naming every other card (plus the CPU node,
    as a multi-socket kernel lists indirect CPU links there too)."""
    kfd: dict[int, Mapping[str, int]] = {0: CPU_NODE}
    for i in range(cards):
        kfd[1 + i] = r9700(0x0300 + 0x1000 * i, int(R9700_UUIDS[i % 2][4:], 16) + i // 2)
    if igpu:
        kfd[1 + cards] = IGPU_1036
    gpus = range(1, cards + 1)
    links = {a: [0] + ([b for b in gpus if b != a] if p2p else []) for a in gpus}
    return fake_sysfs(root, kfd=kfd, p2p=links)


def gpuless_host(root: Path) -> Path:
    """A build box: no amdgpu, no KFD, no AMD PCI functions, no /dev/kfd."""
    return fake_sysfs(root, kfd=None, pci=[{"address": "0000:00:02.0", "vendor": 0x8086,
                                             "device": 0x3e92, "class": 0x030000}])


# ------------------------------------------------------------------ noise

_ESC = "\x1b"


def add_noise(text: str, seed: int, *, strip: bool = False) -> str:
    """The same output as a terminal, a CRLF file or a paste would carry it.

    Adds random trailing whitespace, ANSI colour codes around lines, CRLF line
    ends; `strip` instead drops all leading and trailing whitespace of every
    line (a GitHub paste).
    """
    rng = random.Random(seed)
    out = []
    for line in text.split("\n"):
        if strip:
            out.append(line.strip())
            continue
        if rng.random() < 0.3:
            line = f"{_ESC}[{rng.choice(['31', '37', '1;32', '0'])}m{line}{_ESC}[0m"
        line += rng.choice([" ", "  ", "\t", " " * rng.randint(1, 40)])
        out.append(line)
    sep = "\n" if strip else rng.choice(["\r\n", "\n"])
    return sep.join(out)


# A 9070 XT KFD node (0x7550, GC 12.0.1) for a Strix Halo box with a card beside the APU
RX9070XT = {"cpu_cores_count": 0, "simd_count": 128, "gfx_target_version": 120001,
            "vendor_id": 4098, "device_id": 0x7550, "location_id": 0x0300, "domain": 0,
            "drm_render_minor": 129, "unique_id": 0x2B09110B94528D60}
RX9070XT_UUID = "GPU-2b09110b94528d60"
# PCI functions: Strix Halo's GPU (1002:1586, revision c1 per amdgpu.ids) with its BIOS
# carve-out as VRAM (512 MiB, the smallest UMA setting), and the card
STRIX_PCI = {"address": "0000:c1:00.0", "device": 0x1586, "class": 0x038000, "revision": 0xC1,
             "driver": "amdgpu", "vram": 512 << 20}
RX9070XT_PCI = {"address": "0000:03:00.0", "device": 0x7550, "class": 0x030000, "revision": 0xC0,
                "driver": "amdgpu", "vram": 16 << 30}


# MemTotal of a 128 GB Strix Halo with the 512 MiB carve-out: AMD's amd-ttm example prints
# "Total system memory: 125.65 GB" beside the default "16469033 pages (62.82 GB)", which is
# exactly half of these 32,938,066 pages (amd-debug-tools 0.2.22 docs/amd-ttm.md)
MEM_128_KIB = 131_752_264
PAGE = 4096


def strix_halo_host(root: Path, *, dgpu: bool = False, mem_total_kib: int | None = MEM_128_KIB,
                    gttsize: int | None = -1, pages_limit: int | None = None,
                    gtt_total: int | None = None, ttm_module: str = "ttm", **kw) -> Path:
    """A Framework-Desktop-like Strix Halo box (S3's KFD nodes, ROCm/ROCm#5745), optionally with
    an RX 9070 XT: KFD numbers the card after the APU's GPU, as both sit on the same kernel.

    Its memory as the kernel shows it: /proc/meminfo MemTotal (None: no file), amdgpu's
    gttsize parameter in MiB (-1 = not set, None: no file), ttm's pages_limit (None: the
    kernel default, half of RAM; under amdgpu-dkms the module is "amdttm") and the GPU's
    mem_info_gtt_total (None: what the kernel derives: gttsize when set, else pages_limit).
    """
    kfd: dict[int, Mapping[str, int]] = dict(S3_KFD)
    pci = [STRIX_PCI]
    if dgpu:
        kfd[2] = RX9070XT
        pci.append(RX9070XT_PCI)
    args = dict(kfd=kfd, pci=pci, amdgpu="in-tree", kfd_dev=0o666, render={128: 0o666, 129: 0o666})
    args.update(kw)
    fake_sysfs(root, **args)
    if mem_total_kib is not None:
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc/meminfo").write_text(f"MemTotal:       {mem_total_kib} kB\n"
                                           f"MemFree:        {mem_total_kib // 2} kB\n")
        if pages_limit is None:
            pages_limit = mem_total_kib * 1024 // PAGE // 2
    if pages_limit is not None:
        params = root / f"sys/module/{ttm_module}/parameters"
        params.mkdir(parents=True)
        (params / "pages_limit").write_text(f"{pages_limit}\n")
    if gttsize is not None and args.get("amdgpu") is not None:
        params = root / "sys/module/amdgpu/parameters"
        params.mkdir(parents=True, exist_ok=True)
        (params / "gttsize").write_text(f"{gttsize}\n")
    if gtt_total is None:
        gtt_total = gttsize << 20 if gttsize and gttsize > 0 else (pages_limit or 0) * PAGE
    gpu = root / "sys/bus/pci/devices" / STRIX_PCI["address"]
    if gtt_total and gpu.is_dir():
        (gpu / "mem_info_gtt_total").write_text(f"{gtt_total}\n")
    return root


def strix_halo_with_9070xt_rocminfo() -> str:
    """F4 (Strix Halo + NPU, ROCm/ROCm#5745) with F1's RX 9070 XT agent (ROCm/ROCm#5814) added
    as the next agent on KFD node 2, as rocminfo prints a box with both (strix_halo_host(dgpu=True))."""
    f4, f1 = fixture("F4"), fixture("F1")
    start = f1.index("*******                  \nAgent 2")
    card = f1[start:f1.index("*******                  \nAgent 3")]
    card = card.replace("Agent 2", "Agent 4", 1)
    card = re.sub(r"(  Node:\s+)1( +)", r"\g<1>2\2", card, count=1)
    done = f4.index("*** Done ***")
    return f4[:done] + card + f4[done:]
