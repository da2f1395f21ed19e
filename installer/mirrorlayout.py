"""A mirror directory: every artifact an install reads, laid out for one mirror file.

`rdna4-install mirror create DIR` fills one from a plan; a bundle carries one
filled from a finished prefix. Inside DIR:

    mirror.toml                   the [rewrite] table to pass to --mirror
    files/<sha256>/<name>         TheRock tarball, sdists (a rule for each exact URL)
    git/<host>/<path>             bare repos holding refs/pins/<sha> (a rule for each repo URL)
    index/<project>/<file>        one PEP 503 index (index.html in each project folder)
                                  standing in for the torch index and PyPI

What goes in is an `Artifacts` list of upstream identities (URL + sha256, URL +
commit, name + exact version). `from_plan` makes one from a plan, `from_receipt`
from an installed prefix; a lock file's artifact list can make one the same way
and hand it to `fill`.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, urldefrag, urlsplit

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from . import download, mirror, proc, sources
from .errors import InstallerError, StepFailed

INDEX = "index"


@dataclass
class Artifacts:
    files: dict[str, str] = field(default_factory=dict)          # url -> sha256 ("" = unpinned)
    git: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)  # (url, commit) -> submodule paths
    wheels: dict[str, str] = field(default_factory=dict)         # project -> exact version
    requirements: list[str] = field(default_factory=list)        # still to resolve into `wheels`
    requirement_files: list[Path] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)             # where wheels are looked up, in order
    python: tuple[int, int] = (3, 12)

    def add_index(self, url: str) -> None:
        if url and url not in self.indexes:
            self.indexes.append(url)


def log_file(cache_dir: Path, name: str) -> Path:
    """CACHE/logs/<name>.log, started afresh: the full output of a mirror or bundle run."""
    log = Path(cache_dir) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    return log


def _ctx(dest: Path, cache_dir: Path, ui: Any, log: Path):
    """A step context for sources.ensure_commit (git runs log to `log`)."""
    from .actions import StepContext

    return StepContext(name="mirror", prefix=dest, cache_dir=Path(cache_dir), work_dir=log.parent,
                       log=log, env=proc.base_env(), vars={}, archs=(), jobs=0, ui=ui)


# --- what an install reads ---------------------------------------------------------

def from_plan(plan, work: Path, ui: Any = None) -> Artifacts:
    """Every artifact the plan's recipes fetch, from their steps' (interpolated) arguments."""
    from . import recipes as rcp
    from .pyenv import PYPI_URL
    from .torchindex import coherent_pins, resolve_from_index, stack_requirements

    arts = Artifacts()
    stack: dict[str, str] = {}
    for item in plan.items:
        if item.reason.startswith("not needed"):
            continue
        recipe, where = item.recipe, str(item.recipe.path)
        source = rcp.interpolate(dict(recipe.source.__dict__), item.vars, where) if recipe.source else {}
        for step in recipe.steps:
            if rcp.unmet(step.when, item.vars, where):
                continue
            args = rcp.interpolate(dict(step.args), item.vars, where)
            if step.action in ("install-toolchain", "fetch-sdist"):
                url = args.get("url") or source.get("url", "")
                arts.files[url] = args.get("sha256") or source.get("sha256", "")
            elif step.action == "fetch-git":
                url = args.get("url") or source.get("url", "")
                commit = (args.get("commit") or source.get("commit", "")).lower()
                arts.git[(url, commit)] = tuple(args.get("submodules") or ())
            elif step.action == "create-venv":
                arts.python = tuple(int(p) for p in str(args.get("python", "3.12")).split(".")[:2])  # type: ignore[assignment]
            elif step.action == "install-torch-stack":
                stack = args
            elif step.action == "pip-install":
                packages = args.get("packages", "")
                arts.requirements += packages.split() if isinstance(packages, str) else list(packages)
    if stack:
        arts.add_index(stack["index_url"])
        arts.add_index(stack.get("pypi_url") or PYPI_URL)
        pins = coherent_pins(stack["therock_version"], **{k: stack.get(k, "") for k in (
            "rocm", "torch", "torchvision", "torchaudio", "triton")})
        auto = [k for k in ("torch", "torchvision", "torchaudio") if pins[k] is None]
        if auto:
            pins.update(resolve_from_index(stack["index_url"], pins["rocm"], auto, arts.python,
                                           torch=pins["torch"]))
        arts.requirements = stack_requirements(pins, plan.settings.archs) + arts.requirements
    arts.add_index(PYPI_URL)
    arts.requirement_files = _sdist_requirements(arts.files, plan.settings.cache_dir, work, ui)
    return arts


def _sdist_requirements(files: dict[str, str], cache_dir: Path, work: Path, ui: Any) -> list[Path]:
    """vLLM's build and runtime requirement files (minus the torch stack, as builds
    installs them) from every sdist that has them."""
    import tarfile

    from .builds import without_stack

    out: list[Path] = []
    for url, sha in files.items():
        if not url.endswith((".tar.gz", ".tgz")) or "therock-dist" in url:
            continue
        got = download.fetch(url, cache_dir=cache_dir, sha256=sha or None, ui=ui)
        dest = work / got.sha256[:16]
        with tarfile.open(got.path) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and "/requirements/" in f"/{m.name}"
                       and m.name.endswith(".txt") and ".." not in m.name.split("/")]
            for m in members:
                rel = Path(*Path(m.name).parts[1:])    # strip the sdist's top folder
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
        for rel in ("requirements/build/rocm.txt", "requirements/rocm-build.txt", "requirements/rocm.txt"):
            if (dest / rel).is_file():
                out.append(without_stack(dest / rel))
    return out


def from_receipt(receipt: dict[str, Any], prefix: Path) -> Artifacts:
    """What a finished prefix was installed from: its receipt's files and commits, and
    every distribution in its venv (those built here come from the wheel cache instead)."""
    from .pyenv import PYPI_URL, find_uv, venv_python, venv_python_version

    arts = Artifacts()
    for comp in receipt.get("components", {}).values():
        facts = comp.get("facts") or {}
        src = facts.get("source") or {}
        if facts.get("url") and facts.get("sha256"):
            arts.files[facts["url"]] = facts["sha256"]
        if src.get("kind") == "url":
            arts.files[src["url"]] = src.get("sha256", "")
        elif src.get("kind") == "git":
            arts.git[(src["url"], src["commit"])] = tuple(src.get("submodules") or ())
        if facts.get("index_url"):
            arts.add_index(facts["index_url"])
    arts.add_index(str(receipt.get("pins", {}).get("torch", {}).get("pypi_url", "")))
    arts.add_index(PYPI_URL)
    venv = Path(prefix) / "venv"
    arts.python = venv_python_version(venv)[:2]
    got = proc.capture([find_uv(), "pip", "freeze", "--no-config", "--python", str(venv_python(prefix))],
                       env=proc.base_env(), timeout=120)
    if not got.ok:
        raise InstallerError(f"cannot list the packages in {venv}: {got.stderr.strip()[:200]}",
                             hint="rerun the install of that prefix, then bundle it")
    for line in got.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-e ") or " @ " in line:
            continue   # built here: the bundle takes those from the wheel cache (bundle.py checks)
        name, _, version = line.partition("==")
        arts.wheels[str(canonicalize_name(name))] = version
    return arts


# --- filling a mirror directory ------------------------------------------------------

def resolve(arts: Artifacts, log: Path) -> None:
    """Pin `arts.requirements` (+ files) to exact versions with uv, into `arts.wheels`."""
    if not arts.requirements and not arts.requirement_files:
        return
    from .pyenv import find_uv, uv_env

    with tempfile.TemporaryDirectory(prefix="rdna4-resolve-") as tmp:
        reqs, out = Path(tmp) / "requirements.in", Path(tmp) / "resolved.txt"
        reqs.write_text("\n".join(arts.requirements) + "\n")
        argv = [find_uv(), "pip", "compile", "--no-config", "--no-header", "--no-annotate",
                "--python-version", ".".join(map(str, arts.python)), "--index-strategy", "first-index",
                "-o", str(out), str(reqs)]
        for index in arts.indexes[:-1]:
            argv += ["--index", mirror.index_url(index)]
        argv += ["--default-index", mirror.index_url(arts.indexes[-1])]
        argv += [str(extra) for extra in arts.requirement_files]
        proc.run(argv, env=uv_env(proc.base_env()), log=log, what="uv pip compile")
        for line in out.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep and not name.startswith(("#", "-")):
                arts.wheels[str(canonicalize_name(name.split("[")[0]))] = version.split(";")[0].strip()


def place(src: Path, dest: Path) -> None:
    """dest gets src's bytes: a hard link when both are on one file system, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _git_rel(url: str) -> str:
    parts = urlsplit(url)
    raw = f"{parts.hostname}{parts.path}" if parts.scheme else "local/" + url
    clean = [re.sub(r"[^A-Za-z0-9._+-]+", "+", p) for p in raw.split("/") if p not in ("", ".", "..")]
    return "git/" + "/".join(clean)


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def _find(indexes: list[str], name: str, version: str, py: tuple[int, int]) -> tuple[str, str]:
    """(file name, URL) of the file to take for name==version: a wheel for `py` on this
    machine, else the sdist; from the first index that has the project (as uv's
    first-index strategy does)."""
    from .torchindex import index_links, wheel_fits

    for index in indexes:
        links = index_links(index, name)
        if not links:
            continue
        wheels, sdists = [], []
        for fname, url in links.items():
            try:
                if fname.endswith(".whl"):
                    if _same_version(str(parse_wheel_filename(fname)[1]), version) and wheel_fits(fname, py):
                        wheels.append((fname, url))
                elif _same_version(str(parse_sdist_filename(fname)[1]), version):
                    sdists.append((fname, url))
            except (ValueError, InvalidVersion):
                continue
        if wheels or sdists:
            return (wheels or sdists)[0]
    raise InstallerError(f"{name}=={version} is on none of {', '.join(indexes)}",
                         hint="the index no longer serves it; pick another version or mirror it yourself")


def _write_index(root: Path) -> None:
    projects = sorted(p for p in root.iterdir() if p.is_dir())
    for project in projects:
        files = sorted(f.name for f in project.iterdir() if f.is_file() and f.name != "index.html")
        links = "".join(f'<a href="{quote(f)}">{html.escape(f)}</a><br>\n' for f in files)
        (project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    links = "".join(f'<a href="{p.name}/">{p.name}</a><br>\n' for p in projects)
    (root / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")


def fill(arts: Artifacts, dest: Path, *, cache_dir: Path, ui: Any, log: Path) -> dict[str, str]:
    """Put every artifact into `dest` (through the download and git caches) and write
    dest/mirror.toml; returns its rules (upstream prefix -> path relative to dest)."""
    from .pyenv import PYPI_URL

    dest.mkdir(parents=True, exist_ok=True)
    rules: dict[str, str] = {}
    for url, sha in arts.files.items():
        got = download.fetch(url, cache_dir=cache_dir, sha256=sha or None, ui=ui)
        rel = f"files/{got.sha256}/{download.filename_of(url)}"
        place(got.path, dest / rel)
        rules[url] = rel

    ctx = _ctx(dest, cache_dir, ui, log)
    for (url, commit), paths in arts.git.items():
        repo, _ = sources.ensure_commit(ctx, url, commit)
        repos = [(url, repo)]
        declared = sources.declared_submodules(ctx, repo, commit, url) if paths else {}
        for path in paths:
            if path not in declared or not declared[path][2]:
                raise InstallerError(f"{url} @ {commit[:12]} records no submodule at {path}",
                                     hint="check the recipe's submodule list")
            _, sub_url, sha = declared[path]
            repos.append((sub_url, sources.ensure_commit(ctx, sub_url, sha)[0]))
        for repo_url, repo_dir in repos:
            rel = _git_rel(repo_url)
            shutil.copytree(repo_dir, dest / rel, dirs_exist_ok=True)
            rules[repo_url] = rel

    index = dest / INDEX
    for name, version in sorted(arts.wheels.items()):
        fname, url = _find(arts.indexes, name, version, arts.python)
        bare, frag = urldefrag(url)
        sha = frag.split("=", 1)[1] if frag.startswith("sha256=") else None
        got = download.fetch(bare, cache_dir=cache_dir, sha256=sha, ui=ui, what=fname)
        place(got.path, index / str(canonicalize_name(name)) / fname)
    if arts.wheels:
        _write_index(index)
        for alias in {*arts.indexes, PYPI_URL}:
            rules[alias] = INDEX + "/" if alias.endswith("/") else INDEX
    mirror.write_file(dest, rules)
    return rules


def create(plan, dest: Path, ui: Any) -> Path:
    """`mirror create`: everything `plan` reads, into `dest`; returns the mirror file."""
    cache_dir = plan.settings.cache_dir
    log = log_file(cache_dir, "mirror-create")
    with tempfile.TemporaryDirectory(prefix="rdna4-mirror-") as tmp, show_tail(ui, log):
        arts = from_plan(plan, Path(tmp), ui)
        resolve(arts, log)
        fill(arts, Path(dest), cache_dir=cache_dir, ui=ui, log=log)
    return Path(dest) / mirror.MIRROR_FILE


@contextlib.contextmanager
def show_tail(ui: Any, log: Path) -> Iterator[None]:
    """A failed command's last lines on screen, as the engine shows them for a step."""
    try:
        yield
    except StepFailed as exc:
        if ui is not None and getattr(exc, "tail", None):
            ui.tail(exc.tail, str(log))
        raise
