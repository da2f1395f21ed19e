"""The hint audit itself: commands are found in shown lines, folded to shapes,
recorded by the installer, and a shape shown but never run is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hintcheck

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, shapes", [
    ("install with: rdna4-install install --prefix '/a b/c'",
     ["rdna4-install install --prefix ARG"]),
    ("rerun to download it again: rdna4-install run therock --force --prefix /x/y. or not",
     ["rdna4-install run therock --force --prefix ARG"]),
    ("pick one with --set vllm.version=0.32.0, or run `rdna4-install pins update` for the newest",
     ["rdna4-install pins update"]),
    ("run `rdna4-install cache add FILE --url URL` once per file",
     ["rdna4-install cache add ARG --url ARG"]),
    ("rdna4-install install --prefix '/x' --target rdna4 (or install strix-halo into another --prefix)",
     ["rdna4-install install --prefix ARG --target ARG"]),
    ("if the new file is expected, pin it: rdna4-install run therock --set therock.sha256=ab12 --prefix /p",
     ["rdna4-install run therock --set therock.sha256=ARG --prefix ARG"]),
    ("a, b; e.g. rdna4-install bench --profile seed --prefix /p; or `rdna4-install doctor`",
     ["rdna4-install doctor", "rdna4-install bench --profile seed --prefix ARG"]),
    # the program's name inside a path or prose is not a command
    ("cache /home/u/.cache/rdna4-install is not a directory", []),
    ("install the zstandard module into rdna4-install's environment", []),
    ("P holds my-notes.txt, which rdna4-install did not put there; refusing", []),
    ("prefix / is a system folder; rdna4-install puts rocm, venv and activate there", []),
])
def test_commands_are_found_and_folded(text: str, shapes: list[str]) -> None:
    assert [hintcheck.shape(c) for c in hintcheck.commands(text)] == shapes


def test_a_shape_shown_and_not_run_is_reported(tmp_path: Path) -> None:
    shown, ran = tmp_path / "shown.jsonl", tmp_path / "ran.txt"
    lines = ["hint: rdna4-install run torch --force --prefix /p1",
             "hint: rdna4-install run torch --force --prefix '/p 2'",
             "error: x; fix: rdna4-install doctor"]
    shown.write_text("".join(json.dumps({"text": t, "argv": []}) + "\n" for t in lines))
    assert list(hintcheck.missing(shown, ran)) == ["rdna4-install doctor",
                                                   "rdna4-install run torch --force --prefix ARG"]
    ran.write_text("rdna4-install run torch --force --prefix ARG\n")
    report = hintcheck.report(shown, ran)
    assert report is not None and "rdna4-install doctor" in report and "fix: rdna4-install doctor" in report
    assert "run torch" not in report
    ran.write_text(ran.read_text() + "rdna4-install doctor\n")
    assert hintcheck.report(shown, ran) is None


def test_the_installer_records_the_commands_it_shows(tmp_path: Path) -> None:
    log = tmp_path / "shown.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), hintcheck.SHOWN: str(log)}
    prefix = tmp_path / "nothing-here"
    argv = [sys.executable, "-m", "installer", "status", "--prefix", str(prefix)]
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert list(hintcheck.shown(log)) == ["rdna4-install install --prefix ARG"]
    # without the variable nothing is written
    log.unlink()
    del env[hintcheck.SHOWN]
    subprocess.run(argv, env=env, capture_output=True, text=True)
    assert not log.exists()


def test_run_hint_fills_placeholders_and_records_the_shape_as_shown(tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    env = {**os.environ, hintcheck.RAN: str(ran)}
    result = hintcheck.run_hint("hint: run `rdna4-install cache add FILE --url URL` once per file", env,
                                fill={"FILE": str(tmp_path / "missing.tar.gz"), "URL": "https://x.example/a"})
    assert result.returncode == 2 and "missing.tar.gz" in result.stderr, result.stderr
    assert ran.read_text() == "rdna4-install cache add ARG --url ARG\n"
