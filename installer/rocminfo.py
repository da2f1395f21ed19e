"""Run rocminfo and read its output: the GPU agents the ROCm runtime exposes.

rocminfo needs ROCm userspace and a working /dev/kfd, can hang (hence the
timeout) and reflects HSA_OVERRIDE_GFX_VERSION. When it fails, the failure is
named (classify_rocminfo) so doctor can say how to fix it; installer.detect
then falls back to sysfs. Format details and their upstream sources are in
the comments next to each parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import proc

ROCMINFO_TIMEOUT = 10.0  # seconds; rocminfo hangs on some broken setups (ROCm/ROCm#5812)
OVERRIDE = "HSA_OVERRIDE_GFX_VERSION"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_AGENT = re.compile(r"^\s*Agent\s+\d+\s*$")
_LEADING_INT = re.compile(r"^\s*(\d+)")
_MODULE_VERSION = re.compile(r"ROCk module version (\S+) is loaded")


def clean(text: str) -> str:
    """Drop ANSI colour codes (rocminfo writes them even into pipes) and CRs."""
    return _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


def leading_int(value: str | None) -> int | None:
    m = _LEADING_INT.match(value or "")
    return int(m.group(1)) if m else None


@dataclass
class Agent:
    """One HSA agent block of rocminfo output."""

    name: str = ""
    device_type: str = ""
    marketing_name: str = ""
    uuid: str = ""
    node: int | None = None
    chip_id: int | None = None
    bdfid: int | None = None
    compute_units: int | None = None
    apu: bool = False
    coarse_kib: int | None = None   # first GLOBAL COARSE GRAINED pool: VRAM on a dGPU

    @property
    def is_gpu(self) -> bool:
        return self.device_type == "GPU"


@dataclass
class RocminfoParse:
    agents: list[Agent]
    module_version: str | None     # amdgpu-dkms version from "ROCk module version X is loaded"

    @property
    def gpus(self) -> list[Agent]:
        return [a for a in self.agents if a.is_gpu]


_FIELDS = {"Name": "name", "Device Type": "device_type", "Marketing Name": "marketing_name",
           "Uuid": "uuid"}
_INT_FIELDS = {"Node": "node", "Chip ID": "chip_id", "BDFID": "bdfid",
               "Compute Unit": "compute_units"}


def parse_rocminfo(text: str) -> RocminfoParse:
    """Parse rocminfo output, padded or pasted with whitespace stripped.

    Layout (rocminfo.cc): labels padded to 25 columns, values to 35, so split
    on the first colon and strip; labels of 25+ characters touch their value
    and some end in "::". Blocks open with an "Agent N" line. The first Name:
    of a block is the agent's; later ones belong to ISA entries (including
    generic ISAs such as gfx12-generic, which are not GPUs).
    """
    text = clean(text)
    m = _MODULE_VERSION.search(text)
    agents: list[Agent] = []
    agent: Agent | None = None
    seen: set[str] = set()
    segment = ""
    for line in text.split("\n"):
        if _AGENT.match(line):
            agent = Agent()
            agents.append(agent)
            seen, segment = set(), ""
            continue
        if agent is None:
            continue
        label, sep, value = line.partition(":")
        if not sep:
            continue
        label, value = label.strip(), value.lstrip(":").strip()
        if label == "Segment":
            segment = value
            continue
        if label == "Size" and re.search(r"GLOBAL;.*\bFLAGS:\s*COARSE GRAINED$", segment):
            if agent.coarse_kib is None:
                agent.coarse_kib = leading_int(value)
            continue
        if label in seen:
            continue
        seen.add(label)
        if label in _FIELDS:
            setattr(agent, _FIELDS[label], value)
        elif label in _INT_FIELDS:
            setattr(agent, _INT_FIELDS[label], leading_int(value))
        elif label == "Memory Properties":
            agent.apu = "APU" in value.split()
    return RocminfoParse(agents, m.group(1) if m else None)


@dataclass(frozen=True)
class RocminfoFailure:
    kind: str     # missing hang not-loaded not-live no-group relogin no-user no-kfd
    #               blocked refused out-of-resources hsa-error no-gpu error
    summary: str  # one line, for warnings and doctor details


def classify_rocminfo(returncode: int, timed_out: bool, text: str,
                      parsed: RocminfoParse | None = None) -> RocminfoFailure | None:
    """Name the reason a rocminfo run failed, from its exit and messages.

    Messages and exit paths are those of rocminfo.cc (CheckInitialState, the
    /dev/kfd open, hsa_init); the causes are from the reports cited in the
    facts sheet (ROCm/ROCm#5102, #1798, #1211, #4043, #5657, #2232, #4382,
    #1088, #5812).
    """
    text = clean(text)
    first = next((ln.strip() for ln in text.split("\n")
                  if ln.strip() and not ln.startswith("ROCk module version")
                  and ln.strip() != "ROCk module is loaded"), "")
    if timed_out:
        return RocminfoFailure("hang", f"rocminfo did not finish within {ROCMINFO_TIMEOUT:.0f}s")
    if returncode == 127:
        return RocminfoFailure("missing", "rocminfo not found")
    if "ROCk module is NOT loaded" in text:
        return RocminfoFailure("not-loaded", "amdgpu kernel module is not loaded (rocminfo)")
    if "ROCk module is NOT live" in text:
        return RocminfoFailure("not-live", "amdgpu is loaded but not live (no GPU initialised)")
    kfd = re.search(r"Unable to open /dev/kfd read-write: ([^\n]*)", text)
    if kfd:
        reason = kfd.group(1).strip().rstrip(".")
        if "is not member of" in text:
            return RocminfoFailure("no-group", f"/dev/kfd: {reason}; user is not in its group")
        if "No such file" in reason:
            return RocminfoFailure("no-kfd", "/dev/kfd does not exist")
        if "Operation not permitted" in reason:
            return RocminfoFailure("blocked", "/dev/kfd: Operation not permitted (device cgroup or policy)")
        if "Invalid argument" in reason:
            return RocminfoFailure("refused", "/dev/kfd: Invalid argument (KFD refused this process)")
        if "Cannot allocate memory" in reason:
            return RocminfoFailure("out-of-resources",
                                   "/dev/kfd: Cannot allocate memory (KFD could not set up the GPU)")
        if "Failed to get user name" in text or "Failed to find pwd entry" in text:
            return RocminfoFailure("no-user", f"/dev/kfd: {reason}; no login name (container?)")
        if "is member of" in text:
            return RocminfoFailure("relogin", f"/dev/kfd: {reason} although the user is in its group")
        return RocminfoFailure("error", f"/dev/kfd: {reason}")
    if "HSA_STATUS_ERROR_OUT_OF_RESOURCES" in text or re.search(r"Call returned 4104\b", text):
        return RocminfoFailure("out-of-resources", "HSA runtime: HSA_STATUS_ERROR_OUT_OF_RESOURCES")
    if "hsa api call failure" in text:
        status = re.search(r"Call returned (\S+?):?\s", text + " ")
        return RocminfoFailure("hsa-error", f"HSA runtime error {status.group(1) if status else ''}".strip())
    if returncode != 0:
        return RocminfoFailure("error", f"rocminfo exited with {returncode}: {first}".rstrip(": "))
    parsed = parsed or parse_rocminfo(text)
    if not parsed.gpus:
        return RocminfoFailure("no-gpu", "rocminfo lists no GPU agent")
    return None


@dataclass
class RocminfoRun:
    path: str
    returncode: int
    timed_out: bool
    output: str                     # stdout + stderr, ANSI codes removed
    parsed: RocminfoParse
    failure: RocminfoFailure | None


def find_rocminfo(prefix: Path | None = None) -> str | None:
    """rocminfo from PATH, else the one in the unpacked toolchain."""
    found = proc.which("rocminfo")
    if found:
        return found
    if prefix is not None:
        candidate = Path(prefix) / "rocm" / "bin" / "rocminfo"
        # os.path.isfile, not Path.is_file: a prefix under a folder we may not search
        # is "no rocminfo there", not a PermissionError (Path raises it before 3.12)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def run_rocminfo(path: str, env: Mapping[str, str] | None = None) -> RocminfoRun:
    # No arguments: -g/-c drop the Agent banners the parser splits on.
    # Overrides are passed on so rocminfo shows what the runtime would see;
    # visibility variables are not, so every GPU is listed.
    source = os.environ if env is None else env
    extra = {k: v for k, v in source.items() if k.startswith(OVERRIDE)}
    cap = proc.capture([path], env=proc.base_env(extra), timeout=ROCMINFO_TIMEOUT)
    text = clean(cap.stdout + ("\n" + cap.stderr if cap.stderr else ""))
    parsed = parse_rocminfo(text)
    failure = classify_rocminfo(cap.returncode, cap.timed_out, text, parsed)
    return RocminfoRun(path, cap.returncode, cap.timed_out, text, parsed, failure)
