"""`pins update`: the newest coherent stack, as a diff against the current pins.

Coherent means, in this order:
1. the newest TheRock release of the channel with a tarball for the target
   family AND torch wheels for that ROCm and Python on the wheel index (a
   release without torch is skipped, with the reason);
2. the newest torch for exactly that ROCm and Python (its triton, torchvision
   and torchaudio follow from the torch resolver);
3. the newest vLLM release whose own sdist builds against that torch minor
   (docker/Dockerfile.rocm_base `ARG TORCH_VERSION=...`; CMakeLists.txt
   TORCH_SUPPORTED_VERSION_ROCM as the fallback);
4. every shipped vLLM patch checked against that sdist: applies / already
   upstream (its reverse applies: drop it) / conflicts (with the hunk).
flash-attention stays at its pinned commit: no release carries gfx12 CK, so a
newer commit is a choice for a person, not for this command.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InstallerError


@dataclass
class Change:
    key: str
    old: str
    new: str
    reason: str


@dataclass
class Proposal:
    changes: list[Change] = field(default_factory=list)
    derived: dict[str, str] = field(default_factory=dict)
    patches: list[tuple[str, str, str]] = field(default_factory=list)   # (name, status, hunk)
    vllm: str = ""


_TORCH_ARG = re.compile(r"^ARG\s+TORCH_VERSION=[\"']?v?(\d+)\.(\d+)", re.M)
_TORCH_CMAKE = re.compile(r"TORCH_SUPPORTED_VERSION_ROCM\s+\"?(\d+)\.(\d+)")


def torch_minor_of_sdist(path: Path) -> tuple[int, int] | None:
    """The torch major.minor a vLLM sdist's own ROCm image builds against."""
    found: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tf:
        for member in tf:
            tail = member.name.split("/", 1)[-1]
            if member.isfile() and tail in ("docker/Dockerfile.rocm_base", "CMakeLists.txt"):
                fh = tf.extractfile(member)
                found[tail] = fh.read().decode("utf-8", "replace") if fh else ""
    for name, pattern in (("docker/Dockerfile.rocm_base", _TORCH_ARG), ("CMakeLists.txt", _TORCH_CMAKE)):
        m = pattern.search(found.get(name, ""))
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _therock(settings: Any, py: tuple[int, int], torch_rocms: set) -> tuple[str, str]:
    from . import therock

    mine = settings.pins.get("therock", {})
    channel = str(mine.get("channel", "") or "stable")
    family = therock.family_for(settings.archs, str(mine.get("family", "") or ""))
    directory = str(mine.get("index_url", "") or "") or therock.directory_url(channel)
    skipped = []
    for v, _ in sorted(therock.list_versions(directory, family), reverse=True):
        if therock.channel_of(v) != channel:
            continue
        if v not in torch_rocms:
            skipped.append(f"{v}: no torch wheels for cp{py[0]}{py[1]}")
            continue
        why = f"newest {channel} {family} release with torch wheels for cp{py[0]}{py[1]}"
        return str(v), why + (f" (skipped {'; '.join(skipped)})" if skipped else "")
    raise InstallerError(f"no {channel} {family} release at {directory} has torch wheels for "
                         f"cp{py[0]}{py[1]}", hint="check therock.channel and torch.index_url")


def _vllm(settings: Any, torch_minor: tuple[int, int], ui: Any) -> tuple[str, str, dict[str, str]]:
    """(version, reason, sdist) of the newest vLLM whose sdist builds that torch minor."""
    from . import download, pypi

    mine = settings.pins.get("vllm", {})
    index = str(mine.get("index_url", "") or "") or pypi.PYPI
    current = str(mine.get("version", ""))
    found = pypi.sdists(pypi.project(index, "vllm", cache_dir=settings.cache_dir))
    skipped = []
    for v in sorted((v for v in found if not v.is_prerelease), reverse=True):
        entry = found[v]
        sha = str((entry.get("hashes") or {}).get("sha256", "")) or None
        if ui is not None:
            ui.info(f"reading vllm {v}'s sdist for the torch it builds against")
        got = download.fetch(entry["url"], cache_dir=settings.cache_dir, sha256=sha, ui=ui,
                             what=f"vllm {v} sdist")
        minor = torch_minor_of_sdist(got.path)
        if minor == torch_minor:
            why = f"newest vLLM whose sdist builds torch {torch_minor[0]}.{torch_minor[1]}"
            return str(v), why + (f" (skipped {'; '.join(skipped)})" if skipped else ""), \
                {"url": entry["url"], "sha256": got.sha256, "path": str(got.path)}
        skipped.append(f"{v}: torch {'.'.join(map(str, minor)) if minor else 'unknown'}")
        if current and str(v) == current:
            break
    raise InstallerError(f"no vLLM release on {index} builds against torch {torch_minor[0]}.{torch_minor[1]}"
                         f" ({'; '.join(skipped)})",
                         hint="keep the current pins, or pin torch.torch to the minor vLLM wants")


def check_patches(sdist: Path, patch_files: list[Path], work: Path) -> list[tuple[str, str, str]]:
    """(patch, applies | already upstream | conflicts, hunk) against an unpacked sdist."""
    from . import patches, proc
    from .unpack import extract_tarball

    src = extract_tarball(sdist, work / "src", strip_components=1)
    out = []
    for patch in patch_files:
        state, hunk = patches.check_one(src, patch, env=proc.base_env())
        out.append((patch.name, "already upstream" if state == patches.ALREADY else state, hunk))
    return out


def propose(settings: Any, ui: Any = None) -> Proposal:
    from . import recipes as rcp
    from . import torchpins

    pins = settings.pins
    torch = pins.get("torch", {})
    py = torchpins.python_version(str(torch.get("python", "3.12")))
    index = str(torch.get("index_url", ""))
    out = Proposal()
    rocm, why = _therock(settings, py, torchpins.rocms_with_torch(index, py, cache_dir=settings.cache_dir))
    out.changes.append(Change("therock.version", str(pins["therock"].get("version", "")), rocm, why))
    trial = {t: dict(v) for t, v in pins.items()}
    trial["therock"]["version"] = rocm
    trial["torch"].update(torch="auto", rocm="", torchvision="auto", torchaudio="auto", triton="auto")
    stack = torchpins.resolve(trial, settings.archs, offline=False, cache_dir=settings.cache_dir)
    from packaging.version import Version

    tv = Version(stack["torch"])
    out.changes.append(Change("torch.torch", str(torch.get("torch", "")), tv.public,
                              f"newest torch for rocm{rocm} and cp{py[0]}{py[1]}"))
    out.derived = {f"torch.{k}": v for k, v in stack.items() if k != "torch"}
    version, why, sdist = _vllm(settings, (tv.major, tv.minor), ui)
    out.changes.append(Change("vllm.version", str(pins.get("vllm", {}).get("version", "")), version, why))
    out.vllm = version
    folder = rcp.patches_dir_for(settings.recipes_dir) / "vllm"
    patch_files = sorted(folder.glob("*.patch"))
    if patch_files:
        with tempfile.TemporaryDirectory(prefix="rdna4-pins-update-") as tmp:
            out.patches = check_patches(Path(sdist["path"]), patch_files, Path(tmp))
    return out


def format_diff(p: Proposal) -> str:
    lines = ["newest coherent stack (flash-attention stays at its pinned commit):"]
    width = max(len(c.key) for c in p.changes)
    for c in p.changes:
        arrow = f"{c.old} -> {c.new}" if c.old != c.new else f"{c.new} (unchanged)"
        lines.append(f"  {c.key:<{width}}  {arrow}    {c.reason}")
    if p.derived:
        lines.append("  derived from them: " + ", ".join(f"{k} = {v}" for k, v in p.derived.items()))
    if p.patches:
        lines.append(f"shipped vLLM patches against {p.vllm}:")
        for name, state, hunk in p.patches:
            extra = {"already upstream": "; drop it", "conflicts": f" at {hunk}; refresh it"}.get(state, "")
            lines.append(f"  {name}: {state}{extra}")
    if not any(c.old != c.new for c in p.changes):
        lines.append("the pins are already the newest coherent stack")
    return "\n".join(lines)


def write(p: Proposal, path: Path) -> None:
    """Set the proposed values in a pins file (a --pins file, or recipes/pins.toml): in
    place, comments kept; a new file holds only them."""
    values = {c.key: (c.new, c.reason) for c in p.changes}
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    table, heads = "", {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*\[([^\]]+)\]", line)
        if m:
            table = m.group(1).strip()
            heads[table] = i
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_-]+)(\s*=\s*)\"[^\"]*\"(.*)$", line)
        if m and f"{table}.{m.group(2)}" in values:
            new = values.pop(f"{table}.{m.group(2)}")[0]
            lines[i] = f'{m.group(1)}{m.group(2)}{m.group(3)}"{new}"{m.group(4)}'
    # keys the file lacks go right under their table's header (or a new table at the end)
    for key, (value, reason) in values.items():
        table, _, name = key.partition(".")
        rows = [f"# rdna4-install pins update: {reason}", f'{name} = "{value}"']
        if table in heads:
            at = heads[table] + 1
            lines[at:at] = rows
            heads = {t: i + (len(rows) if i >= at else 0) for t, i in heads.items()}
        else:
            heads[table] = len(lines) + (1 if lines else 0)
            lines += ([""] if lines else []) + [f"[{table}]"] + rows
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
