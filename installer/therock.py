"""TheRock ROCm toolchain: which tarball, from where, and the install step.

Sources (checked against ROCm/TheRock 89553ce, 2026-08-22, unless marked):
- file name `therock-dist-linux-<family>-<version>.tar.gz`, packed with
  `tar cfz . ` from inside the tree, so no top-level directory
  (build_tools/build_tarballs.py);
- ROCm >= 10 is published under the key prefix v5/rocm/core/tarball/ of the
  therock-repo-amd-<stream>-core buckets, streams nightly/rc/dev/bkc
  (build_tools/github_actions/publish_rocm_to_release_buckets.py,
  _therock_utils/s3_buckets.py); the public https://<stream>.repo.amd.com/
  rocm/core/tarball/ directories and the `stable` stream come from the ROCm
  10.0.0 install page (https://rocm.docs.amd.com/en/latest/install/rocm.html);
- 7.x hosts: repo.amd.com/rocm/tarball/ (stable), rocm.nightlies.amd.com/
  tarball/, rocm.<type>.amd.com/tarball-multi-arch/
  (dockerfiles/install_rocm_tarball.sh, docs/packaging/legacy_per_family_releases.md);
- directory pages embed `const files = [{"name", "mtime"}]`
  (build_tools/index_generation_s3_tar.py; ROCm/rocm-cli therock.rs parses the same);
- `-tests-` siblings (build_tarballs.py --include-test-tarballs) are skipped;
- share/therock/therock_manifest.json carries rocm_package_version since
  2026-06-01 (build_tools/generate_therock_manifest.py); rocm-core's .info/version
  is the fallback (base/artifact.toml).
UNCONFIRMED (third-party reports only): stable.repo.amd.com answering with S3
XML, the nightly host cut-over date, and where 10.0 release candidates live.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote, unquote, urljoin

from .errors import InstallerError, Refused, UsageError

CHANNELS = ("stable", "rc", "nightly", "dev", "bkc")
NIGHTLY_NEW_HOST = 20260823     # first nightly on nightly.repo.amd.com (3P, UNCONFIRMED)
PER_FAMILY_END = 20260612       # per-family release workflows deleted (TheRock 5c841238e)

# Every file a later step calls: detection/verify run rocminfo and amd-smi; the
# builds run clang/clang++ (device code, HIP_CLANG_PATH) and read the device libs.
REQUIRED_FILES = ("bin/rocminfo", "bin/amd-smi", "lib/llvm/bin/clang", "lib/llvm/bin/clang++")
REQUIRED_DIRS = ("lib/llvm/amdgcn/bitcode", "share/amd_smi")
# torch's cpp_extension (flash-attention's CK build) compiles with ROCM_HOME/bin/hipcc;
# hipconfig is hipcc's companion and goes with it (UNCONFIRMED which of our build steps
# calls it: none of vLLM 0.33.0's CMake files does). TheRock keeps both only as a deprecated shim and names
# amdclang++ as the replacement (docs/development/hipcc_deprecation.md, ROCm/TheRock
# 46b7fafa); without hipcc the flash-attention build gets a wrapper over it
# (buildenv.hipcc_shim). So a tree needs one complete set, in this order of preference.
REQUIRED_ONE_OF = (("bin/hipcc", "bin/hipconfig"), ("bin/amdclang++",))


# --- versions and URLs -----------------------------------------------------

def parse_version(text: str):
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        raise UsageError(f"therock.version {text!r} is not a version",
                         hint="use e.g. 10.1.0, 10.1.0rc2, 10.2.0a20260927 or 'latest'") from None


def _nightly_date(v) -> int | None:
    # X.Y.ZaYYYYMMDD (2026) and X.Y.ZrcYYYYMMDD (2025) carry the build date
    if v.pre and v.pre[1] >= 20000000:
        return v.pre[1]
    return None


def channel_of(v) -> str:
    if v.local and "bkc" in v.local:
        return "bkc"
    if v.dev is not None:
        return "dev"
    if _nightly_date(v):
        return "nightly"
    if v.pre:
        return "rc"
    return "stable"


def family_for(archs: Iterable[str], family: str = "") -> str:
    """The tarball group: the therock.family pin, which the target profile sets
    (recipes/targets/<name>.toml [pins.therock]); an arch no profile holds has none."""
    if family:
        return family
    from . import targetprofile

    archs = list(archs)
    profile = targetprofile.of_archs(targetprofile.load_all(), archs)
    if profile is not None and profile.pins.get("therock", {}).get("family"):
        return str(profile.pins["therock"]["family"])
    if not archs:
        raise UsageError("no GPU target to pick a TheRock family for",
                         hint="pass --gpu-arch gfx1201 (or gfx1200, gfx1151)")
    raise UsageError(f"no TheRock tarball family known for {','.join(archs)} (no target profile holds it)",
                     hint="name TheRock's group for it, e.g. --set therock.family=gfx110X-all")


def directory_url(channel: str, v=None) -> str:
    """The listing directory for `channel`; `v` picks the era (None = newest)."""
    if channel not in CHANNELS:
        raise UsageError(f"unknown therock.channel {channel!r}", hint=f"one of {', '.join(CHANNELS)}")
    major = v.release[0] if v is not None else 99
    if channel == "stable":
        if major >= 10:
            return "https://stable.repo.amd.com/rocm/core/tarball/"
        if v.release[:2] >= (7, 14):
            return "https://repo.amd.com/rocm/tarball-multi-arch/"
        return "https://repo.amd.com/rocm/tarball/"
    if channel == "nightly":
        date = _nightly_date(v) if v is not None else None
        if v is None or (date or 0) >= NIGHTLY_NEW_HOST:
            return "https://nightly.repo.amd.com/rocm/core/tarball/"
        if (date or 0) >= PER_FAMILY_END:
            return "https://rocm.nightlies.amd.com/tarball-multi-arch/"
        return "https://rocm.nightlies.amd.com/tarball/"
    if channel == "rc":
        if v is None or v.release[:2] >= (10, 1):
            return "https://rc.repo.amd.com/rocm/core/tarball/"
        return "https://rocm.prereleases.amd.com/tarball-multi-arch/"   # 7.x and 10.0 rcs (3P)
    if channel == "dev" and major < 10:
        return "https://rocm.devreleases.amd.com/tarball-multi-arch/"
    return f"https://{channel}.repo.amd.com/rocm/core/tarball/"


def tarball_name(family: str, version: str) -> str:
    return f"therock-dist-linux-{family}-{version}.tar.gz"


def tarball_url(directory: str, family: str, version: str) -> str:
    # dev versions carry "+sha": encode it (dockerfiles/install_rocm_tarball.sh)
    return urljoin(directory if directory.endswith("/") else directory + "/",
                   quote(tarball_name(family, version), safe="-._~"))


# --- listings --------------------------------------------------------------

_JS_FILES = re.compile(r"const\s+files\s*=\s*(\[.*?\])\s*;", re.S)
_NAME = re.compile(r"therock-dist-[A-Za-z0-9_.%+-]+?\.tar\.gz")


def parse_listing(text: str) -> tuple[list[str], str | None]:
    """File names in a directory page, and an S3 continuation token if any.

    Accepts TheRock's generated index.html (a JSON array in a script), S3
    ListBucketResult XML, and as a last resort any page naming the files.
    """
    m = _JS_FILES.search(text)
    if m:
        try:
            items = json.loads(m.group(1))
            return [str(i["name"]).rsplit("/", 1)[-1] for i in items if isinstance(i, dict)], None
        except (ValueError, KeyError):
            pass
    if "<ListBucketResult" in text:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            root = None
        if root is not None:
            names, token, truncated = [], None, False
            for el in root.iter():
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "Key" and el.text:
                    names.append(el.text.rsplit("/", 1)[-1])
                elif tag == "NextContinuationToken":
                    token = el.text
                elif tag == "IsTruncated":
                    truncated = (el.text or "").strip() == "true"
            return names, token if truncated else None
    return sorted({unquote(n) for n in _NAME.findall(text)}), None


def _version_in(name: str, family: str):
    """The Version a `family` dist tarball's file name carries; None for any other
    file, a -tests- tarball or a version packaging cannot order."""
    from packaging.version import InvalidVersion, Version

    m = re.fullmatch(rf"therock-dist-linux-{re.escape(family)}-(.+)\.tar\.gz", name)
    if not m or m.group(1).startswith("tests-"):
        return None
    try:
        return Version(m.group(1))
    except InvalidVersion:
        return None


def list_versions(directory: str, family: str) -> list[tuple[Any, str]]:
    """(Version, file name) for every `family` tarball at `directory`, oldest first."""
    from . import download, mirror

    names: list[str] = []
    url, params = mirror.rewrite(directory), None
    for _ in range(100):    # S3 pages hold 1000 keys
        resp = download.get(url, params=params)
        if resp.status_code != 200:
            raise download.status_error(url, resp.status_code, "TheRock listing")
        page, token = parse_listing(resp.text)
        names += page
        if not token:
            break
        params = {"list-type": "2", "continuation-token": token}
    found = {v: name for name in names if (v := _version_in(name, family)) is not None}
    return sorted(found.items())     # packaging order, never string order


def nearest(available: list, wanted: str, n: int = 5) -> list[str]:
    """Up to n versions of the same channel around `wanted`, newest first."""
    from packaging.version import InvalidVersion, Version

    try:
        want = Version(wanted)
    except InvalidVersion:
        return [str(v) for v, _ in sorted(available, reverse=True)[:n]]
    versions = sorted(v for v, _ in available if channel_of(v) == channel_of(want))
    at = bisect.bisect_left(versions, want)
    lo, hi, out = at - 1, at, []
    while len(out) < n and (lo >= 0 or hi < len(versions)):
        if lo >= 0 and (hi >= len(versions) or at - 1 - lo <= hi - at):
            out.append(versions[lo])
            lo -= 1
        else:
            out.append(versions[hi])
            hi += 1
    return [str(v) for v in sorted(out, reverse=True)]


def pick_latest(available: list, channel: str,
                has_torch: Callable[[str], bool] | None = None) -> str | None:
    """Newest version of `channel`; a nightly only counts with torch wheels."""
    for v, _ in sorted(available, reverse=True):
        if channel_of(v) != channel:
            continue
        if channel == "nightly" and has_torch is not None and not has_torch(str(v)):
            continue
        return str(v)
    return None


# --- the resolver ----------------------------------------------------------

def resolve(pins: Mapping[str, Mapping[str, Any]], archs: tuple[str, ...], *, offline: bool,
            cache_dir: Path, has_torch: Callable[[str], bool] | None = None) -> dict[str, str]:
    """therock pins -> url, version, family, channel (no network for exact versions)."""
    mine = dict(pins.get("therock", {}))
    family = family_for(archs, str(mine.get("family", "") or ""))
    channel = str(mine.get("channel", "") or "stable")
    wanted = str(mine.get("version", "") or "").strip()
    directory = str(mine.get("index_url", "") or "")
    out = {"family": family, "sha256": str(mine.get("sha256", "") or "")}
    if not wanted:
        raise UsageError("therock.version is not pinned",
                         hint="set it in recipes/pins.toml or pass --set therock.version=latest")
    if wanted == "latest" or wanted.startswith("latest-"):
        if wanted != "latest":
            channel = wanted.split("-", 1)[1]
        directory = directory or directory_url(channel)
        if has_torch is None and channel == "nightly" and not offline:
            has_torch = _torch_check(pins)
        version = (_latest_cached(cache_dir, directory, family, channel) if offline
                   else pick_latest(list_versions(directory, family), channel, has_torch))
        if version is None:
            extra = " with torch wheels" if channel == "nightly" and has_torch else ""
            raise InstallerError(f"no {channel} {family} tarball{extra} found at {directory}"
                                 + (" in the cache" if offline else ""),
                                 hint="pin an exact therock.version" +
                                      ("" if not offline else " or run without --offline"))
    else:
        # the version string says which channel it is from; the pin only matters for "latest"
        v = parse_version(wanted)
        version = wanted
        channel = channel_of(v)
        directory = directory or directory_url(channel, v)
    url = str(mine.get("url", "") or "") or tarball_url(directory, family, version)
    out.update(url=url, version=version, channel=channel, index_url=directory)
    return out


def _torch_check(pins: Mapping[str, Mapping[str, Any]]) -> Callable[[str], bool] | None:
    """A nightly tarball only counts when TheRock's index has torch wheels for it."""
    torch = pins.get("torch", {})
    index = str(torch.get("index_url", "") or "")
    if not index:
        return None
    from . import torchindex

    py = tuple(int(p) for p in str(torch.get("python", "3.12")).split(".")[:2])
    return torchindex.torch_check(index, py)  # type: ignore[arg-type]


def _latest_cached(cache_dir: Path, directory: str, family: str, channel: str) -> str | None:
    from . import download

    folder = directory.rstrip("/") + "/"
    found = [(v, url) for url in download.cached_urls(cache_dir) if url.startswith(folder)
             and (v := _version_in(unquote(url[len(folder):]), family)) is not None]
    return pick_latest(found, channel)


# --- the installed tree ----------------------------------------------------

def missing_files(root: Path) -> list[str]:
    """What the builds and probes call that `root` lacks ([] for a complete tree)."""
    missing = [p for p in REQUIRED_FILES if not (root / p).is_file()]
    missing += [p for p in REQUIRED_DIRS if not (root / p).is_dir()]
    sets = [[p for p in group if not (root / p).is_file()] for group in REQUIRED_ONE_OF]
    if all(sets):
        missing.append(" + ".join(sets[0]) + " (or its replacement "
                       + " / ".join(" + ".join(g) for g in REQUIRED_ONE_OF[1:]) + ")")
    return missing


def verify_layout(root: Path) -> None:
    missing = missing_files(root)
    if missing:
        raise Refused(f"the TheRock tarball lacks {', '.join(missing)}: it is not a Linux TheRock "
                      "dist tarball (check therock.url and therock.family)")


def read_metadata(root: Path) -> dict[str, str]:
    """The tree's own idea of its version (and commit) from TheRock metadata."""
    out: dict[str, str] = {}
    try:
        data = json.loads((root / "share/therock/therock_manifest.json").read_text())
    except (OSError, ValueError):
        data = {}
    if isinstance(data, dict):
        version = data.get("rocm_package_version") or data.get("rocm_version")
        if version:
            out["toolchain_version"] = str(version)
        if data.get("the_rock_commit"):
            out["the_rock_commit"] = str(data["the_rock_commit"])
    if "toolchain_version" not in out:
        try:
            out["toolchain_version"] = (root / ".info/version").read_text().split()[0]
        except (OSError, IndexError):
            pass
    return out


def check_link(prefix: Path, target: str, *, force: bool = False,
               force_cmd: str = "rdna4-install run therock --force") -> None:
    """Refuse to repoint PREFIX/rocm unless it is the installer's: a link to a
    rocm-<version> tree the installer unpacked (or recorded). Checked before the
    download, so a refusal costs nothing."""
    from . import state, unpack

    link = prefix / "rocm"
    if not os.path.lexists(link):
        return
    if not link.is_symlink():
        kind = "a directory" if link.is_dir() else "a file"
        raise InstallerError(f"{link} is {kind}, not a link; refusing to replace it",
                             hint=f"move it away and rerun; the installer manages {link} as a link")
    current = os.readlink(link)
    if current == target or force:
        return
    stamp = state.read_stamp(prefix, "therock")
    facts = stamp.get("facts") if isinstance(stamp, dict) else None
    recorded = Path(str(facts.get("rocm_path", ""))).name if isinstance(facts, dict) else ""
    ours = ("/" not in current and current.startswith("rocm-")
            and ((prefix / current / unpack.OWNED_LIST).is_file() or current == recorded))
    if not ours:
        raise InstallerError(f"{link} points to {current}, which rdna4-install did not put there; "
                             "refusing to repoint it",
                             hint=f"remove the link (rm '{link}') and rerun, or repoint it with: {force_cmd}")


def link_rocm(prefix: Path, target: str, *, force: bool = False,
              force_cmd: str = "rdna4-install run therock --force") -> None:
    """Point PREFIX/rocm at `target` (relative) by renaming a new link over it."""
    check_link(prefix, target, force=force, force_cmd=force_cmd)
    link = prefix / "rocm"
    tmp = prefix / f".rocm.link-{os.getpid()}"
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def install_step(ctx: Any, *, url: str, version: str, sha256: str = "") -> None:
    """Download (or take from the cache) TheRock into a staging tree beside
    PREFIX/rocm-<version>; rename it into place and point PREFIX/rocm at it only
    after the sha256 and the layout check passed."""
    from . import download, unpack

    ctx.prefix.mkdir(parents=True, exist_ok=True)
    dest = ctx.prefix / f"rocm-{version}"
    what = f"TheRock {version}"
    force_cmd = ctx.rerun_command("--force")
    try:
        # what the installer did not make is refused before a byte is downloaded
        check_link(ctx.prefix, dest.name, force=ctx.force, force_cmd=force_cmd)
        if not ctx.force:
            unpack.refuse_foreign(dest)
        with unpack.StreamExtract(dest, verify=verify_layout, what=download.filename_of(url),
                                  record=True) as sx:
            got = ctx.fetch(url, sha256=sha256, what=what, sink=sx.write, accept=sx.finish)
            # verified: only now does the tree become visible
            sx.publish(force=ctx.force)
        link_rocm(ctx.prefix, dest.name, force=ctx.force, force_cmd=force_cmd)
    except download.DownloadError as exc:
        if exc.status in (403, 404):
            raise _not_found(url, version, exc) from None
        raise
    except unpack.NotOurs as exc:
        exc.hint = f"move {exc.path} elsewhere and rerun, or delete it with: {force_cmd}"
        raise
    meta = read_metadata(dest)
    found = meta.get("toolchain_version")
    if found and found != version and ctx.ui is not None:
        ctx.ui.warn(f"{dest} says it is ROCm {found}, the pin says {version}")
    ctx.facts.update(url=url, sha256=got.sha256, version=version, size=got.size,
                     rocm_path=str(dest), **meta)
    if ctx.ui is not None:
        ctx.ui.info(f"TheRock {found or version} in {dest} (sha256 {got.sha256[:16]}...)")


def _not_found(url: str, version: str, exc: Any) -> InstallerError:
    from . import download

    directory = url.rsplit("/", 1)[0] + "/"
    m = re.search(r"therock-dist-linux-(.+?)-\d", url.rsplit("/", 1)[-1])
    family = m.group(1) if m else ""
    try:
        near = nearest(list_versions(directory, family), version)
    except download.DownloadError:
        near = []
    hint = (f"nearest available: {', '.join(near)}; pick one with --set therock.version=<version>" if near
            else f"{exc.hint}; the listing at {directory} was not readable")
    return InstallerError(f"TheRock {version} ({family}) is not available: HTTP {exc.status} for {url}",
                          hint=hint)
