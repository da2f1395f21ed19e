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
        return APPLIES, ""
    if _git_apply(src, patch, env, "--check", "--reverse").ok:
        return ALREADY, ""
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
