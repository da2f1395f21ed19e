"""Find the AMD GPUs of this host and propose the build target (a target profile).

Three sources, merged per physical GPU (keyed by PCI address):

* rocminfo (run and parsed by installer.rocminfo): what the ROCm runtime
  will expose; needs ROCm userspace and a working /dev/kfd, can hang (hence
  the timeout), reflects HSA_OVERRIDE_GFX_VERSION.
* the KFD topology in sysfs: the real hardware target; needs only amdgpu.
* PCI sysfs: works even when amdgpu or KFD is missing, through an id table.

Every sysfs and /dev path is read under $RDNA4_SYSFS_ROOT (default /) so tests
can point detection at a fake tree. Format details and their upstream sources
are in the comments next to each parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import targetprofile, targets
from .errors import UsageError
from .rocminfo import OVERRIDE, Agent, RocminfoRun, find_rocminfo, run_rocminfo

SYSFS_ROOT_ENV = "RDNA4_SYSFS_ROOT"
AMD_VENDOR = 0x1002

# PCI device id -> (arch, integrated, name when the revision is unknown,
# {revision: marketing name}). Names and revisions are the entries of mesa/drm
# data/amdgpu.ids (libdrm's marketing-name table; 7550/7551/7590 rows checked
# there). Id -> arch: ROCm/rocminfo#123 ("gfx1200: 0x7590; gfx1201: 0x7550,
# 0x7551") and the Chip ID / Name pairs of public rocminfo reports
# (ROCm/ROCm#5814, #5999, #5745, #5388). Navi 48 = 0x7550/0x7551, Navi 44 =
# 0x7590 (pci.ids). Ids we could not tie to an arch are left out on purpose.
PCI_IDS: dict[int, tuple[str, bool, str, dict[int, str]]] = {
    0x7550: ("gfx1201", False, "AMD Radeon RX 9070 series",
             {0xC0: "AMD Radeon RX 9070 XT", 0xC2: "AMD Radeon RX 9070 GRE",
              0xC3: "AMD Radeon RX 9070"}),
    0x7551: ("gfx1201", False, "AMD Radeon AI PRO R9700 series",
             {0xC0: "AMD Radeon AI PRO R9700", 0xC8: "AMD Radeon AI PRO R9600D"}),
    0x7590: ("gfx1200", False, "AMD Radeon RX 9060 series",
             {0xC0: "AMD Radeon RX 9060 XT", 0xC1: "AMD Radeon RX 9060 XT LP",
              0xC7: "AMD Radeon RX 9060"}),
    0x744C: ("gfx1100", False, "AMD Radeon RX 7900 series", {}),
    0x7448: ("gfx1100", False, "AMD Radeon Pro W7900", {}),
    0x73DF: ("gfx1031", False, "AMD Radeon RX 6700/6750 XT series", {}),
    0x1586: ("gfx1151", True, "AMD Radeon 8060S/8050S/8040S Graphics", {}),
    0x150E: ("gfx1150", True, "AMD Radeon 890M/880M Graphics", {}),
    0x15BF: ("gfx1103", True, "AMD Radeon 780M/760M/740M Graphics", {}),
    0x13C0: ("gfx1036", True, "AMD Radeon Graphics (Raphael/Granite Ridge)", {}),
}

# APU/iGPU targets, for GPUs only KFD saw (KFD has no "APU" flag; rocminfo's
# "Memory Properties: APU" wins when present).
INTEGRATED_ARCHS = frozenset({"gfx90c", "gfx1033", "gfx1035", "gfx1036", "gfx1103",
                              "gfx1150", "gfx1151", "gfx1152"})

# libdrm's name when the device id is missing from the system's amdgpu.ids
# (ROCm/TheRock#1737 shows a 9070 XT named like this).
GENERIC_NAME = "AMD Radeon Graphics"

_ARCH = re.compile(r"^gfx[0-9a-f]+$")


def resolve_root(root: Path | str | None = None) -> Path:
    return Path(root if root is not None else (os.environ.get(SYSFS_ROOT_ENV) or "/"))


def under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def gfx_name(version: int | None) -> str | None:
    """KFD gfx_target_version -> gfx target name (AMD's table, installer.targets)."""
    from . import targets

    return targets.gfx_name(version)


def bdf(domain: int, location: int) -> str:
    """PCI address from KFD domain/location_id or rocminfo BDFID ((bus<<8)|devfn)."""
    return f"{domain:04x}:{location >> 8:02x}:{(location >> 3) & 0x1f:02x}.{location & 7:x}"


# ---------------------------------------------------------------- KFD sysfs

KFD_NODES = "sys/class/kfd/kfd/topology/nodes"


@dataclass
class KfdNode:
    index: int
    props: dict[str, int]
    vram_bytes: int | None = None   # mem_banks/0 size_in_bytes (dGPUs)

    def get(self, key: str) -> int:
        return self.props.get(key, 0)

    @property
    def is_gpu(self) -> bool:
        # simd_count is 0 on CPU nodes (the kernel forces it); old kernels lack
        # gfx_target_version, so it is not required here.
        return self.get("simd_count") > 0 and (
            "gfx_target_version" not in self.props or self.get("gfx_target_version") > 0)

    @property
    def pci(self) -> str:
        return bdf(self.get("domain"), self.get("location_id"))


def parse_properties(text: str) -> dict[str, int]:
    """KFD "name value" lines (kfd_topology.c node_show, decimal); unknown keys kept."""
    props: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            props[parts[0]] = int(parts[1])
    return props


def read_kfd(root: Path) -> tuple[list[KfdNode], list[str]]:
    """KFD topology nodes in node order, plus warnings for unreadable ones."""
    base = under(root, KFD_NODES)
    nodes: list[KfdNode] = []
    warnings: list[str] = []
    try:
        entries = sorted((int(p.name), p) for p in base.iterdir() if p.name.isdigit())
    except OSError:
        return nodes, warnings
    for index, path in entries:
        try:
            props = parse_properties((path / "properties").read_text())
        except PermissionError:
            # kfd_topology.c returns EPERM when a device cgroup hides the GPU
            warnings.append(f"KFD node {index} is hidden from this process (EPERM: device cgroup?)")
            continue
        except OSError:
            continue
        node = KfdNode(index, props)
        try:
            bank = parse_properties((path / "mem_banks" / "0" / "properties").read_text())
            node.vram_bytes = bank.get("size_in_bytes") or None
        except OSError:
            pass
        nodes.append(node)
    return nodes, warnings


# ---------------------------------------------------------------- PCI sysfs

PCI_DEVICES = "sys/bus/pci/devices"


@dataclass
class PciDevice:
    address: str
    device: int
    revision: int
    pci_class: int
    driver: str | None
    vram_bytes: int | None      # amdgpu's mem_info_vram_total on the PCI device


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def read_pci(root: Path) -> list[PciDevice]:
    """AMD display-class PCI functions (drivers/pci/pci-sysfs.c: "0x%04x" ids, "0x%06x" class).

    Vendor 0x1002 alone is not enough: the same card carries AMD PCIe switch
    ports (class 0x0604) and HDMI audio (0x0403).
    """
    base = under(root, PCI_DEVICES)
    found: list[PciDevice] = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return found
    for path in entries:
        if _read_hex(path / "vendor") != AMD_VENDOR:
            continue
        pci_class = _read_hex(path / "class")
        device = _read_hex(path / "device")
        if pci_class is None or device is None or pci_class >> 16 != 0x03:
            continue
        link = path / "driver"
        driver = os.path.basename(os.readlink(link)) if link.is_symlink() else None
        vram = None
        try:
            vram = int((path / "mem_info_vram_total").read_text().strip()) or None
        except (OSError, ValueError):
            pass
        found.append(PciDevice(path.name, device, _read_hex(path / "revision") or 0,
                               pci_class, driver, vram))
    return found


# ---------------------------------------------------------------- merge

@dataclass
class GPU:
    arch: str                       # real hardware target, "unknown" if no source knows it
    marketing_name: str
    pci: str | None                 # DDDD:BB:DD.F
    vram_mib: int | None
    integrated: bool
    source: str                     # e.g. "rocminfo+kfd+pci"
    node: int | None = None         # KFD node index
    uuid: str | None = None         # GPU-<16 hex>, None when the GPU has no unique id
    chip_id: int | None = None
    reported_arch: str | None = None  # rocminfo's Name when it differs (an override)
    driver: str | None = None
    targeted: bool = False          # one of the proposed profile's GPUs

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "marketing_name": self.marketing_name, "pci": self.pci,
                "vram_mib": self.vram_mib, "integrated": self.integrated, "source": self.source}


@dataclass
class Detection:
    gpus: list[GPU]
    target: tuple[str, ...]         # distinct arches of the proposed profile's GPUs, sorted
    visible_devices: str            # ROCR_VISIBLE_DEVICES value; "" = leave the variable unset
    warnings: list[str] = field(default_factory=list)
    rocminfo: RocminfoRun | None = None
    kfd_present: bool = False
    module_version: str | None = None  # amdgpu-dkms version, when that module is loaded
    profile: str = ""               # the target profile proposed for this host ("" = none)

    @property
    def visible_env(self) -> dict[str, str]:
        """Variables for the activation script (empty when nothing must be hidden)."""
        return {"ROCR_VISIBLE_DEVICES": self.visible_devices} if self.visible_devices else {}

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [g.to_json() for g in self.gpus], "target": list(self.target),
                "profile": self.profile, "visible_devices": self.visible_devices,
                "warnings": list(self.warnings)}


@dataclass
class _Seen:
    agent: Agent | None = None
    kfd: KfdNode | None = None
    pci: PciDevice | None = None

    def address(self) -> str | None:
        if self.kfd:
            return self.kfd.pci
        if self.pci:
            return self.pci.address
        if self.agent and self.agent.bdfid is not None:
            return bdf(0, self.agent.bdfid)   # rocminfo leaves out the PCI domain
        return None


def _same_function(a: str | None, b: str | None) -> bool:
    # compare bus:dev.fn only when one side (rocminfo) has no domain
    return bool(a and b) and a[-7:] == b[-7:]


def _merge(agents: Sequence[Agent], nodes: Sequence[KfdNode],
           pcis: Sequence[PciDevice]) -> list[_Seen]:
    seen = [_Seen(kfd=n) for n in nodes if n.is_gpu]
    for agent in agents:
        match = next((s for s in seen if s.kfd and s.agent is None and agent.bdfid is not None
                      and s.kfd.get("location_id") == agent.bdfid), None)
        match = match or next((s for s in seen if s.kfd and s.agent is None
                               and s.kfd.index == agent.node), None)
        if match:
            match.agent = agent
        else:
            seen.append(_Seen(agent=agent))
    for dev in pcis:
        match = next((s for s in seen if s.pci is None and (
            s.address() == dev.address or (not s.kfd and _same_function(s.address(), dev.address)))),
            None)
        if match:
            match.pci = dev
        else:
            seen.append(_Seen(pci=dev))
    return seen


def _uuid(s: _Seen) -> str | None:
    if s.agent and re.fullmatch(r"GPU-[0-9a-f]{16}", s.agent.uuid or ""):
        return s.agent.uuid
    unique = s.kfd.get("unique_id") if s.kfd else 0
    # ROCr prints GPU-%016lx of unique_id, GPU-XX when it is 0 (amd_gpu_agent.cpp)
    return f"GPU-{unique:016x}" if unique else None


def _gpu(s: _Seen, root: Path) -> GPU:
    agent, kfd, pci = s.agent, s.kfd, s.pci
    chip = (kfd.get("device_id") if kfd else 0) or (pci.device if pci else 0) or (
        agent.chip_id if agent else 0) or None
    table = PCI_IDS.get(chip) if chip else None
    reported = agent.name if agent and _ARCH.match(agent.name) else None
    arch = (gfx_name(kfd.get("gfx_target_version")) if kfd else None) or (
        table[0] if table else None) or reported or "unknown"
    integrated = bool(agent and agent.apu) or (table[1] if table else arch in INTEGRATED_ARCHS)
    name = agent.marketing_name if agent else ""
    if (not name or name == GENERIC_NAME) and chip and pci:
        name = targets.marketing_name(root, chip, pci.revision) or name  # the host's amdgpu.ids
    if not name or name == GENERIC_NAME:
        if table:
            name = table[3].get(pci.revision, table[2]) if pci else table[2]
        name = name or (f"AMD GPU 1002:{chip:04x}" if chip else "AMD GPU")
    vram = None
    if agent and agent.coarse_kib and not integrated:
        vram = agent.coarse_kib // 1024
    elif kfd and kfd.vram_bytes and not integrated:
        vram = kfd.vram_bytes >> 20
    elif pci and pci.vram_bytes:
        vram = pci.vram_bytes >> 20
    sources = [n for n, v in (("rocminfo", agent), ("kfd", kfd), ("pci", pci)) if v]
    return GPU(arch=arch, marketing_name=name, pci=s.address(), vram_mib=vram,
               integrated=integrated, source="+".join(sources),
               node=kfd.index if kfd else (agent.node if agent else None), uuid=_uuid(s),
               chip_id=chip, reported_arch=reported if reported and reported != arch else None,
               driver=pci.driver if pci else None)


def _visible_devices(gpus: Sequence[GPU]) -> str:
    """ROCR_VISIBLE_DEVICES that shows only the targeted GPUs, or "" if none needs hiding.

    ROCr numbers GPU agents in KFD node order (amd_filter_device.h); UUIDs
    survive reordering, devices without one (GPU-XX, e.g. every iGPU) can only
    be named by index.
    """
    runtime = [g for g in gpus if g.node is not None]
    chosen = [g for g in runtime if g.targeted]
    if not chosen or len(chosen) == len(runtime):
        return ""
    return ",".join(g.uuid or str(runtime.index(g)) for g in chosen)


def _describe(g: GPU) -> str:
    return f"{g.marketing_name} at {g.pci or '?'}"


def propose(gpus: Sequence[GPU], profiles: Mapping[str, targetprofile.Profile]) -> str:
    """The profile whose GPUs this host has, marking them targeted: discrete profiles first
    (an RX 9070 XT beside a Strix Halo iGPU is the target), an integrated profile only for
    integrated GPUs (an APU whose rocminfo reports gfx1201 under an override is not RDNA4)."""
    for p in profiles.values():
        mine = [g for g in gpus if g.arch in p.archs and g.integrated == p.integrated]
        if mine:
            for g in mine:
                g.targeted = True
            return p.name
    return ""


def detect(*, sysfs_root: Path | str | None = None, rocminfo: str | None = None,
           prefix: Path | None = None, env: Mapping[str, str] | None = None,
           profiles: Mapping[str, targetprofile.Profile] | None = None) -> Detection:
    """Find GPUs from rocminfo, KFD and PCI sysfs; never raises for a broken host.

    `rocminfo` is the executable to run (default: PATH, then
    PREFIX/rocm/bin/rocminfo); without one, sysfs alone is used. `profiles`
    (default: the shipped recipes/targets/) decide which GPUs are the target.
    """
    root = resolve_root(sysfs_root)
    env = os.environ if env is None else env
    warnings: list[str] = []
    run: RocminfoRun | None = None
    exe = rocminfo or find_rocminfo(prefix)
    if exe:
        run = run_rocminfo(exe, env)
        if run.failure and run.failure.kind != "no-gpu":
            warnings.append(f"rocminfo failed: {run.failure.summary}")
    nodes, kfd_warnings = read_kfd(root)
    warnings += kfd_warnings
    agents = run.parsed.gpus if run else []
    gpus = [_gpu(s, root) for s in _merge(agents, nodes, read_pci(root))]
    gpus.sort(key=lambda g: (g.node is None, g.node or 0, g.pci or ""))
    profile = propose(gpus, targetprofile.load_all() if profiles is None else profiles)

    for g in gpus:
        if g.reported_arch:
            keys = ([f"{OVERRIDE}_{g.node}"] if g.node is not None else []) + [OVERRIDE]
            var = next((f"{k}={env[k]}" for k in keys if k in env), None)
            why = f"{var} is active" if var else f"an {OVERRIDE} setting is active"
            warnings.append(f"rocminfo reports {g.reported_arch} for {_describe(g)} but the chip "
                            f"is {g.arch}: {why}; using {g.arch} (unset the override)")
        if g.source == "pci":
            if g.driver is None:
                why = "no driver is bound to it"
            elif g.driver != "amdgpu":
                why = f"it is bound to {g.driver}, not amdgpu"
            else:
                why = "KFD has no node for it (kernel too old for this GPU, or PCIe atomics missing)"
            warnings.append(f"{_describe(g)} ({g.arch}) is on the PCI bus but not usable for "
                            f"compute: {why}")
    overrides = sorted(k for k in env if k.startswith(OVERRIDE))
    if overrides and any(g.targeted for g in gpus) and not any(g.reported_arch for g in gpus):
        warnings.append(f"{', '.join(overrides)} is set; {profile} GPUs need no override (unset it)")
    for var in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if var in env:
            warnings.append(f"{var}={env[var]} is set in this shell; the activation script "
                            "sets the GPU visibility itself")

    target = tuple(sorted({g.arch for g in gpus if g.targeted}))
    visible = _visible_devices(gpus)
    if visible:
        hidden = [g for g in gpus if g.node is not None and not g.targeted]
        warnings.append("hidden at run time (not a build target): "
                        + "; ".join(f"{_describe(g)} ({g.arch})" for g in hidden))
    module_version = run.parsed.module_version if run else None
    try:
        module_version = under(root, "sys/module/amdgpu/version").read_text().strip() or module_version
    except OSError:
        pass
    try:
        kfd_present = under(root, KFD_NODES).is_dir()
    except OSError:   # an unsearchable sysfs path proves nothing either way
        kfd_present = False
    return Detection(gpus, target, visible, warnings, run,
                     kfd_present=kfd_present, module_version=module_version, profile=profile)


def _split_archs(gpu_arch: str | Iterable[str]) -> list[str]:
    items = [gpu_arch] if isinstance(gpu_arch, str) else list(gpu_arch)
    return [a for item in items for a in re.split(r"[,;\s]+", item.strip().lower()) if a]


def retarget(detection: Detection, profile: targetprofile.Profile) -> None:
    """Make `profile` the host's target (an explicit --target or --gpu-arch choice): its GPUs
    become the targeted ones, and the runtime hides the rest."""
    for g in detection.gpus:
        g.targeted = False
    detection.profile = propose(detection.gpus, {profile.name: profile}) or profile.name
    detection.target = tuple(sorted({g.arch for g in detection.gpus if g.targeted}))
    detection.visible_devices = _visible_devices(detection.gpus)


def choose_target(detection: Detection, gpu_arch: str | Iterable[str] | None,
                  allow_unsupported: bool, *, target: str | None = None,
                  profiles: Mapping[str, targetprofile.Profile] | None = None) -> tuple[str, ...]:
    """The arches to build for: --gpu-arch if given, else --target's GPUs on this host (all of
    its arches when the host has none), else the proposed profile's GPUs.

    One prefix holds one profile, so the arches must all belong to one. Warnings
    (an unsupported arch allowed, a target that differs from the detected GPUs)
    are appended to detection.warnings.
    """
    profiles = targetprofile.load_all() if profiles is None else profiles
    chosen = targetprofile.get(profiles, target) if target else None
    found = ", ".join(f"{g.arch} {g.marketing_name}" for g in detection.gpus) or "no AMD GPU"
    if gpu_arch is None or not _split_archs(gpu_arch):
        if chosen is None:
            if detection.target:
                return detection.target
            raise UsageError(f"no supported GPU found ({found})",
                             hint="pass --gpu-arch gfx1201 (RX 9070 series, R9700), gfx1200 "
                                  "(RX 9060 series) or gfx1151 (Strix Halo) to build without one; "
                                  "`rdna4-install doctor` shows why no GPU was found")
        if detection.profile != chosen.name:
            here = {g.arch for g in detection.gpus if g.arch in chosen.archs}
            if detection.profile and not here:
                detection.warnings.append(f"building for target {chosen.name} but this host's GPUs "
                                          f"are {detection.profile} ({','.join(detection.target)})")
            retarget(detection, chosen)
        return detection.target or chosen.archs
    archs = sorted(set(_split_archs(gpu_arch)))
    for arch in archs:
        if not _ARCH.match(arch):
            raise UsageError(f"--gpu-arch {arch!r} is not a gfx target name",
                             hint="e.g. --gpu-arch gfx1201 or --gpu-arch gfx1200,gfx1201")
        if not targets.is_known(arch):
            raise UsageError(f"--gpu-arch {arch} is not a GFX target AMD knows (rocm-bootstrap's table)",
                             hint="e.g. --gpu-arch gfx1201 or --gpu-arch gfx1200,gfx1201")
    supported = targetprofile.supported_archs(profiles)
    odd = [a for a in archs if a not in supported]
    if odd and not allow_unsupported:
        kinds = ", ".join(f"{a} is {targets.family(a) or 'another family'}" for a in odd)
        raise UsageError(f"--gpu-arch {','.join(odd)} is not a supported target ({kinds})",
                         hint=f"supported: {', '.join(supported)}; add --allow-unsupported-arch to "
                              "build anyway (untested)")
    known = [a for a in archs if a in supported]
    profile = targetprofile.of_archs(profiles, known)
    if known and profile is None:
        split = "; ".join(f"{p.name}: {','.join(a for a in known if a in p.archs)}"
                          for p in profiles.values() if set(known) & set(p.archs))
        raise UsageError(f"--gpu-arch {','.join(archs)} mixes target profiles ({split}); "
                         "one prefix holds one target",
                         hint=f"install each into its own prefix, e.g. --gpu-arch {known[0]}")
    if chosen is not None and profile is not None and profile.name != chosen.name:
        raise UsageError(f"--gpu-arch {','.join(archs)} is target {profile.name}, not --target {chosen.name}",
                         hint=f"drop --target (--gpu-arch implies it), or use --gpu-arch "
                              f"{','.join(chosen.archs)}")
    if odd:
        detection.warnings.append(f"building for unsupported arch {','.join(odd)} "
                                  "(--allow-unsupported-arch): expect failures")
    if profile is not None and detection.profile != profile.name and any(
            g.arch in archs for g in detection.gpus):
        retarget(detection, profile)   # e.g. --gpu-arch gfx1151 on a host with an RX 9070 XT too
    if detection.target and set(archs) != set(detection.target):
        detection.warnings.append(f"building for {','.join(archs)} but this host's target is "
                                  f"{','.join(detection.target)}")
    return tuple(archs)


def format_table(detection: Detection) -> str:
    rows = [("ARCH", "NAME", "PCI", "VRAM", "KIND", "FOUND BY", "TARGET")]
    for g in detection.gpus:
        rows.append((g.arch + (f" (reports {g.reported_arch})" if g.reported_arch else ""),
                     g.marketing_name, g.pci or "-",
                     f"{g.vram_mib / 1024:.1f} GiB" if g.vram_mib else "-",
                     "integrated" if g.integrated else "discrete", g.source,
                     "yes" if g.targeted else "no"))
    lines: list[str] = []
    if detection.gpus:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    else:
        lines.append("no AMD GPU found")
    lines.append(f"target: {', '.join(detection.target) or 'none (no GPU of a target profile)'}"
                 + (f" (profile {detection.profile})" if detection.profile else ""))
    if detection.visible_devices:
        lines.append(f"run time: ROCR_VISIBLE_DEVICES={detection.visible_devices}")
    lines += [f"warning: {w}" for w in detection.warnings]
    return "\n".join(lines)
