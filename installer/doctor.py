"""Host checks: one pass/warn/fail line each, with a fix for this distro.

`install` runs the blocking subset first. On a host without a GPU the GPU
checks fail (or only warn when --gpu-arch makes it a build-only host); they
never raise. Device paths are read under $RDNA4_SYSFS_ROOT like detection.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import buildenv
from . import detect as det
from . import prefixes, proc, targetprofile, unifiedmem
from .rocminfo import OVERRIDE

PASS, WARN, FAIL = "pass", "warn", "fail"
GIB = 1024 ** 3
MIN_KERNEL = (6, 11)      # first mainline release with GFX12 KFD support (patch timing; UNCONFIRMED)
MIN_PYTHON = (3, 10)
MIN_RAM_GIB = 16          # below this, compiling the GPU kernels swaps or gets OOM-killed


@dataclass(frozen=True)
class Check:
    name: str
    status: str               # pass | warn | fail
    detail: str
    fix: str = ""
    blocking: bool = False    # a failure stops `install`

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


# ---------------------------------------------------------------- distro

# package manager -> install command; families from os-release ID / ID_LIKE
PM_COMMANDS = {"apt": "sudo apt install -y", "dnf": "sudo dnf install -y",
               "pacman": "sudo pacman -S --needed", "zypper": "sudo zypper install -y"}
PM_FAMILIES = {
    "apt": ("debian", "ubuntu", "linuxmint", "pop", "elementary", "zorin", "kali", "raspbian"),
    "dnf": ("fedora", "rhel", "centos", "rocky", "almalinux", "ol", "amzn", "nobara"),
    "pacman": ("arch", "manjaro", "endeavouros", "cachyos", "garuda"),
    "zypper": ("opensuse", "opensuse-leap", "opensuse-tumbleweed", "suse", "sles"),
}
# what we need -> package per manager
PACKAGES = {
    "git": {"apt": "git", "dnf": "git", "pacman": "git", "zypper": "git"},
    "c-toolchain": {"apt": "build-essential", "dnf": "gcc gcc-c++ make",
                    "pacman": "base-devel", "zypper": "gcc gcc-c++ make"},
    "libatomic": {"apt": "libatomic1", "dnf": "libatomic", "pacman": "gcc-libs",
                  "zypper": "libatomic1"},
    "libnuma": {"apt": "libnuma1", "dnf": "numactl-libs", "pacman": "numactl",
                "zypper": "libnuma1"},
    "amd-firmware": {"apt": "firmware-amd-graphics (Debian) / linux-firmware (Ubuntu)",
                     "dnf": "amd-gpu-firmware", "pacman": "linux-firmware",
                     "zypper": "kernel-firmware-amdgpu"},
}
KERNEL_UPGRADE = {
    "apt": "Ubuntu: sudo apt install linux-generic-hwe-24.04; Debian: a backports kernel "
           "(sudo apt install -t <codename>-backports linux-image-amd64)",
    "dnf": "sudo dnf upgrade --refresh kernel",
    "pacman": "sudo pacman -Syu linux",
    "zypper": "sudo zypper update kernel-default",
}


def package_manager(os_id: str | None = None, like: str | None = None) -> str | None:
    if os_id is None:
        import distro
        os_id, like = distro.id(), distro.like()
    for word in [os_id or "", *(like or "").split()]:
        for pm, family in PM_FAMILIES.items():
            if word in family or word.startswith("opensuse") and pm == "zypper":
                return pm
    return None


def install_hint(pm: str | None, needs: Iterable[str]) -> str:
    needs = list(needs)
    if pm is None:
        return "install " + ", ".join(needs) + " with your package manager"
    pkgs = " ".join(PACKAGES[n][pm] for n in needs)
    if "(" in pkgs:
        return f"install {pkgs}"
    return f"{PM_COMMANDS[pm]} {pkgs}"


# ---------------------------------------------------------------- identity

@dataclass(frozen=True)
class Identity:
    """Who asks: the groups of the running session versus the group database."""

    user: str
    uid: int
    session_gids: frozenset[int]
    db_gids: frozenset[int]
    real: bool = True         # False in tests: permissions come from mode bits

    @classmethod
    def current(cls) -> "Identity":
        uid = os.geteuid()
        try:
            entry = pwd.getpwuid(uid)
            user, base_gid = entry.pw_name, entry.pw_gid
            db = frozenset(os.getgrouplist(user, base_gid))
        except (KeyError, OSError):
            user, db = str(uid), frozenset()
        return cls(user, uid, frozenset([os.getegid(), *os.getgroups()]), db)


def can_open(path: Path, who: Identity) -> bool:
    """Read-write access as `who` would get it (os.access for the real user: ACLs count)."""
    if who.real:
        return os.access(path, os.R_OK | os.W_OK)
    if who.uid == 0:
        return True
    st = path.stat()
    if st.st_uid == who.uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid in who.session_gids:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# ---------------------------------------------------------------- checks

def _gpu_status(gpu_needed: bool) -> str:
    return FAIL if gpu_needed else WARN


def _build_only(gpu_needed: bool) -> str:
    return "" if gpu_needed else " (build-only host: --gpu-arch given)"


def check_kernel(release: str, root: Path, pm: str | None) -> Check:
    dkms = _read(det.under(root, "sys/module/amdgpu/version"))
    m = re.match(r"(\d+)\.(\d+)", release)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if dkms:
        return Check("kernel", PASS, f"Linux {release} with amdgpu-dkms {dkms}")
    if version >= MIN_KERNEL:
        return Check("kernel", PASS, f"Linux {release} (new enough for RDNA4 with the in-tree amdgpu)")
    return Check("kernel", WARN,
                 f"Linux {release}: RDNA4 compute needs the in-tree amdgpu of Linux "
                 f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]}+ or AMD's amdgpu-dkms",
                 KERNEL_UPGRADE.get(pm or "", "install a newer kernel") +
                 ", or AMD's amdgpu-dkms for this kernel")


def check_amdgpu(root: Path, gpu_needed: bool, pm: str | None) -> Check:
    module = det.under(root, "sys/module/amdgpu")
    fw = install_hint(pm, ["amd-firmware"])
    if not module.is_dir():
        return Check("amdgpu", _gpu_status(gpu_needed),
                     "amdgpu kernel module is not loaded" + _build_only(gpu_needed),
                     f"sudo modprobe amdgpu; if that fails see `sudo dmesg | grep -i amdgpu` "
                     f"(kernel too old, amdgpu-dkms not built for this kernel, or missing "
                     f"firmware: {fw})")
    state = _read(module / "initstate")
    dkms = _read(module / "version")
    kind = f"amdgpu-dkms {dkms}" if dkms else "in-tree amdgpu"
    if state is None:
        return Check("amdgpu", PASS, f"{kind} built into the kernel")
    if state != "live":
        return Check("amdgpu", _gpu_status(gpu_needed), f"{kind} is loaded but {state}, not live",
                     "see `sudo dmesg | grep -i -E 'amdgpu|kfd'` for why no GPU initialised")
    return Check("amdgpu", PASS, f"{kind} loaded")


def check_gpu(detection: det.Detection, gpu_needed: bool) -> Check:
    listed = "; ".join(f"{g.arch} {g.marketing_name} ({'integrated' if g.integrated else 'discrete'}, "
                       f"{g.source})" for g in detection.gpus) or "no AMD GPU"
    if detection.target:
        return Check("gpu", PASS, f"target {','.join(detection.target)}: {listed}")
    return Check("gpu", _gpu_status(gpu_needed),
                 f"no discrete RDNA4 GPU: {listed}" + _build_only(gpu_needed),
                 "install an RX 9070/9060 series or AI PRO R9700 card, or pass --gpu-arch "
                 "gfx1201/gfx1200 to build for another machine")


def check_dev_nodes(root: Path, who: Identity, gpu_needed: bool) -> list[Check]:
    kfd = det.under(root, "dev/kfd")
    group_fix = _group_fix(kfd, who)
    if not kfd.exists():
        kfd_check = Check("/dev/kfd", _gpu_status(gpu_needed),
                          "/dev/kfd does not exist" + _build_only(gpu_needed),
                          "load amdgpu (see the amdgpu check); in a container pass "
                          "--device=/dev/kfd --device=/dev/dri")
    elif can_open(kfd, who):
        kfd_check = Check("/dev/kfd", PASS, f"/dev/kfd is read-write for {who.user}")
    else:
        kfd_check = Check("/dev/kfd", _gpu_status(gpu_needed),
                          f"/dev/kfd is not read-write for {who.user}", group_fix)
    renders = sorted(det.under(root, "dev/dri").glob("renderD*"))
    usable = [p for p in renders if can_open(p, who)]
    if usable:
        render_check = Check("/dev/dri", PASS, "usable: " + ", ".join(p.name for p in usable))
    elif renders:
        render_check = Check("/dev/dri", _gpu_status(gpu_needed),
                             f"{', '.join(p.name for p in renders)} not read-write for {who.user}",
                             _group_fix(renders[0], who))
    else:
        render_check = Check("/dev/dri", _gpu_status(gpu_needed),
                             "no /dev/dri/renderD* device" + _build_only(gpu_needed),
                             "load amdgpu (see the amdgpu check)")
    return [kfd_check, render_check]


def _group_fix(device: Path, who: Identity) -> str:
    try:
        gid = device.stat().st_gid
    except OSError:
        return f"sudo usermod -aG render,video {who.user}, then log out and back in"
    group = _group_name(gid)
    if gid in who.db_gids and gid not in who.session_gids:
        return f"log out and back in (or reboot) so this session gets group {group}"
    groups = "render,video" if group == "render" else group
    return f"sudo usermod -aG {groups} {who.user}, then log out and back in"


def check_groups(root: Path, who: Identity, gpu_needed: bool) -> Check:
    """Group membership of this session versus the group database.

    rocminfo checks /etc/group (getgrouplist), not the running session, so
    after `usermod -aG render` without a new login it says "is member" and
    still fails (rocminfo.cc); compare the session's groups ourselves.
    """
    kfd = det.under(root, "dev/kfd")
    try:
        st = kfd.stat()
    except OSError:
        return Check("groups", WARN, "skipped: no /dev/kfd to check against")
    group = _group_name(st.st_gid)
    if who.uid == 0:
        return Check("groups", PASS, "running as root")
    if st.st_mode & 0o006 == 0o006:
        return Check("groups", PASS, f"/dev/kfd is open to all users (group {group})")
    if st.st_gid in who.session_gids:
        return Check("groups", PASS, f"this session is in group {group}")
    status = _gpu_status(gpu_needed)
    if st.st_gid in who.db_gids:
        return Check("groups", status,
                     f"{who.user} was added to group {group} but this login session predates it",
                     f"log out and back in (or reboot); `newgrp {group}` fixes one shell")
    return Check("groups", status, f"{who.user} is not in group {group}, which owns /dev/kfd",
                 _group_fix(kfd, who))


ROCMINFO_FIXES = {
    "hang": "the driver or GPU is stuck: reboot, then update the kernel/amdgpu-dkms and "
            "firmware; `sudo dmesg | grep -i -E 'amdgpu|kfd'` shows the error",
    "not-loaded": "sudo modprobe amdgpu; check `sudo dmesg | grep -i amdgpu` (kernel too old "
                  "or amdgpu-dkms not built for the running kernel)",
    "not-live": "amdgpu did not initialise a GPU: see `sudo dmesg | grep -i -E 'amdgpu|kfd'`",
    "no-kfd": "/dev/kfd is missing: load amdgpu with KFD; in a container pass "
              "--device=/dev/kfd --device=/dev/dri",
    "relogin": "log out and back in (or reboot) so the session gets the group; if it "
               "persists, check udev rules and ACLs on /dev/kfd",
    "no-user": "no login name (container): run with --group-add render (or video) and "
               "--device=/dev/kfd",
    "blocked": "a device cgroup or security policy (container, systemd unit) blocks /dev/kfd",
    "refused": "KFD refused this process (VM, container or eGPU): check "
               "`sudo dmesg | grep -i kfd`; after a VM passthrough a reboot helps",
    "out-of-resources": "KFD/HSA could not set up the GPU: `sudo dmesg | grep -i kfd` shows "
                        "'not supported in kfd' (kernel too old) or 'PCI rejects atomics'; "
                        "after many model loads a reboot helps",
    "hsa-error": "the ROCm runtime failed to start: check `sudo dmesg | grep -i kfd` and that "
                 "the kernel supports the GPU",
    "no-gpu": "KFD created no GPU node: `sudo dmesg | grep -i kfd` shows 'not supported in kfd' "
              "(kernel too old) or 'skipped device ... PCI rejects atomics' (PCIe atomics)",
    "error": "run rocminfo yourself to see the whole message",
}


def check_rocminfo(detection: det.Detection, who: Identity, gpu_needed: bool) -> Check:
    run = detection.rocminfo
    if run is None:
        return Check("rocminfo", WARN, "rocminfo not found (it comes with the toolchain); "
                     "GPUs were read from sysfs")
    if run.failure is None:
        archs = ", ".join(a.name for a in run.parsed.gpus)
        return Check("rocminfo", PASS, f"{run.path}: GPU agents {archs}")
    failure = run.failure
    fix = (f"sudo usermod -aG render,video {who.user}, then log out and back in"
           if failure.kind == "no-group" else ROCMINFO_FIXES.get(failure.kind, ""))
    return Check("rocminfo", _gpu_status(gpu_needed),
                 f"{failure.summary}" + _build_only(gpu_needed), fix)


def check_detection_notes(detection: det.Detection) -> Check | None:
    notes = [w for w in detection.warnings if not w.startswith("rocminfo failed")]
    if not notes:
        return None
    fix = "unset HSA_OVERRIDE_GFX_VERSION*" if any(OVERRIDE in n for n in notes) else ""
    return Check("gpu notes", WARN, "; ".join(notes), fix)


def check_disk(prefix: Path, cache_dir: Path, need_bytes: int) -> Check:
    groups: dict[int, list[str]] = {}
    free: dict[int, int] = {}
    for label, path in (("prefix", prefix), ("cache", cache_dir)):
        # a cache or prefix the installer cannot write fails here, with its path and cause
        problem = prefixes.write_problem(path, label)
        if problem is not None:
            return Check("disk", FAIL, problem.message, problem.hint or "")
        where = prefixes.nearest_existing(path)
        dev = where.stat().st_dev
        groups.setdefault(dev, []).append(f"{label} {path}")
        free[dev] = shutil.disk_usage(where).free
    need = f"need about {need_bytes / GIB:.0f} GiB (estimate for the plan)"
    places = "; ".join(f"{' and '.join(names)}: {free[dev] / GIB:.1f} GiB free"
                       for dev, names in groups.items())
    fix = "free some space or choose another --prefix / RDNA4_CACHE_DIR (--no-checks installs anyway)"
    # each place must hold the plan's estimate: the prefix gets the trees, the cache the
    # downloads and wheels, and how they split varies by recipe
    if min(free.values()) < need_bytes:
        return Check("disk", FAIL, f"{need}; {places}", fix)
    return Check("disk", PASS, f"{need}; {places}")


def check_memory(jobs: int, meminfo: dict[str, int] | None = None) -> Check:
    info = buildenv.meminfo() if meminfo is None else meminfo
    ram = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    swap = info.get("SwapTotal", 0)
    detail = f"{ram / GIB:.1f} GiB RAM + {swap / GIB:.1f} GiB swap; the build uses {jobs} parallel jobs"
    if ram < MIN_RAM_GIB * GIB:
        return Check("memory", WARN, detail + f" (less than {MIN_RAM_GIB} GiB RAM)",
                     "add swap (e.g. a 16 GiB swap file) and expect a slow build; fewer "
                     "jobs lower the peak memory")
    return Check("memory", PASS, detail)


def target_profile(detection: det.Detection, target: str | None = None, gpu_arch: str | None = None,
                   recipes_dir: Path | None = None) -> targetprofile.Profile | None:
    """The profile the host is checked for: --target, else --gpu-arch's, else the detected one."""
    profiles = targetprofile.load_all(recipes_dir)
    if target:
        return targetprofile.get(profiles, target)
    if gpu_arch:
        return targetprofile.of_archs(profiles, [a.strip() for a in gpu_arch.split(",") if a.strip()])
    return profiles.get(detection.profile)


def check_unified_memory(root: Path, profile: targetprofile.Profile | None, pm: str | None) -> Check | None:
    """An APU target's GPU memory: carve-out, GTT/TTM limit and RAM; a warning with the lines
    that raise the limit while it is still about half of RAM. None for discrete targets and
    on hosts without the APU (building for it elsewhere)."""
    if profile is None or not profile.unified_memory:
        return None
    pci = unifiedmem.gpu_address(root, profile.archs)
    if pci is None:
        return None
    m = unifiedmem.read(root, pci)
    if m.limit is None or m.ram is None:
        return Check("unified memory", WARN, unifiedmem.describe(m) + " (sysfs lacks some numbers)",
                     "load amdgpu (see the amdgpu check); the numbers come from "
                     "mem_info_gtt_total, ttm's pages_limit and /proc/meminfo")
    if unifiedmem.too_low(m):
        return Check("unified memory", WARN,
                     unifiedmem.describe(m) + ": about half of RAM (the kernel's default is half)",
                     "\n".join(unifiedmem.raise_lines(m, pm)))
    return Check("unified memory", PASS, unifiedmem.describe(m))


LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")


def _lib_dirs() -> list[Path]:
    """Library directories the dynamic loader searches (ld.so.conf, defaults, multiarch)."""
    dirs = [Path(d) for d in LIB_DIRS]
    for base in ("/lib", "/usr/lib"):
        dirs += sorted(Path(base).glob("*-linux-gnu*"))
    confs = [Path("/etc/ld.so.conf"), *sorted(Path("/etc/ld.so.conf.d").glob("*.conf"))]
    for conf in confs:
        for line in (_read(conf) or "").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("/"):
                dirs.append(Path(line))
    return dirs


def find_library(soname: str, dirs: Sequence[Path] | None = None) -> Path | None:
    # ctypes.util.find_library would start ldconfig/gcc; proc.py is the only
    # module allowed to run programs, and a directory scan is enough here.
    for d in dirs if dirs is not None else _lib_dirs():
        if (d / soname).exists():
            return d / soname
    return None


def check_tools(pm: str | None, path: str | None = None,
                lib_dirs: Sequence[Path] | None = None) -> list[Check]:
    checks = []
    tools = {"git": ["git"], "C compiler": ["cc", "gcc", "clang"],
             "C++ compiler": ["c++", "g++", "clang++"]}
    found, missing = [], []
    for label, names in tools.items():
        hit = next(filter(None, (proc.which(n, path=path) for n in names)), None)
        (found if hit else missing).append(f"{label} {hit}" if hit else label)
    if missing:
        need = dict.fromkeys("git" if m == "git" else "c-toolchain" for m in missing)
        checks.append(Check("host tools", FAIL, "missing: " + ", ".join(missing),
                            install_hint(pm, need)))
    else:
        checks.append(Check("host tools", PASS, "; ".join(found)))
    # libatomic: the ROCm 10 install page lists libatomic1 as a runtime need;
    # libnuma is bundled in TheRock's lib/rocm_sysdeps, so only a warning.
    for lib, soname, status in (("libatomic", "libatomic.so.1", FAIL),
                                ("libnuma", "libnuma.so.1", WARN)):
        where = find_library(soname, lib_dirs)
        if where:
            checks.append(Check(lib, PASS, str(where)))
        else:
            checks.append(Check(lib, status, f"{soname} not found", install_hint(pm, [lib])))
    return checks


def check_host_compiler(path: str | None = None) -> Check:
    """The system compiler the builds use for host code (build.host_compiler = "system")."""
    from . import buildenv

    host = buildenv.system_compiler(path)
    problem = buildenv.host_compiler_problem(host)
    if problem:
        return Check("host compiler", FAIL, problem, buildenv.HOST_COMPILER_HINT)
    return Check("host compiler", PASS, f"{host.label}; device code uses the toolchain's clang")


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check("python", PASS, f"Python {text} ({sys.executable})")
    return Check("python", FAIL, f"Python {text} is older than {MIN_PYTHON[0]}.{MIN_PYTHON[1]}",
                 "run the installer with a newer Python (uv can provide one: "
                 "`uv tool install rdna4-install`)")


def check_uv(uv_path: str | None = None) -> Check:
    uv_path = uv_path or proc.find_uv()
    if not uv_path:
        return Check("uv", FAIL, "uv not found",
                     "python -m pip install uv (or https://docs.astral.sh/uv/ install script)")
    out = proc.capture([uv_path, "--version"], env=proc.base_env(), timeout=10)
    if not out.ok:
        return Check("uv", FAIL, f"{uv_path} --version failed: {out.stderr.strip()[:200]}",
                     "reinstall uv: python -m pip install --force-reinstall uv")
    return Check("uv", PASS, f"{out.stdout.strip()} ({uv_path})")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- driver

# checks whose failure stops `install`; the GPU ones only when no --gpu-arch was given
ALWAYS_BLOCKING = frozenset({"disk", "host tools", "libatomic", "python", "uv"})
GPU_BLOCKING = frozenset({"amdgpu", "gpu", "/dev/kfd", "/dev/dri", "groups", "rocminfo"})

def run_checks(*, prefix: Path, cache_dir: Path, need_bytes: int, jobs: int, archs_given: bool,
               sysfs_root: Path | str | None = None, blocking_only: bool = False,
               detection: det.Detection | None = None, identity: Identity | None = None,
               target: str | None = None, gpu_arch: str | None = None,
               recipes_dir: Path | None = None) -> list[Check]:
    """All host checks in a fixed order; `blocking_only` keeps those that can stop install.

    Pass `detection` to reuse a detect() result (saves a second rocminfo run).
    `target`/`gpu_arch` choose the target profile whose checks apply (default: detected).
    """
    root = det.resolve_root(sysfs_root)
    gpu_needed = not archs_given
    who = identity or Identity.current()
    pm = package_manager()
    detection = detection or det.detect(sysfs_root=root, prefix=prefix)
    checks = [check_kernel(os.uname().release, root, pm), check_amdgpu(root, gpu_needed, pm),
              check_gpu(detection, gpu_needed)]
    notes = check_detection_notes(detection)
    if notes:
        checks.append(notes)
    checks += check_dev_nodes(root, who, gpu_needed)
    checks += [check_groups(root, who, gpu_needed), check_rocminfo(detection, who, gpu_needed),
               check_disk(prefix, cache_dir, need_bytes), check_memory(jobs)]
    unified = check_unified_memory(root, target_profile(detection, target, gpu_arch, recipes_dir), pm)
    if unified:
        checks.append(unified)
    checks += check_tools(pm)
    checks += [check_host_compiler(), check_python(), check_uv()]
    blocking = ALWAYS_BLOCKING | (GPU_BLOCKING if gpu_needed else frozenset())
    checks = [replace(c, blocking=c.name in blocking) for c in checks]
    if blocking_only:
        checks = [c for c in checks if c.blocking]
    return checks


def blocking_failures(checks: Sequence[Check]) -> list[Check]:
    """The failures that stop `install`."""
    return [c for c in checks if c.blocking and c.status == FAIL]


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


_COLORS = {PASS: "32", WARN: "33", FAIL: "1;31"}


def format_checks(checks: Sequence[Check], color: bool = False) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        label = f"{c.status.upper():4}"
        if color:
            label = f"\033[{_COLORS.get(c.status, '0')}m{label}\033[0m"
        lines.append(f"{label}  {c.name.ljust(width)}  {c.detail}")
        if c.fix and c.status != PASS:
            first, *more = c.fix.split("\n")   # a multi-line fix stays aligned under its first line
            lines.append(f"{'':4}  {'':{width}}  fix: {first}")
            lines += [f"{'':4}  {'':{width}}       {line}" for line in more]
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines.append(f"{fails} failed, {warns} warnings, {len(checks) - fails - warns} passed")
    return "\n".join(lines)
