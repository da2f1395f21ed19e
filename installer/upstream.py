"""Cached reads of upstream index pages (PyPI's JSON simple API, PEP 503 pages).

Resolvers derive pins from these pages at plan time. Every read goes through
download.get (https rules, the user's CA bundle, retries, any mirror seam) and
the answer is kept in CACHE/upstream/, so a rerun or an --offline run resolves
the same values without the network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import InstallerError


# pages this process read from upstream: a second look (the check after the resolver)
# takes the answer just recorded instead of asking again
_READ: set[tuple[str, str]] = set()


def _cache_file(cache_dir: Path, url: str, accept: str) -> Path:
    key = hashlib.sha256(f"{accept} {url}".encode()).hexdigest()[:32]
    return Path(cache_dir) / "upstream" / f"{key}.json"


def cached(url: str, *, cache_dir: Path, accept: str = "text/html") -> dict[str, Any] | None:
    """The last answer recorded for `url` ({"status", "text", "url", "fetched"}), or None."""
    from . import state

    data = state.read_json(_cache_file(cache_dir, url, accept))
    return data if isinstance(data, dict) and "status" in data else None


def read(url: str, *, cache_dir: Path, offline: bool = False, accept: str = "text/html",
         fresh: bool = True) -> dict[str, Any]:
    """{"status": 200|404, "text", "url": final URL, "cached": bool} for `url`.

    fresh=False takes a recorded answer when there is one; offline never asks the
    network. An unreachable host falls back to the recorded answer, if any.
    """
    from . import download, state

    old = cached(url, cache_dir=cache_dir, accept=accept)
    if old is not None and (url, accept) in _READ:
        return {**old, "cached": False}   # read from upstream moments ago, by this process
    if offline or (old is not None and not fresh):
        if old is None:
            raise InstallerError(f"offline, and {url} was never read",
                                 hint="run once without --offline (or pin the value exactly)")
        return {**old, "cached": True}
    from . import mirror

    try:
        # the page is read where the mirror says; `url` stays the identity it is recorded under
        resp = download.get(mirror.rewrite(url), headers={"Accept": accept})
    except download.DownloadError:
        if old is not None:
            return {**old, "cached": True}
        raise
    if resp.status_code not in (200, 404, 410):
        if old is not None:
            return {**old, "cached": True}
        raise download.status_error(url, resp.status_code, "index page")
    got = {"status": 200 if resp.status_code == 200 else 404, "text": resp.text if resp.status_code == 200 else "",
           "url": resp.url, "fetched": state.now()}
    state.write_json_atomic(_cache_file(cache_dir, url, accept), got)
    _READ.add((url, accept))
    return {**got, "cached": False}


def remember(url: str, text: str, *, cache_dir: Path, accept: str = "text/html") -> None:
    """Record an answer derived from `url` some other way (e.g. a range read)."""
    from . import state

    state.write_json_atomic(_cache_file(cache_dir, url, accept),
                            {"status": 200, "text": text, "url": url, "fetched": state.now()})
