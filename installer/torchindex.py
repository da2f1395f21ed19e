"""TheRock's torch stack: which versions belong together, and what its wheel index holds.

TheRock's torch is welded to one ROCm version: its local version is +rocm<V>,
it requires rocm[libraries]==V and checks that version when imported. So the
whole stack is pinned exactly, local segment included, and V is the toolchain
tarball's version. Pins left to "auto" are resolved from TheRock's PEP 503 index.
"""

from __future__ import annotations

import os
import platform
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from . import download
from .errors import InstallerError, UsageError

RESOLVE = ("auto", "latest")  # a pin value meaning "the newest matching build on the index"


# --- versions: which builds belong together ---------------------------------------

def same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return False


def _norm(version: str, what: str) -> Version:
    try:
        return Version(version)
    except InvalidVersion:
        raise UsageError(f"{what} is not a valid version: {version!r}") from None


def tarball_version(prefix: Path, therock_version: str) -> str:
    """The toolchain's ROCm version, cross-checked with PREFIX/rocm -> rocm-<version>."""
    if therock_version in RESOLVE or not therock_version:
        raise UsageError("the TheRock tarball version is not known here",
                         hint="pass the resolved therock version to install-torch-stack")
    v = str(_norm(therock_version, "therock.version"))
    link = Path(prefix) / "rocm"
    if link.is_symlink():
        m = re.fullmatch(r"rocm-(.+)", Path(os.readlink(link)).name)
        if m and not same_version(m[1], v):
            raise InstallerError(f"ROCm version mismatch: {link} is ROCm {m[1]} but therock.version is {v}",
                                 hint="reinstall the therock recipe first; tarball, rocm wheels "
                                      "and torch must be one ROCm version")
    return v


def coherent_pins(v_rocm: str, *, rocm: str, torch: str, torchvision: str, torchaudio: str,
                  triton: str) -> dict[str, str | None]:
    """Normalised exact pins; None means "resolve from the index", "" means "not wanted"
    (for triton: "the one torch pins").

    tarball version == rocm wheel version == torch's +rocm version, or stop.
    """
    want = Version(v_rocm)
    hint = (f"pin +rocm{want} builds, or set therock.version to the ROCm they were built "
            "for; tarball, rocm wheels and torch must be one ROCm version")
    if rocm not in RESOLVE and rocm and _norm(rocm, "torch.rocm") != want:
        raise InstallerError(f"ROCm version mismatch: the tarball is ROCm {want} but torch.rocm "
                             f"pins rocm wheels {rocm}", hint=hint)
    if not torch:
        raise UsageError("torch.torch is empty", hint='pin an exact +rocm version or "auto"')
    pins: dict[str, str | None] = {"rocm": str(want)}
    for key, value in (("torch", torch), ("torchvision", torchvision), ("torchaudio", torchaudio)):
        if value in RESOLVE or not value:
            pins[key] = None if value else ""
            continue
        v = _norm(value, f"torch.{key}")
        if v.local is None:
            v = Version(f"{v}+{rocm_local(want)}")
        local = v.local or ""
        ok = local == rocm_local(want)
        if key == "torchaudio" and not ok and local.startswith("rocm"):
            # nightly torchaudio may carry another build date than torch (3P observation)
            ok = _release_of(local[4:]) == want.release
        if not ok:
            raise InstallerError(f"ROCm version mismatch: {key} {v} is not built for the tarball's "
                                 f"ROCm {want}", hint=hint)
        pins[key] = str(v)
    if triton in RESOLVE or not triton:
        pins["triton"] = ""  # torch's own metadata pins triton exactly; uv installs that one
    else:
        t = _norm(triton, "torch.triton")
        if not (t.local == rocm_local(want) or (t.local or "").endswith("." + rocm_local(want))):
            raise InstallerError(f"ROCm version mismatch: triton {t} is not TheRock's build for "
                                 f"ROCm {want}", hint=hint)
        pins["triton"] = str(t)
    return pins


def rocm_local(want: Version) -> str:
    """The local segment TheRock gives builds for ROCm `want` (bkc's + becomes a dot)."""
    return "rocm" + str(want).replace("+", ".")


def _release_of(version: str) -> tuple[int, ...] | None:
    try:
        return Version(version).release
    except InvalidVersion:
        return None


def stack_requirements(pins: Mapping[str, str | None], archs: Iterable[str]) -> list[str]:
    """Exact requirements; the device packages are also named on their own because
    an extra that resolves to nothing only warns (TheRock #5347)."""
    archs = tuple(archs)
    dev = ",".join(f"device-{a}" for a in archs)
    v = pins["rocm"]
    reqs = [f"rocm[libraries,devel,{dev}]=={v}"]
    reqs += [f"rocm-sdk-{part}=={v}" for part in ("core", "libraries", "devel")]
    reqs += [f"rocm-sdk-device-{a}=={v}" for a in archs]
    reqs += [f"torch[{dev}]=={pins['torch']}"]
    reqs += [f"amd-torch-device-{a}=={pins['torch']}" for a in archs]
    if pins.get("torchvision"):
        reqs.append(f"torchvision[{dev}]=={pins['torchvision']}")
    if pins.get("torchaudio"):
        reqs.append(f"torchaudio=={pins['torchaudio']}")
    if pins.get("triton"):
        reqs.append(f"triton=={pins['triton']}")
    return reqs


# --- the index: PEP 503 pages and resolution -----------------------------------------

class _Links(HTMLParser):
    def __init__(self, base: str = "") -> None:
        super().__init__()
        self.base = base
        self.files: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.files.append(unquote(urlsplit(href).path.rsplit("/", 1)[-1]))
            self.urls.append(urljoin(self.base, href.split("#", 1)[0]))


def index_links(index_url: str, project: str, *, cache_dir: Path | None = None,
                offline: bool = False, fresh: bool = True) -> dict[str, str]:
    """file name -> absolute URL on the PEP 503 page `<index>/<project>/` ({} when absent).

    With `cache_dir` the page is read through upstream (recorded for reruns and --offline)."""
    from . import mirror

    url = index_url.rstrip("/") + "/" + canonicalize_name(project) + "/"
    # download.get: the https policy, retries, the user's CA bundle and no proxy for loopback
    try:
        if cache_dir is not None:
            from . import upstream

            got = upstream.read(url, cache_dir=cache_dir, offline=offline, fresh=fresh)
            status, text, final = got["status"], got["text"], got["url"]
        else:
            resp = download.get(mirror.rewrite(url), headers={"Accept": "text/html"})
            status, text, final = resp.status_code, resp.text, resp.url
    except download.DownloadError as exc:
        raise InstallerError(exc.message, hint="check the network, or pin exact versions in "
                                               "recipes/pins.toml") from None
    if status == 404:
        return {}
    if status != 200:
        raise InstallerError(f"cannot read {url}: HTTP {status}",
                             hint="check torch.index_url, or pin exact versions")
    parser = _Links(final)
    parser.feed(text)
    return dict(zip(parser.files, parser.urls))


def index_files(index_url: str, project: str) -> list[str]:
    """File names on the PEP 503 page `<index>/<project>/` ([] when the project is absent)."""
    return list(index_links(index_url, project))


def wheel_fits(filename: str, py: tuple[int, int]) -> bool:
    """Whether the wheel `filename` installs on CPython `py` on this machine."""
    try:
        tags = parse_wheel_filename(filename)[3]
    except ValueError:
        return False
    return _fits(tags, py, platform.machine())


def _fits(tags, py: tuple[int, int], machine: str) -> bool:
    cp = f"cp{py[0]}{py[1]}"
    for t in tags:
        interp = t.interpreter in (cp, f"py{py[0]}", f"py{py[0]}{py[1]}") or (
            t.abi == "abi3" and t.interpreter.startswith("cp3") and t.interpreter[3:].isdigit()
            and int(t.interpreter[3:]) <= py[1])
        plat = t.platform == "any" or (t.platform.startswith(("linux_", "manylinux"))
                                       and t.platform.endswith(machine))
        if interp and t.abi in (cp, "abi3", "none") and plat:
            return True
    return False


def wheel_versions(files: Iterable[str], py: tuple[int, int]) -> list[Version]:
    """Versions of the wheels in `files` that install on CPython `py` here."""
    out = []
    for f in files:
        if f.endswith(".whl"):
            try:
                _, version, _, tags = parse_wheel_filename(f)
            except ValueError:
                continue
            if _fits(tags, py, platform.machine()):
                out.append(version)
    return out


def all_versions(files: Iterable[str]) -> set[Version]:
    out = set()
    for f in files:
        try:
            out.add(parse_wheel_filename(f)[1] if f.endswith(".whl") else parse_sdist_filename(f)[1])
        except ValueError:
            continue
    return out


def resolve_from_index(index_url: str, v_rocm: str, keys: Iterable[str], py: tuple[int, int],
                       *, torch: str | None = None) -> dict[str, str]:
    """The newest +rocm<V> build of each of `keys` whose tag fits CPython `py`."""
    want = Version(v_rocm)
    rocms = all_versions(index_files(index_url, "rocm"))
    if want not in rocms:
        raise InstallerError(f"ROCm {want} has no rocm package on {index_url}",
                             hint="check therock.version and torch.index_url (stable and nightly "
                                  "builds live on different hosts)")
    out: dict[str, str] = {}
    torch_v = Version(torch) if torch else None
    for key in [k for k in ("torch", "torchvision", "torchaudio") if k in keys]:
        versions = wheel_versions(index_files(index_url, key), py)
        found = [v for v in versions if v.local == rocm_local(want)]
        if key == "torchvision" and torch_v is not None:
            # PyTorch's release matrix: torchvision minor = torch minor + 15
            found = [v for v in found if v.release[:2] == (0, torch_v.minor + 15)] or found
        if not found:
            if key == "torch":
                raise _nightly_gap(index_url, want, py, rocms, versions)
            raise InstallerError(f"no {key} wheel for ROCm {want} and cp{py[0]}{py[1]} on {index_url}",
                                 hint=f'pin torch.{key} exactly, or set it to "" to skip it')
        out[key] = str(max(found))
        if key == "torch":
            torch_v = max(found)
    return out


def torch_check(index_url: str, py: tuple[int, int] = (3, 12)) -> Callable[[str], bool]:
    """has_torch for one version after another, reading the torch page once
    (picking the newest nightly may try several)."""
    found: set[str | None] | None = None

    def check(v_rocm: str) -> bool:
        nonlocal found
        if found is None:
            found = {v.local for v in wheel_versions(index_files(index_url, "torch"), py)}
        return rocm_local(Version(v_rocm)) in found
    return check


def has_torch(index_url: str, v_rocm: str, py: tuple[int, int] = (3, 12)) -> bool:
    """Whether `index_url` has a torch wheel for ROCm `v_rocm` and CPython `py`
    (nightly tarballs can exist on days without torch wheels)."""
    return torch_check(index_url, py)(v_rocm)


def _nightly_gap(index_url: str, want: Version, py: tuple[int, int], rocms: set[Version],
                 torches: list[Version]) -> InstallerError:
    """The error for a ROCm version without torch wheels, naming the nearest ones with both
    (`rocms`: the rocm package's versions; `torches`: torch wheels that fit `py`)."""
    torch_rocms = set()
    for v in torches:
        if v.local and v.local.startswith("rocm"):
            try:
                torch_rocms.add(Version(v.local[4:]))
            except InvalidVersion:
                pass
    both = sorted(rocms & torch_rocms)
    near = [str(v) for v in [v for v in both if v < want][-1:] + [v for v in both if v > want][:1]]
    hint = (f"nearest ROCm versions with both rocm and torch wheels: {', '.join(near)}; "
            "set therock.version to one of them") if near else \
        "no ROCm version on this index has both rocm and torch wheels for this Python"
    return InstallerError(f"no torch wheel for ROCm {want} and cp{py[0]}{py[1]} on {index_url}",
                          hint=hint)
