"""`rdna4-install verify`: does the installed stack really run natively here?

The Python-level probes run in the venv's own interpreter (verify_probes.py,
executed by path, one JSON line per probe) with the activation's environment.
The code-object probes read the extensions' `.hip_fatbin` sections right here:
they need no GPU and no import of the extension.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from . import activate, proc, state
from .errors import InstallerError

PASS, FAIL, SKIP = "pass", "fail", "skip"
PROBES_SCRIPT = Path(__file__).with_name("verify_probes.py")
# what verify_probes.py reports, in order; a crash leaves the rest "not reached"
SCRIPT_PROBES = ("torch.import", "torch.version", "torch.gpu-arch", "torch.fp8-scaled-mm",
                 "vllm.import", "vllm.platform", "vllm.fp8-kernel",
                 "flash_attn.backend", "flash_attn.vs-sdpa")
PROBE_TIMEOUT = 900.0  # first GPU init plus the vLLM import can take minutes on a cold cache


@dataclass(frozen=True)
class Probe:
    name: str
    status: str   # pass | fail | skip
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _expectations(act: activate.Activation) -> dict:
    torch_pins = ((state.read_receipt(act.prefix) or {}).get("pins") or {}).get("torch") or {}
    return {"archs": list(act.archs), "torch": str(torch_pins.get("torch", "")),
            "rocm": str(torch_pins.get("rocm", "")), "flash_attn": act.flash_attention_backend}


def _parse(output: str) -> list[Probe]:
    found = []
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue  # libraries print warnings to stdout too
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and {"name", "status", "detail"} <= set(data) \
                and data["status"] in (PASS, FAIL, SKIP):
            found.append(Probe(str(data["name"]), data["status"], str(data["detail"])))
    return found


def run_script_probes(python: Path, expect: dict, env: dict[str, str],
                      timeout: float = PROBE_TIMEOUT) -> list[Probe]:
    got = proc.capture([str(python), str(PROBES_SCRIPT), json.dumps(expect)], env=env,
                       timeout=timeout)
    probes = _parse(got.stdout)
    if got.ok and probes:
        return probes
    seen = {p.name for p in probes}
    if got.timed_out:
        why = f"timed out after {timeout:.0f}s"
    elif got.returncode == 127:
        why = f"could not start {python}: {got.stderr.strip()}"
    else:
        last = [ln for ln in got.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        why = f"exited with code {got.returncode}: {last[0][:200]}"
    probes.append(Probe("probes", FAIL, f"the probe process {why}"))
    probes += [Probe(n, FAIL, "not reached: the probe process ended early") for n in SCRIPT_PROBES
               if n not in seen]
    return probes


# --- code objects in HIP extensions ----------------------------------------------

BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
COMPRESSED_MAGIC = b"CCOB"


class Unreadable(Exception):
    pass


def elf_section(path: Path, wanted: str) -> bytes | None:
    """The bytes of one section of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise ValueError(f"{path.name} is not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, str_off, str_size = sections[shstrndx]
        fh.seek(str_off)
        names = fh.read(str_size)
        for name_off, _type, _flags, _addr, offset, size in sections:
            name = names[name_off:names.index(b"\0", name_off)].decode("ascii", "replace")
            if name == wanted:
                fh.seek(offset)
                return fh.read(size)
    return None


def _zstd(data: bytes) -> bytes:
    for module in ("compression.zstd", "zstandard"):
        try:
            mod = __import__(module, fromlist=["x"])
        except ImportError:
            continue
        if hasattr(mod, "ZstdDecompressor"):  # zstandard
            return mod.ZstdDecompressor().decompressobj().decompress(data)
        return mod.decompress(data)
    # neither module here: the zstd command line tool, through files (proc is text-only)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.zst", Path(tmp) / "out"
        src.write_bytes(data)
        got = proc.capture(["zstd", "-d", "-q", "-f", "-o", str(dst), str(src)], env=proc.base_env())
        if not got.ok:
            raise Unreadable("code objects are zstd-compressed; install the zstd command to read them")
        return dst.read_bytes()


def _bundle_ids(data: bytes, pos: int) -> tuple[list[str], int]:
    """Entry IDs of the uncompressed bundle at `pos`, and where it ends."""
    count, = struct.unpack_from("<Q", data, pos + len(BUNDLE_MAGIC))
    at, end, ids = pos + len(BUNDLE_MAGIC) + 8, pos, []
    for _ in range(count):
        offset, size, id_len = struct.unpack_from("<QQQ", data, at)
        ids.append(data[at + 24:at + 24 + id_len].decode("ascii", "replace"))
        at += 24 + id_len
        end = max(end, pos + offset + size)
    return ids, max(end, at)


def _decompress(data: bytes, pos: int) -> tuple[bytes, int]:
    # clang OffloadBundler "CCOB": magic, u16 version, u16 method, then v2: u32
    # total size, u32 uncompressed size; v3: u64, u64; then a u64 hash. Method
    # 0 is zlib, 1 is zstd (llvm::compression::Format). Version 1 has no total
    # size, so it can only be the last bundle in the section.
    version, method = struct.unpack_from("<HH", data, pos + 4)
    if version == 1:
        start, total = pos + 20, len(data) - pos
    elif version == 2:
        total, = struct.unpack_from("<I", data, pos + 8)
        start = pos + 24
    elif version == 3:
        total, = struct.unpack_from("<Q", data, pos + 8)
        start = pos + 32
    else:
        raise Unreadable(f"compressed code-object bundle version {version} is not known")
    body = data[start:pos + total]
    if method == 0:
        return zlib.decompress(body), pos + total
    if method == 1:
        return _zstd(body), pos + total
    raise Unreadable(f"unknown code-object compression method {method}")


def fatbin_archs(fatbin: bytes) -> set[str]:
    """Every gfx target the bundles in a `.hip_fatbin` section carry code for."""
    archs: set[str] = set()
    pos = 0
    while True:
        hits = [i for i in (fatbin.find(BUNDLE_MAGIC, pos), fatbin.find(COMPRESSED_MAGIC, pos)) if i >= 0]
        if not hits:
            return archs
        pos = min(hits)
        if fatbin.startswith(COMPRESSED_MAGIC, pos):
            inner, pos = _decompress(fatbin, pos)
            ids, _ = _bundle_ids(inner, 0)
        else:
            ids, pos = _bundle_ids(fatbin, pos)
        for entry in ids:
            # e.g. hipv4-amdgcn-amd-amdhsa--gfx1201 or ...--gfx90a:xnack-
            if "amdgcn" in entry and "--" in entry:
                archs.add(entry.rsplit("--", 1)[1].split(":")[0])


def site_packages(venv: Path) -> list[Path]:
    return sorted(venv.glob("lib/python3*/site-packages"))


def code_object_probe(name: str, files: list[Path], archs: tuple[str, ...], missing: str) -> Probe:
    if not files:
        return Probe(name, FAIL if missing == FAIL else SKIP,
                     "no extension files found" if missing == FAIL else "not part of this install")
    good, bad, plain = [], [], []
    try:
        for path in files:
            section = elf_section(path, ".hip_fatbin")
            if section is None:
                plain.append(path.name)  # a host-only helper (e.g. cumem_allocator)
                continue
            found = fatbin_archs(section)
            (good if all(a in found for a in archs) else bad).append(
                (path.name, ",".join(sorted(found)) or "none"))
    except Unreadable as exc:
        return Probe(name, SKIP, str(exc))
    except (OSError, struct.error, zlib.error, ValueError) as exc:
        return Probe(name, FAIL, f"could not read code objects: {exc}")
    if bad:
        return Probe(name, FAIL, "; ".join(f"{n} has code for {f}, not {','.join(archs)}" for n, f in bad))
    if not good:
        return Probe(name, FAIL, f"no HIP code objects in {', '.join(plain)}")
    return Probe(name, PASS, f"{len(good)} extension(s) carry {','.join(archs)}: "
                             + ", ".join(n for n, _ in good))


def extension_probes(venv: Path, archs: tuple[str, ...], flash_attn: str) -> list[Probe]:
    sp = site_packages(venv)
    vllm_files = [p for d in sp for p in sorted((d / "vllm").glob("*.so"))]
    fa_files = [p for d in sp for p in sorted(d.glob("flash_attn_2_cuda*.so"))]
    out = [code_object_probe("vllm.code-objects", vllm_files, archs, FAIL)]
    if flash_attn == "ck":
        out.append(code_object_probe("flash_attn.code-objects", fa_files, archs, FAIL))
    else:
        out.append(Probe("flash_attn.code-objects", SKIP,
                         "Triton backend: kernels are compiled at run time" if flash_attn == "triton"
                         else "flash-attention is not part of this install"))
    return out


# --- entry points --------------------------------------------------------------------

def run(prefix: Path, *, archs: tuple[str, ...] | None = None, visible_devices: str | None = None,
        timeout: float = PROBE_TIMEOUT) -> list[Probe]:
    """Every probe's result; raises InstallerError only when there is nothing to probe.

    `visible_devices` is detection's ROCR_VISIBLE_DEVICES value; None takes the
    caller's own (an activated shell has it).
    """
    prefix = Path(prefix)
    venv = prefix / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        raise InstallerError(f"no venv at {venv}",
                             hint=f"install first: rdna4-install --prefix '{prefix}'")
    if visible_devices is None:
        visible_devices = os.environ.get("ROCR_VISIBLE_DEVICES", "")
    act = activate.from_receipt(prefix, archs=archs, visible_devices=visible_devices)
    expect = _expectations(act)
    probes = run_script_probes(python, expect, activate.environment(act), timeout)
    return probes + extension_probes(venv, tuple(expect["archs"]), expect["flash_attn"])


def failed(probes: list[Probe]) -> bool:
    return any(p.status == FAIL for p in probes)


def format_table(probes: list[Probe]) -> str:
    width = max((len(p.name) for p in probes), default=5)
    lines = [f"{'probe':<{width}}  result  detail"]
    lines += [f"{p.name:<{width}}  {p.status:<6}  {p.detail}" for p in probes]
    counts = {s: sum(p.status == s for p in probes) for s in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def to_json(probes: list[Probe]) -> str:
    return json.dumps({"probes": [p.to_json() for p in probes]}, indent=2)
