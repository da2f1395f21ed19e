"""What the user sees: messages on stderr, progress bars, failure tails.

Data (plan --json, status --json, detect --json) goes to stdout through
click.echo in cli.py; everything here goes to stderr so it never mixes in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO


class _Progress:
    """tqdm on a terminal; otherwise a log line at most every `every` seconds."""

    def __init__(self, ui: "UI", total: int | None, desc: str, unit: str, every: float = 10.0):
        self.ui, self.total, self.desc, self.unit, self.every = ui, total, desc, unit, every
        self.n = 0
        self._bar = None
        self._last = 0.0
        if ui.verbosity >= 0 and ui.is_tty:
            from tqdm import tqdm

            scale = unit == "B"
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=scale,
                             unit_divisor=1024 if scale else 1000, file=ui.stream, leave=False)

    def update(self, n: int) -> None:
        self.update_to(self.n + n, self.total)

    def update_to(self, n: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        now = time.monotonic()
        if self._bar is None and now - self._last >= self.every:
            self._last = now
            self.ui.detail(f"{self.desc}: {self._fmt(self.n)}" +
                           (f" of {self._fmt(self.total)}" if self.total else ""))

    def _fmt(self, n: int | None) -> str:
        if self.unit == "B" and n is not None:
            return f"{n / 1048576:.1f} MiB"
        return f"{n} {self.unit}"

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


HINT_LOG = "RDNA4_HINT_LOG"


def record_commands(text: str | None) -> None:
    """Append a shown line that holds an `rdna4-install ...` command to $RDNA4_HINT_LOG.

    The test suite sets it and fails a whole-suite run in which a command the
    installer showed was never run by a test (tests/hintcheck.py): a hint must be
    a command that works in the state that printed it."""
    path = os.environ.get(HINT_LOG)
    if not path or not text or "rdna4-install " not in text:
        return
    with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": text, "argv": sys.argv[1:]}) + "\n")


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, never with NO_COLOR (https://no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class UI:
    def __init__(self, verbosity: int = 0, stream: TextIO | None = None):
        self.verbosity = verbosity
        self.stream = stream or sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._color = use_color(self.stream)
        self.log: Path | None = None   # the running recipe's log; engine sets it

    def _say(self, prefix: str, color: str, msg: str) -> None:
        record_commands(msg)
        if self._color and prefix:
            prefix = f"\033[{color}m{prefix}\033[0m"
        print(f"{prefix}{msg}", file=self.stream, flush=True)

    def info(self, msg: str) -> None:
        if self.verbosity >= 0:
            self._say("", "", msg)

    def step(self, msg: str) -> None:
        if self.verbosity >= 0:
            self._say("==> ", "1;34", msg)

    def detail(self, msg: str) -> None:
        if self.verbosity >= 1:
            self._say("    ", "2", msg)

    def note(self, msg: str) -> None:
        """Something worth knowing while waiting (a retry): on a TTY or at -v, and in the log."""
        if self.verbosity >= 1 or (self.verbosity >= 0 and self.is_tty):
            self._say("    ", "2", msg)
        self.to_log(msg)

    def to_log(self, msg: str) -> None:
        if self.log is not None:
            with contextlib.suppress(OSError), open(self.log, "a", encoding="utf-8") as fh:
                fh.write(f"# {msg}\n")

    def success(self, msg: str) -> None:
        if self.verbosity >= 0:
            self._say("ok: ", "1;32", msg)

    def warn(self, msg: str) -> None:
        self._say("warning: ", "1;33", msg)

    def error(self, msg: str, hint: str | None = None) -> None:
        self._say("error: ", "1;31", msg)
        if hint:
            self._say("hint: ", "1", hint)

    def tail(self, lines: list[str], title: str) -> None:
        if not lines:
            return
        self._say("", "", f"--- last {len(lines)} lines of {title} ---")
        for line in lines:
            print(f"    {line}", file=self.stream)
        self._say("", "", "---")

    def progress(self, total: int | None, desc: str, unit: str = "B") -> _Progress:
        return _Progress(self, total, desc, unit)
