"""vLLM's release sdist from a PyPI-style index, and the vllm resolver.

PyPI's JSON simple API (PEP 691: `Accept: application/vnd.pypi.simple.v1+json`
on <index>/<project>/) answers {"name", "versions": [...], "files": [{"filename",
"url", "hashes": {"sha256"}, "yanked", ...}]} (checked against https://pypi.org/simple/vllm/,
api-version 1.1). The sdist URL and sha256 of the chosen vllm.version come from
there, so a changed version changes them, and the tag follows the version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urljoin

from .errors import InstallerError, NotFound, RecipeError, UsageError

JSON_API = "application/vnd.pypi.simple.v1+json"
PYPI = "https://pypi.org/simple"
LATEST = ("latest",)


def project_url(index_url: str, project: str) -> str:
    from packaging.utils import canonicalize_name

    return index_url.rstrip("/") + "/" + canonicalize_name(project) + "/"


def project(index_url: str, name: str, *, cache_dir: Path, offline: bool = False,
            fresh: bool = True) -> dict[str, Any]:
    """The JSON simple API page of `name`, file URLs made absolute."""
    import json

    from . import upstream

    url = project_url(index_url, name)
    got = upstream.read(url, cache_dir=cache_dir, offline=offline, accept=JSON_API, fresh=fresh)
    if got["status"] != 200:
        raise InstallerError(f"{name} is not on {index_url}", hint="check vllm.index_url")
    try:
        data = json.loads(got["text"])
        files = [dict(f, url=urljoin(got["url"], f["url"])) for f in data["files"]]
    except (ValueError, KeyError, TypeError):
        raise InstallerError(f"{url} did not answer in PyPI's JSON simple API format",
                             hint="vllm.index_url must be a PEP 691 index such as https://pypi.org/simple"
                             ) from None
    return {"name": data.get("name", name), "files": files, "url": got["url"], "cached": got["cached"]}


def sdists(data: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """Version -> file entry for every sdist that is not yanked."""
    from packaging.utils import InvalidSdistFilename, parse_sdist_filename

    out = {}
    for f in data["files"]:
        if f.get("yanked") or not str(f.get("filename", "")).endswith(".tar.gz"):
            continue
        try:
            _, version = parse_sdist_filename(f["filename"])
        except InvalidSdistFilename:
            continue
        out[version] = f
    return out


def nearest(versions, wanted: str, n: int = 3) -> list[str]:
    """Up to n of `versions` closest to `wanted` in release order, newest first."""
    import bisect

    from packaging.version import InvalidVersion, Version

    ordered = sorted(versions)
    try:
        at = bisect.bisect_left(ordered, Version(wanted))
    except InvalidVersion:
        return [str(v) for v in ordered[-n:][::-1]]
    # distance in releases from where `wanted` would sit; a tie goes to the newer one
    by_distance = sorted(range(len(ordered)), key=lambda j: (at - 1 - j, 1) if j < at else (j - at, 0))
    return [str(v) for v in sorted((ordered[j] for j in by_distance[:n]), reverse=True)]


def newest(versions) -> Any:
    final = [v for v in versions if not v.is_prerelease]
    return max(final) if final else None


def sdist_for(index_url: str, name: str, version: str, *, cache_dir: Path,
              offline: bool = False) -> dict[str, str]:
    """{"version", "url", "sha256"} of `name`'s sdist; version may be "latest".

    An exact version already in the recorded page needs no network.
    """
    from packaging.version import InvalidVersion, Version

    latest = version in LATEST
    if not latest:
        try:
            Version(version)
        except InvalidVersion:
            raise UsageError(f"vllm.version {version!r} is not a version",
                             hint="use e.g. 0.33.0 or 'latest'") from None
    # an exact version the recorded page already lists needs no network
    data = project(index_url, name, cache_dir=cache_dir, offline=offline, fresh=latest)
    found = sdists(data)
    if not latest and Version(version) not in found and data["cached"] and not offline:
        found = sdists(project(index_url, name, cache_dir=cache_dir, fresh=True))
    if latest:
        pick = newest(found)
        if pick is None:
            raise InstallerError(f"no {name} release sdist on {index_url}", hint="pin vllm.version exactly")
    else:
        pick = Version(version)
        if pick not in found:
            near = nearest(found, version)
            raise NotFound(
                f"{name} {version} has no sdist on {index_url}"
                + (f"; it has {', '.join(near)}" if near else ""),
                hint=(f"pick one with --set vllm.version={near[0]}, or run `rdna4-install pins update`"
                      if near else "check vllm.index_url"),
                recipe="vllm", name=f"{name}-{version}.tar.gz", want=version,
                url=project_url(index_url, name), pin="vllm.version", nearest=near)
    entry = found[pick]
    sha = str((entry.get("hashes") or {}).get("sha256", ""))
    return {"version": str(pick), "url": entry["url"], "sha256": sha}


def resolve(pins: Mapping[str, Mapping[str, Any]], archs: tuple[str, ...], *, offline: bool,
            cache_dir: Path) -> dict[str, str]:
    """vllm pins -> version (never "latest"), sdist_url, sdist_sha256, tag.

    An explicit sdist_url/sdist_sha256/tag pin wins; one that contradicts the
    version (or what the index says for it) stops the plan naming both.
    """
    from packaging.utils import InvalidSdistFilename, parse_sdist_filename
    from packaging.version import Version

    from . import download

    mine = dict(pins.get("vllm", {}))
    wanted = str(mine.get("version", "") or "").strip()
    index = str(mine.get("index_url", "") or "") or PYPI
    url, sha = str(mine.get("sdist_url", "") or ""), str(mine.get("sdist_sha256", "") or "").lower()
    source = str(mine.get("source", "") or "sdist")
    if not wanted:
        raise UsageError("vllm.version is not pinned", hint="set it, e.g. --set vllm.version=latest")
    out: dict[str, str] = {}
    derived: dict[str, str] | None = None
    if source == "sdist" and not (url and sha) or wanted in LATEST:
        derived = sdist_for(index, "vllm", wanted, cache_dir=cache_dir, offline=offline)
    version = derived["version"] if derived else wanted
    if url:
        try:
            named = parse_sdist_filename(download.filename_of(url))[1]
        except (InvalidSdistFilename, UsageError):
            named = None
        if named is not None and named != Version(version):
            raise UsageError(f"vllm.sdist_url is the {named} sdist ({url}) but vllm.version is {version}",
                             hint="drop the explicit vllm.sdist_url/sdist_sha256 pins so they follow "
                                  "the version, or set vllm.version to match")
    for key, explicit, value in (("sdist_url", url, (derived or {}).get("url", "")),
                                 ("sdist_sha256", sha, (derived or {}).get("sha256", ""))):
        if explicit and value and explicit != value:
            raise UsageError(f"vllm.{key} is pinned to {explicit} but {index} lists {value} "
                             f"for vllm {version}",
                             hint=f"drop the vllm.{key} pin to use the index's value")
        out[key] = explicit or value
    tag = str(mine.get("tag", "") or "")
    if tag and tag != f"v{version}":
        raise UsageError(f"vllm.tag is pinned to {tag} but vllm.version {version} is tagged v{version}",
                         hint="drop the vllm.tag pin (it follows the version)")
    out.update(version=version, tag=f"v{version}", index_url=index)
    commit = str(mine.get("commit", "") or "")
    if source == "git" and not commit:
        out["commit"] = _tag_commit(str(mine.get("git_url", "") or ""), out["tag"], offline)
    elif source == "git" and not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise RecipeError(f"vllm.commit must be a full 40-character SHA, not {commit!r}",
                          hint=f"pin the exact commit (git rev-parse {out['tag']}^{{commit}}), "
                               "or leave vllm.commit empty to look it up")
    return out


def _tag_commit(git_url: str, tag: str, offline: bool) -> str:
    """The full commit of the release tag (git ls-remote), for vllm.source = "git"."""
    from . import sources

    hint = "pin it: --set vllm.commit=<full sha of the tag>"
    if offline:
        raise InstallerError(f"offline: cannot look up the commit of {tag} at {git_url}", hint=hint)
    refs = sources.ls_remote(git_url, f"refs/tags/{tag}", f"refs/tags/{tag}^{{}}")
    if refs is None:
        raise InstallerError(f"cannot reach {git_url} to look up the commit of {tag}", hint=hint)
    commit = sources.tag_commit(refs, tag)
    if not commit:
        raise InstallerError(f"{git_url} has no tag {tag}", hint=hint)
    return commit
