"""`rdna4-install report`: the first run on a real card, as one file to attach to an issue.

Runs detect, doctor, status, verify --deep, and (when asked) tune and bench as
separate `rdna4-install` processes, one after the other; a failing step is
recorded with its exit code and the next one still runs. The report is
Markdown: the host, the installer version, the receipt's tools and component
facts, then each step's command line and full output.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, hfcache, proc, state
from .errors import StepFailed


def steps(prefix: Path, *, model: str | None, tune_model: str | None, bench: bool) -> list[tuple[str, list[str]]]:
    """(title, rdna4-install arguments) in the order they run."""
    p = ["--prefix", str(prefix)]
    out = [("detect", ["detect", *p, "--json"]), ("doctor", ["doctor", *p, "--json"]), ("status", ["status", *p]),
           ("verify --deep", ["verify", *p, "--deep", "--json", *(["--model", model] if model else [])])]
    if tune_model:
        out.append(("tune", ["tune", *p, "--model", tune_model]))
    if bench:
        # the serving profiles that fit the prefix's target (rdna4: seed and rdna4-16g)
        from . import profiles, targetprofile

        target = targetprofile.of_receipt(state.read_receipt(prefix) or {})
        baseline = [arg for name in profiles.offered(target) for arg in ("--profile", name)]
        out.append(("bench", ["bench", *p, *baseline, *(["--model", tune_model] if tune_model else [])]))
    return out


def _host() -> list[str]:
    lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- rdna4-install {__version__}",
             f"- kernel: {platform.release()} ({platform.machine()})", f"- python: {sys.version.split()[0]}"]
    try:
        rel = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        lines.append(f"- os: {rel.get('PRETTY_NAME', '?').strip(chr(34))}")
    except OSError:
        pass
    return lines


def _receipt_summary(prefix: Path) -> dict[str, Any]:
    receipt = state.read_receipt(prefix) or {}
    return {"archs": receipt.get("archs"), "tools": receipt.get("tools"),
            "components": {n: {"status": c.get("status"), "version": c.get("version"), "facts": c.get("facts")}
                           for n, c in (receipt.get("components") or {}).items()},
            "tuned": receipt.get("tuned")}


def run(prefix: Path, out: Path, *, model: str | None = None, tune_model: str | None = None,
        bench: bool = False, ui: Any = None) -> tuple[Path, dict[str, int]]:
    """Write the report to `out`; returns it and each step's exit code."""
    prefix, out = Path(prefix), Path(out)
    work = state.meta_dir(prefix) / "report" if prefix.is_dir() else out.parent / ".rdna4-report"
    work.mkdir(parents=True, exist_ok=True)
    env = hfcache.with_user_vars(proc.base_env({"PYTHONUNBUFFERED": "1"}))
    if os.environ.get("RDNA4_SYSFS_ROOT"):
        env["RDNA4_SYSFS_ROOT"] = os.environ["RDNA4_SYSFS_ROOT"]   # a fake /sys, for tests and triage
    codes: dict[str, int] = {}
    sections = []
    for i, (title, args) in enumerate(steps(prefix, model=model, tune_model=tune_model, bench=bench)):
        log = work / f"{i:02d}-{title.split()[0]}.log"
        log.unlink(missing_ok=True)
        if ui is not None:
            ui.step(f"{title} (log: {log})")
        try:
            proc.run([sys.executable, "-m", "installer", *args], env=env, log=log, what=f"rdna4-install {title}")
            codes[title] = 0
        except StepFailed as exc:
            codes[title] = int(exc.message.rsplit(" ", 1)[-1]) if exc.message[-1:].isdigit() else 1
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        sections += [f"## {title} (exit code {codes[title]})", "", "```", text.rstrip(), "```", ""]
    lines = ["# rdna4-install first-run report", "", *_host(), "",
             "## steps", "", *(f"- {t}: exit code {c}" for t, c in codes.items()), "",
             "## receipt (tools and component facts)", "", "```json",
             json.dumps(_receipt_summary(prefix), indent=2), "```", "", *sections]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out, codes
