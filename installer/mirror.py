"""Mirrors: the one place where an upstream URL becomes the place it is read from.

A mirror file (`--mirror FILE` or RDNA4_MIRROR=FILE) is TOML:

    [rewrite]
    "https://stable.repo.amd.com/rocm/" = "https://mirror.lab.example/amd/"
    "https://github.com/"              = "/mnt/usb/rdna4-mirror/git/github.com/"
    "https://pypi.org/simple"          = "http://127.0.0.1:3141/root/pypi/+simple"

The longest matching prefix wins, as with git's `url.<base>.insteadOf`. A
replacement is an https URL, http to loopback, or a local directory / file://
URL (an air-gapped mirror on a USB disk or NFS); a relative path is relative to
the mirror file, so a mirror directory can be moved as a whole.

Callers keep the upstream URL as the identity of what they fetch (cache keys,
fingerprints, the receipt): the same artifact from a mirror is the same
artifact, and its sha256 is still checked. They call `rewrite` only at the
moment bytes are requested: download.py for files, therock/torchindex/upstream
for listing pages, torchpins for Range reads of wheel metadata, pyenv for the index URLs uv gets, sources for git remotes
(submodules included, since their URLs go through the same call).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import InstallerError, UsageError

MIRROR_FILE = "mirror.toml"


@dataclass(frozen=True)
class Mirror:
    rules: tuple[tuple[str, str], ...]   # (upstream prefix, replacement), longest prefix first
    source: str = ""                     # the file it came from, for messages
    local_only: bool = False             # a bundle's mirror: a URL it does not cover is an error

    def rewrite(self, url: str) -> str:
        for prefix, replacement in self.rules:
            if url.startswith(prefix):
                rest = url[len(prefix):]
                # on disk a file has the decoded name (TheRock's dev tarballs carry %2B)
                return replacement + (unquote(rest) if _is_local(replacement) else rest)
        if self.local_only and not _is_local(url):
            raise InstallerError(f"{url} is not in {self.source}",
                                 hint="this install may not touch the network; rebuild the bundle "
                                      "from a prefix that has every component done")
        return url


def _is_local(target: str) -> bool:
    scheme = urlsplit(target).scheme
    return scheme in ("", "file")


def _replacement(value: str, base: Path, where: str, prefix: str) -> str:
    from .download import check_url, local_path

    try:
        check_url(value)
    except UsageError as exc:
        raise UsageError(f"{where}: replacement for {prefix!r}: {exc.message}", hint=exc.hint) from None
    path = local_path(value)
    if path is None:
        return value
    slash = value.endswith("/")
    out = str((base / path).resolve()) if not path.is_absolute() else str(path)
    return out + "/" if slash and not out.endswith("/") else out


def load(path: Path, *, local_only: bool = False) -> Mirror:
    """Read and check a mirror file; one line naming the file for anything wrong."""
    path = Path(path).expanduser()
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the mirror file {where}: {exc.strerror or exc}",
                         hint="pass an existing file to --mirror (or RDNA4_MIRROR)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where} is not valid TOML: {exc}",
                         hint='write [rewrite] then lines "UPSTREAM-PREFIX" = "REPLACEMENT"') from None
    extra = sorted(set(data) - {"rewrite"})
    table = data.get("rewrite")
    if extra or not isinstance(table, dict):
        raise UsageError(f"{where}: expected one [rewrite] table" + (f", not {', '.join(extra)}" if extra else ""),
                         hint='write [rewrite] then lines "UPSTREAM-PREFIX" = "REPLACEMENT"')
    rules = []
    for prefix, value in table.items():
        if not isinstance(value, str) or not value or not prefix:
            raise UsageError(f"{where}: [rewrite] {prefix!r} must map to a non-empty string",
                             hint='e.g. "https://github.com/" = "/srv/mirror/git/github.com/"')
        rules.append((prefix, _replacement(value, path.resolve().parent, where, prefix)))
    rules.sort(key=lambda r: -len(r[0]))
    return Mirror(tuple(rules), where, local_only)


# --- the active mirror: set once per command by the CLI ------------------------------

_ACTIVE: Mirror | None = None


def use(mirror: Mirror | None) -> None:
    global _ACTIVE
    _ACTIVE = mirror


def active() -> Mirror | None:
    return _ACTIVE


def rewrite(url: str) -> str:
    """Where to read `url` from under the active mirror (unchanged without one)."""
    return _ACTIVE.rewrite(url) if _ACTIVE is not None else url


def index_url(url: str) -> str:
    """rewrite() for uv, which wants a file:// URL for a local index."""
    out = rewrite(url)
    if not _is_local(out) or out.startswith("file:"):
        return out
    uri = Path(out).as_uri()
    return uri + "/" if out.endswith("/") and not uri.endswith("/") else uri


def shown(url: str) -> str:
    """`url`, plus where the mirror reads it from when that differs (plan -v)."""
    if not isinstance(url, str) or _ACTIVE is None or "://" not in url:
        return url
    try:
        out = _ACTIVE.rewrite(url)
    except InstallerError as exc:
        return f"{url}  (not in the mirror: {exc.message})"
    return url if out == url else f"{url}  (via {out})"


def write_file(dest: Path, rules: dict[str, str]) -> Path:
    """DEST/mirror.toml for `rules` (replacements relative to DEST stay relative)."""
    import json

    lines = ["# written by rdna4-install; pass this file to --mirror. Paths are relative to it,",
             "# so the directory can be moved or copied as a whole.", "[rewrite]"]
    # JSON strings are valid TOML basic strings
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(rules.items())]
    out = Path(dest) / MIRROR_FILE
    out.write_text("\n".join(lines) + "\n")
    return out
