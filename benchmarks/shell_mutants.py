"""Mutants of install.sh's safety functions, for benchmarks/mutation_score.py.

mutmut mutates Python only. install.sh's checks (https only, the sha256 before
anything is installed, the sources it accepts, its temp dir, the PATH line it
adds once) get the same treatment from a few shell operators, one change at a
time: a command deleted (replaced by `:`), a test negated (`=`/`!=`, `-z`/`-n`,
`-ne`/`-eq`, `if !`/`if`), a `return` flipped where a caller reads it,
`&&`/`||` swapped, and the https-only download options dropped. Each mutant
runs tests/test_install_sh.py (less the lint and parse cases, which would kill
a mutant for its form, not its behaviour) on its own copy of the repo.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

SAFETY = ("is_loopback_url", "check_url", "make_tmpdir", "cleanup", "downloader", "checksum_of",
          "fetch_verified", "source_spec", "installer_source", "add_to_rc", "ensure_on_path")
SWAPS = ((" != ", " = "), (" = ", " != "), ("[ -z ", "[ -n "), ("[ -n ", "[ -z "), (" -ne ", " -eq "),
         ("if ! ", "if "), ("return 0", "return 1"), ("return 1", "return 0"), (" && ", " || "),
         ('_proto="=https"', '_proto="=http,https"'), ("--https-only ", ""), ('--proto-redir "$_proto" ', ""))
# lines that are shell syntax, not a command to delete
_SYNTAX = re.compile(r"^(if|then|else|elif|fi|case|esac|for|do|done|while)\b|^\}|;;\s*$|\)$|^\S+\)\s")
FORM_TESTS = ("test_shellcheck_sh_mode_has_no_findings", "test_parses_in_posix_shells",
              "test_only_functions_then_main_at_top_level")


def bodies(lines: list[str]) -> dict[str, range]:
    """Line ranges of the bodies of the top-level functions named in SAFETY."""
    out, start, name = {}, None, ""
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z_]+)\(\) \{$", line)
        if m:
            start, name = i + 1, m.group(1)
        elif line == "}" and start is not None:
            if name in SAFETY:
                out[name] = range(start, i)
            start = None
    return out


def _status_read(text: str) -> set[str]:
    """Functions whose exit status a caller looks at (`if`, `!`, `&&`, `||`). The rest
    stop the script with err() on failure, so flipping their `return` changes nothing."""
    return set(re.findall(r"(?:\bif !? *|&& *|\|\| *)([a-z_]+)\b", text))


def mutants(text: str) -> list[tuple[str, str]]:
    """(where and what changed, the mutated script) for each mutant."""
    lines = text.split("\n")
    read = _status_read(text)
    out = []
    for name, body in bodies(lines).items():
        i = body.start
        while i < body.stop:
            line = lines[i]
            code = line.strip()
            end = i
            while lines[end].endswith("\\"):   # a command continued on the next lines
                end += 1
            where = f"{name}:{i + 1}"
            for old, new in SWAPS:
                if old.startswith("return") and name not in read:
                    continue
                if old in line:
                    out.append((f"{where} {old.strip()} -> {new.strip() or 'nothing'}",
                                "\n".join(lines[:i] + [line.replace(old, new, 1)] + lines[i + 1:])))
            if code and not code.startswith("#") and not _SYNTAX.search(code):
                indent = line[:len(line) - len(line.lstrip())]
                out.append((f"{where} deleted: {code[:60]}",
                            "\n".join(lines[:i] + [indent + ":"] + [""] * (end - i) + lines[end + 1:])))
            i = end + 1
    return out


def _run(copy: Path, script: str, show: bool = False) -> str:
    (copy / "install.sh").write_text(script)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "tests/test_install_sh.py", *(f"--deselect=tests/test_install_sh.py::{t}" for t in FORM_TESTS)]
    env = {**os.environ, "TMPDIR": str(copy.with_name(copy.name + ".tmp")), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "timeout"
    rc = done.returncode
    if show and rc:
        print(done.stdout[-3000:], done.stderr[-2000:], file=sys.stderr)
    return {0: "survived", 1: "killed"}.get(rc, "other")


def run(repo: Path, workdir: Path, children: int, copy_repo: Callable[[Path], None]) -> dict:
    """Every mutant's verdict, with the same counts mutation_score.py prints for mutmut;
    `copy_repo(dest)` copies the repo's tracked files."""
    original = (repo / "install.sh").read_text()
    todo = mutants(original)
    copies = [workdir / f"copy{n}" for n in range(children)]
    for copy in copies:
        copy_repo(copy)
        # a checkout of its own: the release test copies `git ls-files` of it
        subprocess.run(["git", "init", "-q", str(copy)], check=True)
        copy.with_name(copy.name + ".tmp").mkdir()
    started = time.monotonic()
    if _run(copies[0], original, show=True) != "survived":
        raise SystemExit("install.sh: tests/test_install_sh.py fails on the unchanged script")
    free = list(copies)

    def one(item: tuple[str, str]) -> tuple[str, str]:
        copy = free.pop()
        try:
            return item[0], _run(copy, item[1])
        finally:
            free.append(copy)

    with ThreadPoolExecutor(children) as pool:
        verdicts = dict(pool.map(one, todo))
    stats = {v: 0 for v in ("killed", "timeout", "survived", "no tests", "other")}
    for v in verdicts.values():
        stats[v] += 1
    stats["total"] = len(verdicts)
    stats["seconds"] = round(time.monotonic() - started)
    stats["survivors"] = sorted(k for k, v in verdicts.items() if v == "survived")
    return stats
