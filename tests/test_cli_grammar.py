"""One grammar for every subcommand, including ones added later: the tests walk
the click group, so a new command is checked without being listed here.

-v/-q after the command name, examples at the end of every --help, no colour
with NO_COLOR (under a real pseudo-terminal, where colour would otherwise be
on), and --json output that stays JSON when the command fails.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import click
import pytest

from installer.cli import cli

REPO = Path(__file__).resolve().parents[1]


def _walk(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield path + (name,)
        if isinstance(command, click.Group):
            yield from _walk(command, path + (name,))


COMMANDS = list(_walk(cli))
ALL = [()] + COMMANDS  # () is `rdna4-install` itself


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


def test_the_walk_sees_every_command():
    assert {"install", "plan", "run", "status", "doctor", "detect", "verify", "bench"} <= {p[0] for p in COMMANDS}
    assert ("cache", "add") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_v_and_q_are_accepted_after_every_command(runner, path):
    for flags in (["-v"], ["-q"], ["-vv", "--quiet"], ["--verbose"]):
        out = runner.invoke(cli, [*path, *flags, "--help"])
        assert out.exit_code == 0, out.output


def test_v_and_q_after_the_command_change_what_is_shown(runner, tmp_path, exact_pins):
    base = ["plan", "--gpu-arch", "gfx1201", "--prefix", str(tmp_path / "p")]
    assert "pin therock.version" not in runner.invoke(cli, base).output
    assert "pin therock.version" in runner.invoke(cli, [*base, "-v"]).output
    assert "pin therock.version" in runner.invoke(cli, ["-v", *base]).output
    hand = tmp_path / "by-hand.tar.gz"
    hand.write_bytes(b"a file fetched by hand")
    add = ["cache", "add", str(hand), "--url", "https://example.com/by-hand.tar.gz",
           "--cache-dir", str(tmp_path / "c")]
    loud, quiet = runner.invoke(cli, add), runner.invoke(cli, [*add, "-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output
    assert "cached as" in loud.output and quiet.output == ""
    failed = runner.invoke(cli, ["install", "--only", "therock", "--gpu-arch", "gfx1201", "--offline",
                                 "--no-checks", "--prefix", str(tmp_path / "p"), "-q"])
    assert failed.exit_code == 1 and "error: therock: " in failed.output  # errors still show at -q


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "rdna4-install")
def test_every_help_ends_with_two_or_three_examples(runner, path):
    out = runner.invoke(cli, [*path, "--help"])
    assert out.exit_code == 0
    lines = out.output.rstrip("\n").splitlines()
    assert "Examples:" in [line.strip() for line in lines], out.output
    start = max(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    examples = [line for line in lines[start + 1:] if line.strip()]
    assert 2 <= len(examples) <= 3, examples
    for line in examples:
        # each example is one whole command line (click must not have wrapped it)
        assert line.startswith("  rdna4-install "), examples
        assert line.split()[1:len(path) + 1] == list(path), examples


def _in_pty(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; what the terminal showed.
    `cwd` is the test's own folder: a command that writes where it runs (report) must not
    write into the checkout."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "installer", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=dict(env, PYTHONPATH=str(REPO)), cwd=cwd, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_no_color_under_a_pseudo_terminal(path, tmp_path):
    # a GPU-less host with nothing installed: every command has something to say,
    # most of it an error or a failed check, which a terminal shows in colour
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm", PATH="/usr/bin:/bin")
    coloured = _in_pty(list(path), env, tmp_path)
    plain = _in_pty(list(path), dict(env, NO_COLOR="1"), tmp_path)
    assert plain.strip(), plain
    assert "\x1b[" not in plain, plain
    if "error: " in plain or "FAIL " in plain:
        assert "\x1b[" in coloured, coloured
    assert "Traceback" not in plain + coloured


def test_doctor_colours_its_statuses_on_a_terminal_only(runner, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    shown = _in_pty(["doctor"], dict(env, TERM="xterm", PATH="/usr/bin:/bin"), tmp_path)
    assert "\x1b[1;31mFAIL\x1b[0m" in shown and "\x1b[32mPASS\x1b[0m" in shown
    piped = subprocess.run([sys.executable, "-m", "installer", "doctor"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert "FAIL" in piped.stdout and "\x1b[" not in piped.stdout + piped.stderr


def _has_json(path: tuple[str, ...]) -> bool:
    return any(p.name == "as_json" for p in _command(path).params)


JSON_COMMANDS = [p for p in COMMANDS if _has_json(p)]


@pytest.mark.parametrize("path", JSON_COMMANDS, ids=" ".join)
def test_json_stays_json_on_error(path, tmp_path):
    # nothing installed and no GPU: most commands fail; stdout must parse all the same
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    for extra in ([], ["--no-such-option"]):
        out = subprocess.run([sys.executable, "-m", "installer", *path, "--json", *extra], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout)
        if out.returncode != 0:
            assert data.get("error"), out.stdout
        assert "Traceback" not in out.stderr


def test_json_commands_include_the_usual_ones():
    assert {("plan",), ("status",), ("verify",), ("doctor",), ("detect",)} <= set(JSON_COMMANDS)
