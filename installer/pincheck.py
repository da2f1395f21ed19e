"""`pins check` and the install preflight: does every artifact of the plan exist upstream?

Each artifact (installer/lock.py:artifacts) is asked of its own upstream: an
HTTP HEAD for a file (TheRock tarball, vLLM sdist), the PEP 503 page of each
pinned wheel for its Python tag, `git ls-remote` for a git source. A missing
one comes with what the upstream has that is nearest. With --offline the
download, index and git caches are asked instead. Checks run in parallel: they
are a handful of small requests, and a preflight must take seconds.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InstallerError, NotFound

OK, MISSING, UNREACHABLE = "ok", "missing", "unreachable"
FIX = "rdna4-install pins update"


@dataclass
class Result:
    recipe: str
    name: str
    want: str
    status: str
    url: str = ""
    nearest: list[str] = field(default_factory=list)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    results: list[Result]

    @property
    def ok(self) -> bool:
        return all(r.status == OK for r in self.results)

    def by_status(self, status: str) -> list[Result]:
        return [r for r in self.results if r.status == status]


# --- one artifact each ---------------------------------------------------------------

def _file(art: dict[str, Any], ctx: dict[str, Any]) -> Result:
    from . import download, mirror

    res = Result(art["recipe"], art["name"], art.get("version") or art.get("sha256", ""), OK, art["url"])
    where = mirror.rewrite(art["url"])   # asked where the bytes would come from
    local = download.local_path(where)
    if local is not None:
        if not local.is_file():
            res.status, res.detail = MISSING, f"no such file {local}"
        return res
    if art["url"] in ctx["cached"] and (not art.get("sha256") or ctx["cached"][art["url"]] == art["sha256"]):
        res.detail = "in the download cache"
        return res
    if ctx["offline"]:
        res.status, res.detail = MISSING, "not in the download cache (--offline)"
        return res
    try:
        resp = download.get(where, method="HEAD")
    except download.DownloadError as exc:
        res.status, res.detail = UNREACHABLE, exc.message
        return res
    if resp.status_code in (403, 404, 410):
        res.status, res.detail = MISSING, f"HTTP {resp.status_code}"
        res.nearest = _nearest_file(art, ctx)
    elif resp.status_code != 200:
        res.status, res.detail = UNREACHABLE, f"HTTP {resp.status_code}"
    return res


def _nearest_file(art: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    """What the file's upstream has instead: TheRock's listing, or the sdist's index."""
    from . import download, pypi, therock

    pins = ctx["pins"].get(art["recipe"], {})
    try:
        if art["name"].startswith("therock-dist-"):
            directory = art["url"].rsplit("/", 1)[0] + "/"
            return therock.nearest(therock.list_versions(directory, str(pins.get("family", ""))),
                                   art["version"], 3)
        if pins.get("index_url") and art["name"].endswith(".tar.gz"):
            data = pypi.project(str(pins["index_url"]), art["recipe"], cache_dir=ctx["cache_dir"])
            return pypi.nearest(pypi.sdists(data), art["version"])
    except (download.DownloadError, InstallerError):
        pass
    return []


def _wheel(art: dict[str, Any], ctx: dict[str, Any]) -> Result:
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    from . import torchindex

    res = Result(art["recipe"], art["name"], art["version"], OK, art["url"])
    py = tuple(int(p) for p in (art.get("python") or "3.12").split(".")[:2])
    try:
        links = torchindex.index_links(art["url"], art["name"], cache_dir=ctx["cache_dir"],
                                       offline=ctx["offline"])
    except InstallerError as exc:
        res.status, res.detail = UNREACHABLE, exc.message
        return res
    want = Version(art["version"])
    have = set()
    for name in links:
        try:
            if name.endswith(".whl"):
                if torchindex.wheel_versions([name], py):   # py: the tag must fit
                    have.add(parse_wheel_filename(name)[1])
            else:
                have.add(parse_sdist_filename(name)[1])
        except (ValueError, InvalidVersion):
            continue
    if want in have:
        return res
    res.status = MISSING
    same = sorted((v for v in have if v.local == want.local), reverse=True)
    res.nearest = [str(v) for v in (same or sorted(have, reverse=True))[:3]]
    where = f"for {want.local} it has" if same else "it has"
    res.detail = (f"{art['name']} {want} is not on the index for cp{py[0]}{py[1]}; "
                  + (f"{where} {', '.join(res.nearest)}" if res.nearest else "it has no build of it"))
    return res


def _git(art: dict[str, Any], ctx: dict[str, Any]) -> Result:
    from . import download, mirror, proc, sources

    res = Result(art["recipe"], art["name"], art.get("version") or art["commit"], OK, art["url"])
    commit, tag = art.get("commit", ""), (art.get("version") if art.get("version") != art.get("commit") else "")
    cached = sources.mirror_dir(ctx["cache_dir"], art["url"])
    if commit and cached.is_dir() and proc.capture(
            ["git", "-C", str(cached), "cat-file", "-e", f"{commit}^{{commit}}"], env=proc.base_env()).ok:
        res.detail = "in the git cache"
        return res
    if ctx["offline"]:
        res.status, res.detail = MISSING, "not in the git cache (--offline)"
        return res
    where = mirror.rewrite(art["url"])
    local = download.local_path(where)
    if commit and local is not None and local.is_dir() and not proc.capture(
            ["git", "-C", str(local), "cat-file", "-e", f"{commit}^{{commit}}"], env=proc.base_env()).ok:
        res.status, res.detail = MISSING, f"{local} has no commit {commit}"
        return res
    refs = sources.ls_remote(art["url"])
    if refs is None:
        res.status, res.detail = UNREACHABLE, "git ls-remote failed"
        return res
    if tag:
        at = sources.tag_commit(refs, tag)
        if not at:
            res.status, res.detail = MISSING, f"no tag {tag}"
            res.nearest = sorted((r[len("refs/tags/"):] for r in refs if r.startswith("refs/tags/")
                                  and not r.endswith("^{}")), reverse=True)[:3]
        elif commit and at != commit:
            res.status, res.detail = MISSING, f"tag {tag} is at {at}, not the pinned {commit}"
            res.nearest = [at]
    elif commit not in refs.values():
        res.detail = "repository reachable; the commit is not a branch or tag tip, so it is fetched by SHA"
    return res


CHECKS = {"file": _file, "wheel": _wheel, "git": _git}


def check_artifacts(arts: list[dict[str, Any]], *, pins: dict, cache_dir: Path,
                    offline: bool = False) -> list[Result]:
    from . import download

    ctx = {"pins": pins, "cache_dir": cache_dir, "offline": offline,
           "cached": download.cached_urls(cache_dir)}
    if not arts:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(arts))) as pool:
        return list(pool.map(lambda a: CHECKS[a["kind"]](a, ctx), arts))


# --- the whole plan --------------------------------------------------------------------

def check_settings(settings: Any, tries: int = 8) -> Report:
    """Resolve and check every artifact. A pin a resolver cannot find is reported with
    what exists instead, and the check goes on with the nearest one in its place."""
    from . import lock
    from .plan import make_plan

    pins = {t: dict(v) for t, v in settings.pins.items()}
    found: list[Result] = []
    for _ in range(tries):
        try:
            plan = make_plan(dataclasses.replace(settings, pins=pins))
            break
        except NotFound as exc:
            found.append(Result(exc.recipe, exc.name, exc.want, MISSING, exc.url, exc.nearest, exc.message))
            table, _, key = exc.pin.partition(".")
            if not exc.nearest or table not in pins:
                return Report(found)
            pins[table][key] = exc.nearest[0]
        except InstallerError as exc:
            # an upstream a resolver needs cannot be read: nothing further can be derived
            return Report(found + [Result("(resolve)", "derived pins", "", UNREACHABLE,
                                          detail=exc.message + (f"; {exc.hint}" if exc.hint else ""))])
    else:
        return Report(found)
    arts = lock.artifacts(plan)
    return Report(found + check_artifacts(arts, pins=plan.pins, cache_dir=settings.cache_dir,
                                          offline=settings.offline))


def preflight(plan: Any, names: list[str], ui: Any = None) -> None:
    """Before the first download or build: stop in seconds if an artifact is missing."""
    from . import lock

    s = plan.settings
    results = check_artifacts(lock.artifacts(plan, names), pins=plan.pins, cache_dir=s.cache_dir,
                              offline=s.offline)
    for r in results:
        if r.status == UNREACHABLE and ui is not None:
            ui.warn(f"could not check {r.recipe} {r.name} {r.want}: {r.detail}")
    missing = [r for r in results if r.status == MISSING]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        instead = f"; it has {', '.join(first.nearest)} instead" if first.nearest else ""
        if not s.offline:
            hint = f"`{FIX}` proposes a stack that exists; `rdna4-install pins check` lists every artifact"
        elif first.url.startswith(("https://", "http://")) and not first.url.endswith(".git"):
            from . import download

            hint = (f"run once without --offline, or download {first.url} elsewhere and run: "
                    f"{download.add_command(first.url, s.cache_dir)}")
        else:
            hint = "run once without --offline to fill the cache"
        raise InstallerError(
            f"{first.recipe}: {first.name} {first.want} is missing ({first.detail}){instead}{more}; "
            "nothing was downloaded or built", hint=hint)


# --- output ------------------------------------------------------------------------------

def to_json(report: Report) -> str:
    return json.dumps({"artifacts": [r.to_json() for r in report.results], "ok": report.ok}, indent=2)


def format_table(report: Report) -> str:
    rw = max((len(r.recipe) for r in report.results), default=0)
    nw = max((len(r.name) for r in report.results), default=0)
    lines = []
    for r in report.results:
        line = f"  {r.status:<11} {r.recipe:<{rw}}  {r.name:<{nw}}  {r.want}"
        if r.status != OK:
            line += f"  ({r.detail})" if r.detail else ""
            if r.nearest and r.detail and "it has" not in r.detail:
                line += f"; nearest: {', '.join(r.nearest)}"
        lines.append(line)
    bad = len([r for r in report.results if r.status != OK])
    lines.append(f"{len(report.results) - bad} of {len(report.results)} artifacts present"
                 + ("" if report.ok else f"; run `{FIX}` for a stack that exists"))
    return "\n".join(lines)
