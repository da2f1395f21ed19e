"""Pinned sources: a git commit (through a bare mirror cache) or a verified sdist.

Git sources are fetched by full SHA, one commit deep, into
CACHE/git/<slug>.git under refs/pins/<sha>, so a second prefix (or a rerun
after a failed build) clones from disk and never touches the network.
Submodules are fetched the same way at the commits the superproject records,
and their URLs in the work tree point at the local mirrors, so a build script
that runs `git submodule update --init` (flash-attention's setup.py does) finds
everything in place and fetches nothing.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from . import mirror as mirrors
from . import proc
from .download import check_url, locked
from .errors import InstallerError, RecipeError

FULL_SHA = re.compile(r"[0-9a-f]{40}")


def mirror_dir(cache_dir: Path, url: str) -> Path:
    """CACHE/git/<host+path>.git: readable, and never a path outside git/."""
    parts = urlsplit(url)
    raw = f"{parts.hostname or ''}{parts.path}" if parts.scheme else url
    raw = re.sub(r"\.git/*$", "", raw.rstrip("/"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "+", raw).strip("+.") or "repo"
    return Path(cache_dir) / "git" / f"{slug}.git"


def _git_env(ctx) -> dict[str, str]:
    # never prompt for credentials: a private or mistyped URL must fail, not hang
    return {**ctx.env, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}


def _probe(ctx, argv: Sequence[str], cwd: Path | None = None) -> proc.Captured:
    return proc.capture(["git", *argv], env=_git_env(ctx), cwd=cwd, timeout=120)


def _has_commit(ctx, repo: Path, commit: str) -> bool:
    return repo.is_dir() and _probe(ctx, ["-C", repo, "cat-file", "-e", f"{commit}^{{commit}}"]).ok


def ensure_commit(ctx, url: str, commit: str) -> tuple[Path, bool]:
    """The bare mirror holding `commit`; True when it was already cached."""
    check_url(url)
    if not FULL_SHA.fullmatch(commit or ""):
        raise RecipeError(f"{ctx.name}: git commit must be a full 40-character SHA, not {commit!r}",
                          hint="pin the exact commit (git rev-parse TAG) so the source cannot move")
    mirror = mirror_dir(ctx.cache_dir, url)
    if _has_commit(ctx, mirror, commit):
        return mirror, True
    if ctx.offline:
        raise InstallerError(f"offline, and {url} @ {commit[:12]} is not in the git cache",
                             hint=f"run once without --offline to fill {mirror}")
    # the cache is shared by every prefix: one writer per mirror at a time
    with locked(mirror.with_name(mirror.name + ".lock")):
        if _has_commit(ctx, mirror, commit):  # another installer fetched it meanwhile
            return mirror, True
        if mirror.is_dir():
            _clear_stale_locks(mirror)
        # also on an existing mirror: `git init` is idempotent and repairs one
        # whose own `git init` was killed half way
        ctx.run(["git", "init", "-q", "--bare", mirror], env=_git_env(ctx), what="git init")
        # the cache is keyed by the upstream URL; a mirror only says where to fetch from
        remote = mirrors.rewrite(url)
        check_url(remote)
        ctx.run(["git", "-C", mirror, "fetch", "-q", "--depth", "1", "--no-tags", remote,
                 f"{commit}:refs/pins/{commit}"], env=_git_env(ctx),
                what=f"git fetch {remote} {commit[:12]}")
    if not _has_commit(ctx, mirror, commit):
        raise InstallerError(f"{url} did not deliver commit {commit}",
                             hint="check the pinned commit exists upstream")
    return mirror, False


def _clear_stale_locks(mirror: Path) -> None:
    """Remove what a killed `git fetch` leaves in a mirror.

    SIGKILL runs no cleanup: shallow.lock and ref locks stay behind and every
    later fetch fails with "Unable to create ...lock: File exists"; a quarantine
    dir (objects/incoming-*) or tmp_pack_* is dead weight. Only called with the
    mirror's flock held, so no git process of ours is using them.
    """
    for lock in [*mirror.glob("*.lock"), *(mirror / "refs").rglob("*.lock")]:
        lock.unlink(missing_ok=True)
    for junk in [*mirror.glob("objects/incoming-*"), *mirror.glob("objects/pack/tmp_*")]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


def ls_remote(url: str, *patterns: str, timeout: float = 60) -> dict[str, str] | None:
    """ref -> commit as `git ls-remote` lists them (an annotated tag also as ref^{},
    its commit); None when the repository cannot be reached. `url` is the upstream
    URL; the repository asked is where the mirror says, as for a fetch."""
    remote = mirrors.rewrite(url)
    check_url(remote)
    env = proc.base_env({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"})
    got = proc.capture(["git", "ls-remote", remote, *patterns], env=env, timeout=timeout)
    if not got.ok:
        return None
    refs = {}
    for line in got.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        if FULL_SHA.fullmatch(sha):
            refs[ref] = sha
    return refs


def tag_commit(refs: dict[str, str], tag: str) -> str:
    """The commit tag `tag` points at in ls_remote's answer ("" when absent)."""
    ref = f"refs/tags/{tag}"
    return refs.get(ref + "^{}") or refs.get(ref, "")


def _checkout(ctx, mirror: Path, commit: str, dest: Path, *, git_dir: Path | None = None,
              sparse: Iterable[str] = ()) -> None:
    argv = ["git", "init", "-q"]
    if git_dir is not None:
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--separate-git-dir", git_dir]
    ctx.run([*argv, dest], env=_git_env(ctx), what="git init")
    patterns = [f"/{p.strip('/')}/" for p in sparse]
    if patterns:
        ctx.run(["git", "-C", dest, "config", "core.sparseCheckout", "true"], env=_git_env(ctx))
        info = Path(_probe(ctx, ["-C", dest, "rev-parse", "--git-path", "info"]).stdout.strip())
        info = info if info.is_absolute() else dest / info
        info.mkdir(parents=True, exist_ok=True)
        (info / "sparse-checkout").write_text("\n".join(patterns) + "\n")
    ctx.run(["git", "-C", dest, "fetch", "-q", "--depth", "1", "--no-tags", str(mirror),
             f"refs/pins/{commit}"], env=_git_env(ctx), what="git fetch (from the cache)")
    ctx.run(["git", "-C", dest, "-c", "advice.detachedHead=false", "checkout", "-q", "--detach",
             "FETCH_HEAD"], env=_git_env(ctx), what="git checkout")


def declared_submodules(ctx, repo: Path, commit: str, super_url: str) -> dict[str, tuple[str, str, str]]:
    """path -> (name, absolute URL, recorded commit or "") for every submodule `commit`
    declares, read from the bare `repo` (nothing checked out)."""
    got = _probe(ctx, ["-C", repo, "config", "--blob", f"{commit}:.gitmodules", "--get-regexp",
                       r"^submodule\..*\.(path|url)$"])
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for line in got.stdout.splitlines():
        key, _, value = line.partition(" ")
        name, field = key[len("submodule."):].rsplit(".", 1)
        (paths if field == "path" else urls)[name] = value
    out = {}
    for name, path in paths.items():
        entry = _probe(ctx, ["-C", repo, "ls-tree", commit, "--", path]).stdout.split()
        sha = entry[2] if len(entry) >= 3 and entry[1] == "commit" else ""
        out[path.strip("/")] = (name, _resolve_url(super_url, urls.get(name, "")), sha)
    return out


def _resolve_url(base: str, url: str) -> str:
    if not url.startswith(("./", "../")):
        return url
    # git resolves "../x.git" against the superproject's URL as if it were a directory
    return urljoin(base.rstrip("/") + "/", url)


def _add_submodules(ctx, src: Path, super_url: str, paths: Sequence[str], repo: Path,
                    commit: str) -> dict[str, str]:
    declared = declared_submodules(ctx, repo, commit, super_url) if paths else {}
    recorded: dict[str, str] = {}
    for path in paths:
        path = path.strip("/")
        if path not in declared:
            raise RecipeError(f"{ctx.name}: the source has no submodule at {path!r}",
                              hint=f"submodules it declares: {', '.join(sorted(declared)) or 'none'}")
        name, url, sha = declared[path]
        if not sha:
            raise InstallerError(f"{ctx.name}: {path} is declared in .gitmodules but HEAD records no commit for it")
        mirror, _ = ensure_commit(ctx, url, sha)
        ctx.run(["git", "-C", src, "submodule", "init", "--", path], env=_git_env(ctx), what="git submodule init")
        ctx.run(["git", "-C", src, "config", f"submodule.{name}.url", str(mirror)], env=_git_env(ctx))
        target = src / path
        if target.exists():
            shutil.rmtree(target)
        _checkout(ctx, mirror, sha, target, git_dir=src / ".git" / "modules" / name)
        recorded[path] = sha
    return recorded


def fetch_git(ctx, url: str = "", commit: str = "", tag: str = "",
              submodules: Sequence[str] = (), sparse: Sequence[str] = ()) -> Path:
    """Action "fetch-git": the pinned commit (plus named submodules) in ctx.src_dir.

    url/commit/tag default to the recipe's [source]; `sparse` limits the checkout
    to some folders (triton_kernels needs one folder of the ROCm triton tree).
    """
    url = url or getattr(ctx.source, "url", "")
    commit = (commit or getattr(ctx.source, "commit", "")).lower()
    tag = tag or getattr(ctx.source, "tag", "")
    if not url:
        raise RecipeError(f"{ctx.name}: fetch-git needs a url (in [source] or the step's 'with')")
    mirror, cached = ensure_commit(ctx, url, commit)
    dest = ctx.src_dir
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _checkout(ctx, mirror, commit, dest, sparse=sparse)
    subs = _add_submodules(ctx, dest, url, submodules, mirror, commit)
    fact: dict[str, Any] = {"kind": "git", "url": url, "commit": commit, "from_cache": cached}
    if tag:
        fact["tag"] = tag
    if subs:
        fact["submodules"] = subs
    ctx.facts["source"] = fact
    return dest


def sdist_version(src: Path) -> str:
    """The Version field of an unpacked sdist's PKG-INFO ("" when there is none)."""
    try:
        text = (src / "PKG-INFO").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    m = re.search(r"^Version:\s*(\S+)", text.split("\n\n", 1)[0], re.M)
    return m.group(1) if m else ""


def _check_sdist_version(ctx, src: Path, url: str, version: str) -> None:
    """The sdist must be the version asked for: a URL left over from another
    version would otherwise build old code under the new version's name."""
    from packaging.version import InvalidVersion, Version

    found = sdist_version(src)
    try:
        same = bool(found) and Version(found) == Version(version)
    except InvalidVersion:
        same = False
    if not same:
        raise InstallerError(f"{ctx.name}: {url} holds version {found or '(no PKG-INFO)'}, "
                             f"not the {version} asked for",
                             hint=f"drop the explicit {ctx.name}.sdist_url/sdist_sha256 pins so they "
                                  f"follow {ctx.name}.version, or set the version to match")


def fetch_sdist(ctx, url: str = "", sha256: str = "", version: str = "") -> Path:
    """Action "fetch-sdist": download (cached, verified) and unpack into ctx.src_dir, top dir stripped.

    With `version`, the sdist's PKG-INFO must carry that version."""
    from .unpack import extract_tarball

    url = url or getattr(ctx.source, "url", "")
    sha256 = sha256 or getattr(ctx.source, "sha256", "")
    if not url or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256 or ""):
        raise RecipeError(f"{ctx.name}: fetch-sdist needs a url and its sha256",
                          hint="take both from PyPI's simple index (the file's #sha256=)")
    dest = ctx.src_dir
    # unpacked as part of the verification: an unsafe or broken sdist is dropped
    # from the cache (and refused) like a wrong hash; extract_tarball replaces an
    # old tree (a rerun's) atomically
    got = ctx.fetch(url, sha256=sha256, what=f"{ctx.name} source",
                    accept=lambda path: extract_tarball(path, dest, strip_components=1))
    if version:
        _check_sdist_version(ctx, dest, url, version)
    ctx.facts["source"] = {"kind": "url", "url": url, "sha256": got.sha256, "size": got.size,
                           "from_cache": got.from_cache}
    return dest
