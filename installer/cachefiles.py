"""`rdna4-install cache add`: files downloaded by hand, put where --offline finds them.

The download cache is content-addressed with a URL index (download.py), so a
file only counts once it sits under its sha256 and its URL points at it. This
module works out which URL a file stands for (the plan's downloads, matched by
file name, or the URL given) and which sha256 it must have (the pin, else the
hash recorded for that URL), then hands it to download.add_file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import download
from . import recipes as rcp
from .errors import UsageError


def planned_downloads(plan: Any) -> dict[str, str]:
    """url -> pinned sha256 ("" = unpinned) of every file the plan's steps download."""
    out: dict[str, str] = {}
    for item in plan.items:
        for step in item.recipe.steps:
            args = dict(step.args)
            # download steps carry url + sha256; git fetches carry a commit instead
            if "url" not in args or "sha256" not in args:
                continue
            where = f"{item.recipe.path} step {step.name!r}"
            if rcp.unmet(step.when, item.vars, where):
                continue
            got = rcp.interpolate({"url": args["url"], "sha256": args["sha256"]}, item.vars, where)
            if download.local_path(got["url"]) is None:
                out[got["url"]] = got["sha256"]
    return out


def check_files(files: tuple[Path, ...], url: str | None) -> None:
    """Refuse what needs no plan to judge (a missing file, --url for several) before planning,
    which may need the network."""
    if url and len(files) > 1:
        raise UsageError("--url names the URL of one file, but several were given",
                         hint="run `rdna4-install cache add FILE --url URL` once per file")
    for f in files:
        if not f.is_file():
            raise UsageError(f"no such file: {f}", hint="give the path of the file you downloaded")


def add(files: tuple[Path, ...], *, url: str | None, planned: dict[str, str], cache_dir: Path,
        ui: Any = None) -> list[tuple[Path, str, download.Fetched]]:
    """Add each file (already through check_files) under its URL; a file whose hash is
    wrong is refused (nothing is added for it)."""
    done = []
    for f in files:
        where = url or _url_for(f, planned)
        got = download.add_file(f, where, cache_dir=cache_dir, sha256=planned.get(where) or None, ui=ui)
        done.append((f, where, got))
    return done


def _url_for(f: Path, planned: dict[str, str]) -> str:
    matches = [u for u in planned if download.filename_of(u) == f.name]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(sorted(download.filename_of(u) for u in planned)) or "none"
    if not matches:
        raise UsageError(f"{f.name} is not a file this install downloads (expected one of: {names})",
                         hint=f"pass the URL it came from: rdna4-install cache add {f} --url URL")
    raise UsageError(f"{f.name} is the name of several downloads: {', '.join(matches)}",
                     hint=f"say which: rdna4-install cache add {f} --url URL")
