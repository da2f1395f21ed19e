"""Stamps are claims: what a finished recipe left in the prefix, and a cheap check
that it is still there.

A recipe declares its outputs as data (`[outputs]` in its TOML): files, dirs,
links (which must resolve) and dists (distributions installed in the venv). The
engine records them in the stamp, relative to the prefix, when the recipe
succeeds; plan and status stat them (no hashing, no reading trees) and a recipe
whose outputs are gone is redone, saying which one.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

from .errors import RecipeError

KINDS = ("files", "dirs", "links", "dists")
VENV = "venv"   # dists live in PREFIX/venv (the torch recipe's venv)


def declared(table: Mapping[str, Any], variables: Mapping[str, str], prefix: Path, where: str) -> dict:
    """A recipe's [outputs], interpolated, as prefix-relative paths (what a stamp records)."""
    from . import recipes as rcp

    out: dict[str, list[str]] = {}
    for kind in KINDS:
        values = rcp.interpolate(list(table.get(kind, ())), variables, where)
        if kind == "dists":
            out[kind] = sorted(values)
            continue
        rel = []
        for value in values:
            path = os.path.normpath(os.path.join(prefix, value))
            inside = os.path.relpath(path, prefix)
            if inside == "." or inside.startswith(".." + os.sep) or inside == "..":
                raise RecipeError(f"{where}: output {value!r} is not inside the prefix",
                                  hint="[outputs] may only name paths under {prefix}")
            rel.append(inside)
        out[kind] = sorted(rel)
    return {k: v for k, v in out.items() if v}


def merge(*claims: Any) -> dict[str, list[str]]:
    """Union of output claims; anything that is not a well-formed claim is ignored."""
    out: dict[str, set[str]] = {}
    for claim in claims:
        if not isinstance(claim, dict):
            continue
        for kind in KINDS:
            values = claim.get(kind)
            if isinstance(values, list):
                out.setdefault(kind, set()).update(v for v in values if isinstance(v, str) and v)
    return {k: sorted(v) for k, v in out.items()}


def _dist_dirs(prefix: Path) -> set[str] | None:
    """Normalised names of the distributions installed in PREFIX/venv (None: no venv)."""
    sites = list((prefix / VENV).glob("lib/python3*/site-packages"))
    if not sites:
        return None
    names = set()
    for site in sites:
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        for entry in entries:
            if entry.endswith(".dist-info"):
                names.add(_norm(entry[: -len(".dist-info")].split("-")[0]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def problem(prefix: Path, claim: Mapping[str, list[str]]) -> str:
    """The first claimed output that is not there, in words ("" when all are)."""
    for kind in ("links", "dirs", "files"):
        for rel in claim.get(kind, ()):
            path = prefix / rel
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return f"{path} is missing"
            except OSError as exc:
                return f"{path} cannot be read ({exc.strerror})"
            if kind == "links":
                if not stat.S_ISLNK(st.st_mode):
                    return f"{path} is not a link"
                if not path.exists():
                    return f"{path} points at {os.readlink(path)}, which is missing"
                continue
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is a broken link"
            if kind == "dirs" and not stat.S_ISDIR(st.st_mode):
                return f"{path} is not a directory"
            if kind == "files" and not stat.S_ISREG(st.st_mode):
                return f"{path} is not a file" + (" (it is a directory)" if stat.S_ISDIR(st.st_mode) else "")
    dists = claim.get("dists", ())
    if dists:
        have = _dist_dirs(prefix)
        if have is None:
            return f"{prefix / VENV} has no site-packages"
        for name in dists:
            if _norm(name) not in have:
                return f"{name} is not installed in {prefix / VENV}"
    return ""


def contains(outer: Mapping[str, list[str]], inner: Mapping[str, list[str]]) -> bool:
    """Does any dir or link of `outer` hold an output of `inner`? (Redoing `outer`
    replaces that tree, so `inner` must be redone with it.)"""
    roots = [r for k in ("dirs", "links") for r in outer.get(k, ())]
    paths = [p for k in ("files", "dirs", "links") for p in inner.get(k, ())]
    if inner.get("dists"):
        paths.append(VENV)
    return any(p == r or p.startswith(r + os.sep) for r in roots for p in paths)
