"""`rdna4-install verify`: does the installed stack really run natively here?

The Python-level probes run in the venv's own interpreter (verify_probes.py,
executed by path, one JSON line per probe) with the activation's environment.
The code-object probes read the extensions' code objects right here
(codeobjects.py): they need no GPU, no toolchain and no import of the extension.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import activate, codeobjects, proc, state, targetprofile, unifiedmem, verify_deep, verify_probes
from .pyenv import site_packages
from .errors import InstallerError, command

PASS, FAIL, SKIP, INFO = verify_probes.PASS, verify_probes.FAIL, verify_probes.SKIP, verify_probes.INFO
PROBES_SCRIPT = Path(verify_probes.__file__)
# what verify_probes.py reports, in order; a crash leaves the rest "not reached"
SCRIPT_PROBES = tuple(name for name, _ in verify_probes.PROBES)
DEEP_SCRIPT = Path(verify_deep.__file__)
DEEP_PROBES = tuple(verify_deep.NAMES)
PROBE_TIMEOUT = 900.0  # first GPU init plus the vLLM import can take minutes on a cold cache


@dataclass(frozen=True)
class Probe:
    name: str
    status: str   # pass | fail | skip | info (what this target does instead, e.g. its FP8 path)
    detail: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def _expectations(act: activate.Activation, receipt: dict) -> dict:
    torch_pins = (receipt.get("pins") or {}).get("torch") or {}
    expect = {"archs": list(act.archs), "torch": str(torch_pins.get("torch", "")),
              "rocm": str(torch_pins.get("rocm", "")), "flash_attn": act.flash_attention_backend}
    # which FP8 probes apply is the target profile's [verify] fp8; the probes' default
    # is native, so only a target without native FP8 says so
    profile = targetprofile.of_receipt(receipt, act.archs)
    if profile is not None and profile.fp8 != verify_probes.NATIVE:
        expect["fp8"] = profile.fp8
    if profile is not None and profile.unified_memory:
        expect["unified_memory"] = True    # torch.device-memory measures, device_memory_probe judges
    return expect


def device_memory_probe(probe: Probe, prefix: Path, archs: tuple[str, ...],
                        sysfs_root: Path | str | None = None) -> Probe:
    """torch.device-memory's numbers judged against this host's sysfs (an APU's carve-out and
    GTT pool). A failing verdict is also left in the prefix (unifiedmem.record) for the
    activation script to repeat on every `source`."""
    if probe.name != "torch.device-memory" or probe.status != PASS:
        return probe
    try:
        data = json.loads(probe.detail)
        total, free = int(data["total"]), int(data["free"])
    except (ValueError, KeyError, TypeError):
        return Probe(probe.name, FAIL, f"unreadable measurement: {probe.detail[:200]}")
    root = unifiedmem.det.resolve_root(sysfs_root)
    pci = unifiedmem.gpu_address(root, archs)
    if pci is None:
        return Probe(probe.name, SKIP, f"torch reports {unifiedmem.gib(total)}; no {','.join(archs)} "
                                       "APU in sysfs to compare with")
    memory = unifiedmem.read(root, pci)
    ok, text = unifiedmem.judge(total, free, memory)
    unifiedmem.record(Path(prefix), None if ok else text, unifiedmem.watched(root, memory))
    return Probe(probe.name, PASS if ok else FAIL, text)


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
                and data["status"] in (PASS, FAIL, SKIP, INFO):
            found.append(Probe(str(data["name"]), data["status"], str(data["detail"])))
    return found


def run_script_probes(python: Path, expect: dict, env: dict[str, str],
                      timeout: float = PROBE_TIMEOUT, *, script: Path = PROBES_SCRIPT,
                      names: tuple[str, ...] = SCRIPT_PROBES) -> list[Probe]:
    got = proc.capture([str(python), str(script), json.dumps(expect)], env=env,
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
    probes += [Probe(n, FAIL, "not reached: the probe process ended early") for n in names
               if n not in seen]
    return probes


# --- code objects in HIP extensions ----------------------------------------------

def code_object_probe(name: str, files: list[Path], archs: tuple[str, ...], missing: str) -> Probe:
    if not files:
        return Probe(name, FAIL if missing == FAIL else SKIP,
                     "no extension files found" if missing == FAIL else "not part of this install")
    good, bad, plain = [], [], []
    try:
        for path in files:
            found = codeobjects.archs_in(path)
            if not found:
                plain.append(path.name)  # a host-only helper (e.g. cumem_allocator)
                continue
            (good if all(a in found for a in archs) else bad).append((path.name, ",".join(sorted(found))))
    except codeobjects.Unreadable as exc:
        return Probe(name, SKIP, f"{exc.message} ({exc.hint})" if exc.hint else exc.message)
    except (OSError, codeobjects.Malformed) as exc:
        return Probe(name, FAIL, f"could not read code objects: {exc}")
    if bad:
        return Probe(name, FAIL, "; ".join(f"{n} has code for {f}, not {','.join(archs)}" for n, f in bad))
    if not good:
        return Probe(name, FAIL, f"no HIP code objects in {', '.join(plain)}")
    return Probe(name, PASS, f"{len(good)} extension(s) carry {','.join(archs)}: "
                             + ", ".join(n for n, _ in good))


def extension_probes(venv: Path, archs: tuple[str, ...], flash_attn: str) -> list[Probe]:
    sp = site_packages(venv)
    vllm_files = sorted((sp / "vllm").glob("*.so"))
    fa_files = sorted(sp.glob("flash_attn_2_cuda*.so"))
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
        timeout: float = PROBE_TIMEOUT, deep: bool = False, model: str | None = None,
        allow_download: bool = False) -> list[Probe]:
    """Every probe's result; raises InstallerError only when there is nothing to probe.

    `visible_devices` is detection's ROCR_VISIBLE_DEVICES value; None takes the
    caller's own (an activated shell has it). `deep` adds verify_deep.py's probes,
    which load `model` (or a small cached one) only from disk unless `allow_download`.
    """
    prefix = Path(prefix)
    venv = prefix / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        raise InstallerError(f"no venv at {venv}",
                             hint="install first: " + command(prefix, "install"))
    if visible_devices is None:
        visible_devices = os.environ.get("ROCR_VISIBLE_DEVICES", "")
    receipt = state.read_receipt(prefix) or {}
    act = activate.from_receipt(prefix, archs=archs, visible_devices=visible_devices, receipt=receipt)
    expect = _expectations(act, receipt)
    env = activate.environment(act)
    probes = run_script_probes(python, expect, env, timeout)
    if expect.get("unified_memory"):
        probes = [device_memory_probe(p, prefix, act.archs) for p in probes]
    probes += extension_probes(venv, tuple(expect["archs"]), expect["flash_attn"])
    if deep:
        from . import hfcache

        env = hfcache.with_user_vars(env)
        chosen, why = hfcache.pick_for_verify(model, allow_download=allow_download, env=env)
        deep_expect = {**expect, "model": chosen, "model_reason": why, "offline": not allow_download}
        probes += run_script_probes(python, deep_expect, env, timeout, script=DEEP_SCRIPT, names=DEEP_PROBES)
    return probes


def failed(probes: list[Probe]) -> bool:
    return any(p.status == FAIL for p in probes)


def format_table(probes: list[Probe]) -> str:
    width = max((len(p.name) for p in probes), default=5)
    lines = [f"{'probe':<{width}}  result  detail"]
    lines += [f"{p.name:<{width}}  {p.status:<6}  {p.detail}" for p in probes]
    counts = {s: sum(p.status == s for p in probes) for s in (PASS, FAIL, SKIP, INFO)}
    lines.append(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"
                 + (f", {counts[INFO]} for information" if counts[INFO] else ""))
    return "\n".join(lines)


def to_json(probes: list[Probe]) -> str:
    return json.dumps({"probes": [p.to_json() for p in probes]}, indent=2)
