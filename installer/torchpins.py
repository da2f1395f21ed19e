"""The torch resolver: the torch stack's versions derived, not typed in.

Intent is therock.version (the ROCm every wheel is built for), torch.python and
torch.torch (an exact version, or "auto"/"latest" = the newest torch build for
that ROCm and Python on the index). The rest follows:
- torch.rocm is therock.version (torch requires rocm[libraries]==V and checks it
  at import, so they cannot differ);
- torch.triton is the triton torch's own wheel metadata requires
  (`Requires-Dist: triton==...`, written by TheRock's build_prod_wheels.py);
- torchvision/torchaudio ("auto") are the newest +rocm<V> builds on the index whose
  own metadata accepts that torch.
Wheel metadata is read from the PEP 658 `<wheel>.metadata` file when the index
serves one, else from the wheel's zip directory with HTTP Range requests (a few
KB, never the whole wheel). UNCONFIRMED: whether AMD's index serves .metadata.
"""

from __future__ import annotations

import io
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, Mapping

from . import download, torchindex
from .errors import InstallerError, NotFound, UsageError

AUTO = torchindex.RESOLVE + ("latest-for-rocm",)
TAIL = 1 << 16          # the zip directory of a wheel sits in its last few KB
MAX_WHOLE = 32 << 20    # a server that ignores Range: read a small wheel whole, never a big one


class _RemoteZip(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP Range requests."""

    def __init__(self, url: str):
        from . import mirror

        # an index page may link its wheels by absolute upstream URL: read them where --mirror says
        self.url, self.pos = mirror.rewrite(url), 0
        resp = download.get(self.url, headers={"Range": f"bytes=-{TAIL}"}, stream=True)
        if resp.status_code == 206:
            total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
            body = resp.content
            self.size = int(total) if total.isdigit() else len(body)
            self.chunks = {self.size - len(body): body}
        elif resp.status_code == 200 and int(resp.headers.get("Content-Length") or 0) <= MAX_WHOLE:
            body = resp.content
            self.size, self.chunks = len(body), {0: body}
        else:
            resp.close()
            raise download.status_error(url, resp.status_code, "wheel metadata (range read)")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        want = min(len(buf), self.size - self.pos)
        if want <= 0:
            return 0
        for start, data in self.chunks.items():
            if start <= self.pos and self.pos + want <= start + len(data):
                buf[:want] = data[self.pos - start:self.pos - start + want]
                self.pos += want
                return want
        end = min(self.size, self.pos + max(want, TAIL)) - 1
        resp = download.get(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        if resp.status_code != 206:
            raise download.status_error(self.url, resp.status_code, "wheel metadata (range read)")
        self.chunks[self.pos] = resp.content
        return self.readinto(buf)


def _metadata_from_zip(url: str) -> str:
    import zipfile

    with zipfile.ZipFile(_RemoteZip(url)) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise InstallerError(f"{url} has no .dist-info/METADATA", hint="is it a wheel?")
        return zf.read(name).decode("utf-8", "replace")


_NO_PEP658: set[str] = set()


def wheel_metadata(url: str, *, cache_dir: Path, offline: bool = False) -> str:
    """The METADATA text of the wheel at `url` (recorded in the cache after the first read)."""
    from . import upstream

    key = url + "#METADATA"
    old = upstream.cached(key, cache_dir=cache_dir)
    if old is not None:
        return old["text"]
    if offline:
        raise InstallerError(f"offline, and the metadata of {download.filename_of(url)} was never read",
                             hint="run once without --offline, or pin exact torch.* versions")
    host = url.split("/files/", 1)[0] if "/files/" in url else url.rsplit("/", 1)[0]
    got = None
    if host not in _NO_PEP658:
        got = upstream.read(url + ".metadata", cache_dir=cache_dir)   # PEP 658
        if got["status"] != 200:
            _NO_PEP658.add(host)    # the index serves none: go straight to the zip next time
    text = got["text"] if got and got["status"] == 200 else _metadata_from_zip(url)
    upstream.remember(key, text, cache_dir=cache_dir)
    return text


def requirements(metadata: str) -> dict[str, Any]:
    """Canonical name -> Requirement for the Requires-Dist lines that always apply (no extra)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for line in HeaderParser().parsestr(metadata).get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and "extra" in str(req.marker):
            continue
        out[canonicalize_name(req.name)] = req
    return out


def exact(req: Any) -> str:
    """X from a `name==X` requirement ("" for any other form)."""
    specs = list(req.specifier) if req is not None else []
    return specs[0].version if len(specs) == 1 and specs[0].operator in ("==", "===") else ""


def _wheels(index: str, project: str, v_rocm, py, *, cache_dir: Path, offline: bool) -> list[tuple[Any, str]]:
    """(Version, URL) of `project`'s +rocm<V> wheels that install on `py`, newest first."""
    from packaging.utils import parse_wheel_filename

    links = torchindex.index_links(index, project, cache_dir=cache_dir, offline=offline)
    local = torchindex.rocm_local(v_rocm)
    out = []
    for name, url in links.items():
        if name.endswith(".whl"):
            version = parse_wheel_filename(name)[1]
            if version.local == local and torchindex.wheel_versions([name], py):
                out.append((version, url))
    return sorted(out, reverse=True)


def rocms_with_torch(index: str, py, *, cache_dir: Path, offline: bool = False) -> set:
    """The ROCm versions that have a torch wheel for CPython `py` on the index."""
    from packaging.version import InvalidVersion, Version

    found = set()
    names = torchindex.index_links(index, "torch", cache_dir=cache_dir, offline=offline)
    for v in torchindex.wheel_versions(names, py):
        if v.local and v.local.startswith("rocm"):
            try:
                found.add(Version(v.local[4:]))
            except InvalidVersion:
                continue
    return found


def python_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in text.split(".")[:2])
    except ValueError:
        raise UsageError(f"torch.python {text!r} is not a Python version", hint="e.g. 3.12") from None
    return major, minor


def resolve(pins: Mapping[str, Mapping[str, Any]], archs: tuple[str, ...], *, offline: bool,
            cache_dir: Path) -> dict[str, str]:
    """torch pins -> exact rocm, torch, torchvision, torchaudio, triton (see the module doc).

    An explicit pin wins; a derived value that contradicts it is an error naming both."""
    from packaging.version import InvalidVersion, Version

    mine = {k: str(v) for k, v in pins.get("torch", {}).items()}
    therock = str(pins.get("therock", {}).get("version", "") or "")
    try:
        v_rocm = Version(therock)
    except InvalidVersion:
        raise UsageError(f"therock.version {therock!r} is not resolved to a version",
                         hint="pin therock.version, or let its resolver run first") from None
    out = {"rocm": str(v_rocm)}
    if mine.get("rocm") not in ("", *AUTO, None) and Version(mine["rocm"]) != v_rocm:
        raise UsageError(f"torch.rocm is pinned to {mine['rocm']} but therock.version is {v_rocm}",
                         hint="drop the torch.rocm pin: it follows therock.version")
    index, py = mine.get("index_url", ""), python_version(mine.get("python", "3.12"))
    wanted = {k: mine.get(k, "") for k in ("torch", "torchvision", "torchaudio", "triton")}
    if not any(v in AUTO for v in wanted.values()):
        # everything pinned: nothing to derive, no network
        return _exact(out, wanted)

    derived = ", ".join(f"torch.{k}" for k, v in wanted.items() if v in AUTO)
    why = f"{derived} are derived from {index}; pin them exactly (--set torch.KEY=VERSION) to plan without it"

    def wheels(project: str) -> list[tuple[Any, str]]:
        try:
            return _wheels(index, project, v_rocm, py, cache_dir=cache_dir, offline=offline)
        except NotFound:
            raise
        except InstallerError as exc:
            raise InstallerError(exc.message, hint=why) from None

    def meta(url: str) -> dict[str, Any]:
        try:
            return requirements(wheel_metadata(url, cache_dir=cache_dir, offline=offline))
        except InstallerError as exc:
            raise InstallerError(exc.message, hint=why) from None

    torches = wheels("torch")
    if not torches:
        from . import pypi

        near = pypi.nearest(rocms_with_torch(index, py, cache_dir=cache_dir, offline=offline), str(v_rocm))
        raise NotFound(f"no torch wheel for ROCm {v_rocm} and cp{py[0]}{py[1]} on {index}"
                       + (f"; ROCm versions with one: {', '.join(near)}" if near else ""),
                       hint="run `rdna4-install pins update` for a ROCm version that has one",
                       recipe="torch", name="torch", want=f"+rocm{v_rocm}", url=index,
                       pin="therock.version", nearest=near)
    if wanted["torch"] in AUTO:
        torch_v, torch_url = torches[0]
    else:
        torch_v = Version(wanted["torch"])
        if torch_v.local is None:
            torch_v = Version(f"{torch_v}+{torchindex.rocm_local(v_rocm)}")
        match = [u for v, u in torches if v == torch_v]
        if not match:
            near = [str(v) for v, _ in torches[:3]]
            raise NotFound(f"torch {torch_v} is not on {index} for cp{py[0]}{py[1]}; "
                           f"for rocm{v_rocm} it has {', '.join(near) or 'none'}",
                           hint="run `rdna4-install pins update`, or --set torch.torch=<one of them>",
                           recipe="torch", name="torch", want=str(torch_v), url=index, pin="torch.torch",
                           nearest=near)
        torch_url = match[0]
    out["torch"] = str(torch_v)

    triton = exact(meta(torch_url).get("triton")) if wanted["triton"] in AUTO or wanted["triton"] else ""
    if wanted["triton"] in AUTO:
        out["triton"] = triton
    else:
        if wanted["triton"] and triton and Version(wanted["triton"]) != Version(triton):
            raise UsageError(f"torch.triton is pinned to {wanted['triton']} but torch {torch_v} "
                             f"requires triton=={triton}",
                             hint="drop the torch.triton pin (set it to auto): it follows torch")
        out["triton"] = wanted["triton"]

    for key in ("torchvision", "torchaudio"):
        if wanted[key] not in AUTO:
            out[key] = wanted[key]
            continue
        candidates = wheels(key)
        if key == "torchvision":
            # PyTorch's release matrix (torchvision minor = torch minor + 15) names the likely
            # fit; try it first, the metadata still decides
            candidates.sort(key=lambda c: c[0].release[:2] != (0, torch_v.minor + 15))
        # newest first, and stop at the first fit: each candidate costs a metadata read
        fit = next((v for v, u in candidates if (req := meta(u).get("torch")) is None
                    or req.specifier.contains(torch_v, prereleases=True)), None)
        if fit is None:
            near = [str(v) for v, _ in candidates[:3]]
            raise NotFound(f"no {key} for torch {torch_v} on {index} (for rocm{v_rocm} it has "
                           f"{', '.join(near) or 'none'})",
                           hint=f'set torch.{key} to "" to leave it out, or pin one exactly',
                           recipe="torch", name=key, want=f"one that accepts torch {torch_v}", url=index,
                           pin=f"torch.{key}", nearest=near)
        out[key] = str(fit)
    return _exact(out, out)


def _exact(out: dict[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """Every version with its +rocm<V> local segment; one ROCm for all, or stop."""
    got = torchindex.coherent_pins(out["rocm"], rocm=out["rocm"], **{
        k: values[k] for k in ("torch", "torchvision", "torchaudio", "triton")})
    return {**out, **{k: v or "" for k, v in got.items()}}
