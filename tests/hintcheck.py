"""The hint audit: every `rdna4-install ...` command the installer shows must be run by a test.

The installer appends each shown line holding such a command to $RDNA4_HINT_LOG
(installer/ui.py record_commands). conftest points that at a file for the whole
session; `run_hint` runs a hint's command and notes its shape in a second file.
After a whole-suite run, a shape that was shown but never run fails the run and
is listed: write the test that puts the installer in that state and runs the
hint (`run_hint(result.stderr, env)`), asserting that it works there.

A shape is the command with its variable parts folded: paths, URLs, versions,
hashes and placeholders (FILE, URL) become ARG, so `run therock --force --prefix
/tmp/x` and the same hint for another prefix are one shape.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHOWN = "RDNA4_HINT_LOG"
RAN = "RDNA4_HINT_RAN"

# a command ends at a backtick, a closing bracket, `; `, `, ` or ` or ` / ` instead`
_BACKTICKED = re.compile(r"`(rdna4-install [^`]+)`")
_BARE = re.compile(r"(?<![\w/.-])(rdna4-install (?:(?:'[^']*'|[-\w\"/.~=:@+,]*[-\w\"/~=:@+]) ?)+?)"
                   r"(?=$|`|\)|\(|; |, | or | instead| to |\.\s|\.$|,$| once)")
_WORD = re.compile(r"^[a-z][a-z-]*$")   # a subcommand, recipe or option value; digits mean a variable


def _is_command(text: str) -> bool:
    """`rdna4-install SUBCOMMAND ...` or `rdna4-install --option ...`, not the name in prose."""
    from installer.cli import cli

    first = text.split()[1] if len(text.split()) > 1 else ""
    return first.startswith("-") or first in cli.commands


def commands(text: str) -> list[str]:
    """The `rdna4-install ...` commands in one shown line, in order."""
    found = _BACKTICKED.findall(text)
    rest = _BACKTICKED.sub(" ", text)
    found += [m.strip() for m in _BARE.findall(rest)]
    return [c for c in found if _is_command(c)]


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _fold(word: str) -> str:
    if word.startswith("-"):
        name, eq, value = word.partition("=")
        return f"{name}={_fold(value)}" if eq else name
    key, eq, value = word.partition("=")
    if eq and re.match(r"^[a-z][\w.-]*$", key):
        return f"{key}={_fold(value)}"          # --set therock.sha256=ARG keeps its key
    return word if _WORD.match(word) else "ARG"


def shape(command: str) -> str:
    """`rdna4-install run therock --force --prefix ARG`: the command with variable parts folded."""
    words = _words(command)
    return " ".join(words[:1] + [_fold(w) for w in words[1:]])


def shown(log: Path) -> dict[str, str]:
    """shape -> one shown line with it, from the installer's log."""
    out: dict[str, str] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            for command in commands(text):
                out.setdefault(shape(command), text)
    return out


def ran(log: Path) -> set[str]:
    return set(log.read_text(encoding="utf-8").splitlines()) if log.is_file() else set()


def missing(shown_log: Path, ran_log: Path) -> dict[str, str]:
    """Shapes shown but never run, each with a line that showed it."""
    done = ran(ran_log)
    return {s: text for s, text in sorted(shown(shown_log).items()) if s not in done}


def report(shown_log: Path, ran_log: Path) -> str | None:
    """What a whole-suite run prints when commands were shown but not run, else None."""
    unrun = missing(shown_log, ran_log)
    if not unrun:
        return None
    lines = [f"{len(unrun)} command(s) the installer showed were never run by a test (tests/hintcheck.py):"]
    for command, text in unrun.items():
        lines += [f"  {command}", f"      shown as: {text}"]
    return "\n".join(lines)


def hint_argv(text: str, env: dict | None = None, *, which: int = 0,
              fill: dict[str, str] | None = None) -> list[str]:
    """The `which`-th command in `text` (a hint line or a whole stderr) as argv without
    `rdna4-install`, noted as run. `fill` replaces placeholders (FILE, URL, HEAD_IP:6379)
    with real values; the shape noted is the command as shown."""
    found = [c for line in text.splitlines() for c in commands(line)]
    assert found, f"no rdna4-install command in: {text!r}"
    command = found[which]
    ran_log = (env or {}).get(RAN) or os.environ.get(RAN)
    if ran_log:
        with open(ran_log, "a", encoding="utf-8") as fh:
            fh.write(shape(command) + "\n")
    return [fill.get(w, w) if fill else w for w in _words(command)[1:]]


def run_hint(text: str, env: dict | None = None, *, which: int = 0, fill: dict[str, str] | None = None,
             cwd: Path | str | None = None, input: str | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a shown command (see hint_argv) as the user would paste it; returns the finished process."""
    argv = hint_argv(text, env, which=which, fill=fill)
    run_env = dict(env if env is not None else os.environ)
    run_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "installer", *argv], env=run_env, cwd=cwd,
                          capture_output=True, text=True, input=input, timeout=timeout)
