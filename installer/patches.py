"""Apply patches/<recipe>/NNNN-slug.patch to a source tree, safely and loudly.

Each patch is first checked (`git apply --check`: exact context, no fuzz). A
patch that does not apply but whose reverse does is already in the tree and is
skipped, so a rerun on a kept work dir is safe. Anything else stops the build
naming the patch, the source version and the first hunk that failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import proc
from .errors import InstallerError

APPLIED, ALREADY = "applied", "already applied"
APPLIES, CONFLICTS = "applies", "conflicts"


def _git_apply(src: Path, patch: Path, env: Mapping[str, str], *extra: str) -> proc.Captured:
    # GIT_CEILING_DIRECTORIES: an sdist tree has no .git, and git must not walk up
    # into some enclosing repository and apply the paths relative to *its* root
    env = {**env, "GIT_CEILING_DIRECTORIES": str(src.parent)}
    return proc.capture(["git", "apply", "--whitespace=nowarn", *extra, str(patch.resolve())],
                        env=env, cwd=src, timeout=120)


def first_failing_hunk(patch: Path, error: str) -> str:
    """The hunk git names in "error: patch failed: FILE:LINE", as 'FILE @@ ... @@'."""
    m = re.search(r"patch failed: (.+):(\d+)", error)
    if not m:
        first = next((ln for ln in error.splitlines() if ln.startswith("error:")), error.strip())
        return first.removeprefix("error: ").strip() or "no hunk named"
    path, line = m.group(1), m.group(2)
    current = ""
    for text in patch.read_text(errors="replace").splitlines():
        if text.startswith("+++ "):
            current = re.sub(r"^[ab]/", "", text[4:].strip())
        elif text.startswith("@@") and current == path and re.match(rf"@@ -{line}(,|\s)", text):
            return f"{path} {text.strip()}"
    return f"{path} at line {line}"


def check_one(src: Path, patch: Path, *, env: Mapping[str, str]) -> tuple[str, str]:
    """(APPLIES, ""), (ALREADY, "") when its reverse applies (it is in the source), or
    (CONFLICTS, the first failing hunk). Changes nothing."""
    forward = _git_apply(src, patch, env, "--check")
    if forward.ok:
        return APPLIES, ""  # pragma: no mutate (equivalent: the hunk is read only for CONFLICTS)
    if _git_apply(src, patch, env, "--check", "--reverse").ok:
        return ALREADY, ""  # pragma: no mutate (equivalent: the hunk is read only for CONFLICTS)
    return CONFLICTS, first_failing_hunk(patch, forward.stderr)


def apply_one(src: Path, patch: Path, *, env: Mapping[str, str], what: str, version: str) -> str:
    state, hunk = check_one(src, patch, env=env)
    if state == ALREADY:
        return ALREADY
    if state == CONFLICTS:
        raise InstallerError(
            f"{what}: patch {patch.name} does not apply to {version or 'this source'}: "
            f"first failing hunk {hunk}",
            hint=f"the source moved under the patch; refresh it or drop it per its header ({patch})")
    done = _git_apply(src, patch, env)
    if not done.ok:
        raise InstallerError(f"{what}: patch {patch.name} passed its check but failed to apply",
                             hint=done.stderr.strip()[-300:] or None)
    return APPLIED


def apply_all(src: Path, patches: Sequence[Path], *, env: Mapping[str, str], what: str,
              version: str = "", log: Path | None = None) -> dict[str, str]:
    results: dict[str, str] = {}
    for patch in patches:
        results[patch.name] = apply_one(src, patch, env=env, what=what, version=version)
        if log is not None:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"patch {patch.name}: {results[patch.name]}\n")
    return results


def header_problems(patch: Path) -> list[str]:
    """What a patch header lacks: the why, an upstream link, when to drop it."""
    text = patch.read_text(errors="replace")
    header = text.split("\ndiff --git", 1)[0]
    problems = []
    if not re.search(r"^Subject: .+", header, re.MULTILINE):
        problems.append("no Subject: line (git format-patch header)")
    if not re.search(r"https://\S+", header):
        problems.append("no upstream link (https://...)")
    if not re.search(r"(?i)\b(drop|remove)\b.*\b(when|once|after|if)\b", header):
        problems.append("does not say when to drop it")
    if "\ndiff --git" not in text:
        problems.append("no 'diff --git' section")
    return problems


def header_field(patch: Path, name: str) -> str:
    """A `Name: value` line of the patch's header ("" when absent)."""
    header = patch.read_text(errors="replace").split("\ndiff --git", 1)[0]
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", header, re.MULTILINE)
    return m.group(1).strip() if m else ""


def for_version(patch_files: Sequence[Path], version: str) -> tuple[list[Path], list[str]]:
    """(patches for `version`, a note per patch left out): a header's `Versions:` line is
    a PEP 440 specifier of the releases that need the patch; without one it always applies."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return list(patch_files), []
    kept, notes = [], []
    for patch in patch_files:
        spec = header_field(patch, "Versions")
        try:
            wanted = SpecifierSet(spec) if spec else None
        except InvalidSpecifier:
            raise InstallerError(f"patch {patch.name}: 'Versions: {spec}' is not a version specifier",
                                 hint="write e.g. Versions: >=0.33.0,<0.35") from None
        if wanted is None or wanted.contains(v, prereleases=True):
            kept.append(patch)
        else:
            notes.append(f"patch {patch.name} skipped: it is for {spec}, not {version}")
    return kept, notes


def precheck(items: Sequence, *, prefix: Path, cache_dir: Path, offline: bool, ui=None) -> None:
    """Before any build: every patch of a recipe built from an sdist is checked against
    that sdist. One already in it is noted (the apply step skips it); a conflict stops
    the install naming the patch and the hunk."""
    import tempfile

    from . import download
    from . import recipes as rcp
    from .unpack import extract_tarball

    for item in items:
        where = str(item.recipe.path)
        step = next((s for s in item.recipe.steps if s.action == "fetch-sdist"
                     and not rcp.unmet(s.when, item.vars, where)), None)
        if not item.patches or step is None:
            continue
        args = rcp.interpolate(dict(step.args), item.vars, where)
        label = f"{item.name} {item.vars.get('_version', '')}".strip()
        got = download.fetch(args["url"], cache_dir=cache_dir, sha256=args.get("sha256") or None,
                             offline=offline, ui=ui, what=f"{item.name} source")
        # in the prefix, named like the temps a rerun sweeps (state.PREFIX_TEMPS)
        with tempfile.TemporaryDirectory(prefix=".patchcheck.tmp-", dir=prefix) as tmp:
            src = extract_tarball(got.path, Path(tmp) / "src", strip_components=1)
            for patch in item.patches:
                state, hunk = check_one(src, patch, env=proc.base_env())
                if state == ALREADY and ui is not None:
                    ui.info(f"{item.name}: patch {patch.name} is already in {label}; it is skipped "
                            "(drop it per its header)")
                elif state == CONFLICTS:
                    raise InstallerError(
                        f"{item.name}: patch {patch.name} conflicts with {label}: first failing hunk "
                        f"{hunk}; nothing was built",
                        hint="refresh or drop the patch (its header says when); "
                             "`rdna4-install pins update` checks every patch against a release")


def _version(ctx) -> str:
    src = ctx.facts.get("source") or {}
    ident = src.get("tag") or src.get("commit", "")[:12] or src.get("sha256", "")[:12]
    label = ctx.vars.get("_version", "")
    return " ".join(x for x in (f"{ctx.name} {label}".strip(), f"({ident})" if ident else "") if x)


def apply_patches(ctx) -> dict[str, str]:
    """Action "apply-patches": the recipe's patches (resolved by the plan) in order."""
    results = apply_all(ctx.src_dir, list(ctx.patches), env=ctx.env, what=ctx.name,
                        version=_version(ctx), log=ctx.log)
    ctx.facts["patches"] = results
    if ctx.ui is not None and results:
        ctx.ui.detail(", ".join(f"{k}: {v}" for k, v in results.items()))
    return results
