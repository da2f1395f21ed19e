"""Unified memory on an APU (Strix Halo): how much RAM its GPU may map, and what torch makes of it.

An APU has no memory of its own. The BIOS carve-out shows up as VRAM
(PCI mem_info_vram_total, often 512 MiB), and everything else the GPU uses is
system RAM mapped through GTT, whose size the kernel caps at half of RAM by
default (ttm pages_limit; amdgpu.gttsize when set). AMD's guide
(https://rocm.docs.amd.com/en/latest/how-to/system-optimization/strixhalo.html,
source docs/how-to/system-optimization/strixhalo.rst, seen in the prbasyal-amd/ROCm
fork at 7ab479613e899f78b21024c03ac8aef72c8bf79d) says: keep the carve-out small,
raise the TTM limit, and gives `amd-ttm --set <GB>` (PyPI amd-debug-tools), which
writes `options ttm pages_limit=<pages>` to /etc/modprobe.d/ttm.conf and asks before
more than 90% of RAM (amd-debug-tools 0.2.22 src/amd_debug/ttm.py).

Everything is read under $RDNA4_SYSFS_ROOT (detect.resolve_root), never written:
raising the limit needs root and a reboot, so doctor prints the lines for the user.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import detect as det

GIB = 1024 ** 3
MIB = 1024 ** 2
PAGE = 4096               # TTM counts 4 KiB pages (amd-debug-tools gb_to_pages: GB * 2**30 / 4096)
# amd-ttm --set asks "This could cause system instability. Continue anyway?" above
# this share of MemTotal (amd-debug-tools 0.2.22 ttm.py MAX_MEMORY_PERCENTAGE = 90)
AMD_TTM_MAX_SHARE = 0.90
# the kernel default is half of RAM (AMD's guide: "approximately 50%"; amd-ttm docs:
# "system memory / 2"); up to this share counts as "still about the default" (our threshold)
ABOUT_HALF = 0.60
# vLLM 0.33.0 vllm/config/cache.py: gpu_memory_utilization defaults to 0.92, and
# vllm/v1/worker/utils.py request_memory() refuses to start when torch's free memory
# is below that share of torch's total (ValueError "Free memory on device ...")
VLLM_DEFAULT_UTILIZATION = 0.92
NOTE_FILE = "device-memory.txt"   # in PREFIX/.rdna4: verify's failing verdict; activation shows it
GUIDE = "AMD's Strix Halo guide, rocm.docs.amd.com/en/latest/how-to/system-optimization/strixhalo.html"


@dataclass(frozen=True)
class Memory:
    """The memory numbers of one APU's GPU, as sysfs has them (None: file absent)."""

    pci: str
    vram: int | None          # bytes: the BIOS carve-out (mem_info_vram_total)
    gtt: int | None           # bytes: the GPU's GTT size (mem_info_gtt_total)
    gttsize_mib: int | None   # amdgpu.gttsize module parameter; -1 = not set
    pages_limit: int | None   # TTM's limit in 4 KiB pages (the effective value, default RAM/2)
    ttm_module: str           # "ttm", or "amdttm" under amdgpu-dkms
    ram: int | None           # bytes: MemTotal

    @property
    def limit(self) -> int | None:
        """What the GPU can map: GTT's size, capped by TTM's page limit (either may be lower;
        the kernel warns "GTT size has been set as X but TTM size has been set as Y")."""
        known = [v for v in (self.gtt, self.pages_limit * PAGE if self.pages_limit else None) if v]
        return min(known) if known else None


def _int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def gpu_address(root: Path, archs: Iterable[str]) -> str | None:
    """The PCI address of the first integrated GPU of `archs` (by PCI id, as detection knows it)."""
    archs = set(archs)
    for dev in det.read_pci(root):
        known = det.PCI_IDS.get(dev.device)
        if known and known[0] in archs and known[1]:
            return dev.address
    return None


def read(root: Path, pci: str) -> Memory:
    base = det.under(root, det.PCI_DEVICES) / pci
    # amdgpu-dkms brings its own TTM module, amdttm, whose parameter is amdttm.pages_limit (users'
    # reports, e.g. jeffgeerling.com "Increasing the VRAM allocation on AMD AI APUs under Linux";
    # AMD's guide names only ttm: UNCONFIRMED by AMD)
    ttm = "amdttm" if det.under(root, "sys/module/amdttm/parameters/pages_limit").exists() else "ttm"
    from . import buildenv

    ram = buildenv.meminfo(det.under(root, "proc/meminfo")).get("MemTotal")
    return Memory(pci=pci, vram=_int(base / "mem_info_vram_total"), gtt=_int(base / "mem_info_gtt_total"),
                  gttsize_mib=_int(det.under(root, "sys/module/amdgpu/parameters/gttsize")),
                  pages_limit=_int(det.under(root, f"sys/module/{ttm}/parameters/pages_limit")),
                  ttm_module=ttm, ram=ram)


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def describe(m: Memory) -> str:
    gttsize = ("not set" if m.gttsize_mib in (None, -1) else f"{m.gttsize_mib} MiB")
    pages = "?" if m.pages_limit is None else f"{m.pages_limit} pages = {gib(m.pages_limit * PAGE)}"
    share = f" ({m.limit / m.ram:.0%} of RAM)" if m.limit and m.ram else ""
    notes = []
    if m.limit and m.ram and m.limit > AMD_TTM_MAX_SHARE * m.ram:
        notes.append(f"more than the 90% amd-ttm sets without asking: {gib(m.ram - m.limit)} left for the OS")
    if m.vram and m.vram >= 4 * GIB:
        notes.append("AMD recommends a small carve-out (0.5 GB) in the BIOS and a raised TTM limit instead")
    return (f"GPU at {m.pci}: carve-out (VRAM) {gib(m.vram)}; GTT {gib(m.gtt)} "
            f"(amdgpu.gttsize {gttsize}, {m.ttm_module}.pages_limit {pages}); RAM {gib(m.ram)}: "
            f"the GPU may map {gib(m.limit)}{share}" + "".join(f"; {n}" for n in notes))


def too_low(m: Memory) -> bool:
    """GTT still limits the GPU to about half of RAM (the kernel default)."""
    return bool(m.limit and m.ram and m.limit <= ABOUT_HALF * m.ram)


def target_gib(m: Memory) -> int:
    """The whole GiB amd-ttm sets without asking: 90% of MemTotal, rounded down."""
    return int(math.floor((m.ram or 0) * AMD_TTM_MAX_SHARE / GIB))


INITRAMFS = {"apt": "sudo update-initramfs -u", "dnf": "sudo dracut -f",
             "pacman": "sudo mkinitcpio -P", "zypper": "sudo dracut -f"}


def raise_lines(m: Memory, pm: str | None = None) -> list[str]:
    """What the user runs (as root, then reboots) to let the GPU map 90% of RAM; never run by us."""
    size = target_gib(m)
    pages = size * GIB // PAGE
    mod = m.ttm_module
    # amd-ttm regenerates the initramfs itself when ttm.ko is in it; by hand it is the distro's tool
    regen = (f" && {INITRAMFS[pm]}" if pm in INITRAMFS else
             ", then regenerate the initramfs (update-initramfs -u, dracut -f or mkinitcpio -P)")
    lines = [f"let the GPU map {size} GiB of {gib(m.ram)} RAM (90%: amd-ttm's limit before it asks), "
             f"then reboot; per {GUIDE}:",
             f"  pipx install amd-debug-tools && amd-ttm --set {size}",
             f"  or by hand: echo 'options {mod} pages_limit={pages}' | sudo tee /etc/modprobe.d/{mod}.conf"
             f"{regen}",
             f"  or on the kernel command line: {mod}.pages_limit={pages}"]
    if m.gttsize_mib not in (None, -1) and m.gttsize_mib * MIB < size * GIB:
        lines.append(f"  and remove amdgpu.gttsize={m.gttsize_mib} (kernel command line or /etc/modprobe.d):"
                     " it caps GTT below that and is deprecated in favour of ttm.pages_limit")
    return lines


# --- what torch reports ------------------------------------------------------------

def _near(a: int, b: int) -> bool:
    return abs(a - b) <= 0.1 * max(a, b)


def vllm_flags(free: int, total: int) -> str:
    """The vLLM 0.33.0 flags that size its memory explicitly, from torch's numbers at start."""
    # five points under torch's free share, in whole percent (float noise must not cost a point)
    util = max(math.floor(free * 100 / total + 1e-6) - 5, 5) / 100 if total else 0.5
    return (f"--gpu-memory-utilization {util:.2f} (below torch's free/total at start) "
            "--kv-cache-memory-bytes 16G (or what the model leaves; vllm/engine/arg_utils.py: "
            "it sizes the KV cache and ignores the utilization for it)")


def judge(total: int, free: int, m: Memory) -> tuple[bool, str]:
    """(fine?, what to say) for torch's device memory (mem_get_info total and free) against sysfs.

    Pure: the probe measures torch in the venv, this decides. vLLM sizes everything from
    torch's numbers, so torch naming the wrong pool breaks serving. Which pool torch names on
    a given kernel/ROCm is UNCONFIRMED on hardware: rocminfo's coarse pool on a Strix Halo is
    the GTT size (ROCm/ROCm#5745: 130023424 KB), and users report HIP totals of either pool
    (ROCm/ROCm#5444 sees 15.5 GB), so each case has its own verdict.
    """
    seen = f"torch reports {gib(total)} device memory ({gib(free)} free)"
    pool = m.limit
    if not m.vram or not pool:
        return True, f"{seen}; sysfs has no carve-out/GTT numbers to compare (GPU at {m.pci})"
    if _near(m.vram, pool):
        ok = _near(total, pool)
        return ok, (f"{seen}; the carve-out and the GTT limit are both about {gib(pool)}"
                    + ("" if ok else f": vLLM will mis-size its memory; size it with {vllm_flags(free, total)}"))
    if _near(total, m.vram):
        return False, (f"{seen}: the BIOS carve-out (VRAM), not the {gib(pool)} GTT pool the GPU "
                       "can map. vLLM sizes its weights and KV cache from that number, so it "
                       "refuses to start or gets almost no KV cache. A kernel whose amdgpu allocates "
                       "from GTT (AMD names Linux 6.18.4+ for Strix Halo) should fix it; meanwhile size "
                       f"vLLM explicitly: {vllm_flags(free, total)}")
    if _near(total, pool) or _near(total, pool + m.vram):
        needed = VLLM_DEFAULT_UTILIZATION * total
        if free < needed:
            return False, (f"{seen}: the GTT pool, shared with the CPU, instead of the "
                           f"{gib(m.vram)} carve-out. vLLM 0.33.0 asks for "
                           f"{VLLM_DEFAULT_UTILIZATION} x {gib(total)} = {gib(int(needed))} at start and "
                           "refuses ('Free memory on device ... is less than desired GPU memory "
                           f"utilization'); size its memory explicitly: {vllm_flags(free, total)}")
        return True, (f"{seen}: the GTT pool (the GPU's share of RAM, shared with the CPU); "
                      f"vLLM's --gpu-memory-utilization is a share of RAM here, so leave the OS room "
                      f"or size it explicitly: {vllm_flags(free, total)}")
    return False, (f"{seen}, neither the {gib(m.vram)} carve-out nor the {gib(pool)} GTT limit "
                   f"in sysfs: vLLM may refuse to start or mis-size its KV cache; size it "
                   f"explicitly: {vllm_flags(free, total)}")


def note_path(prefix: Path) -> Path:
    from . import state

    return state.meta_dir(prefix) / NOTE_FILE


def watched(root: Path, m: Memory) -> list[Path]:
    """The sysfs files a verdict depends on: the carve-out, GTT and TTM's limit."""
    base = det.under(root, det.PCI_DEVICES) / m.pci
    files = [base / "mem_info_vram_total", base / "mem_info_gtt_total",
             det.under(root, f"sys/module/{m.ttm_module}/parameters/pages_limit")]
    return [f for f in files if f.exists()]


def record(prefix: Path, problem: str | None, watch: Iterable[Path] = ()) -> None:
    """Keep verify's failing verdict where the activation script prints it (None: clear it).

    The file starts with one "VALUE PATH" line per watched sysfs file and a blank line, then
    the verdict: sourcing compares those files with their values now (a read each, no torch)
    and says the verdict is stale once the user changed GTT, TTM or the BIOS carve-out.
    """
    path = note_path(prefix)
    if problem is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    keys = "".join(f"{f.read_text().strip()} {f}\n" for f in watch)
    tmp.write_text(f"{keys}\nrdna4: verify found: {problem}\n"
                   "rdna4: rerun `rdna4-install verify` after changing GTT or BIOS memory settings\n")
    os.replace(tmp, path)


STALE = ("rdna4: the GPU memory settings changed since rdna4-install verify judged torch's "
         "device memory; rerun it")
