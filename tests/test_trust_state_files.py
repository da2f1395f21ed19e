"""Every state file is parsed defensively (issue 12): stamps, the receipt, the lock and
pins files. Wrong JSON types, wrong field types, truncations, directories, FIFOs,
non-UTF-8 and oversized files give "treated as missing" or one line naming the
file and the fix, never a traceback; a plain rerun (after the printed hint) ends
in a complete prefix.

The fuzz part writes random damage (fixed seed) into a finished prefix of the
small real recipe tree (tests/engine_fixtures.py) and runs the real CLI.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine_fixtures import order, run_installer, six_recipes
from installer import state
from installer.cli import cli

RECIPES = ["therock", "torch", "triton-kernels", "flash-attention", "vllm", "activate"]


def cli_run(recipes: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess:
    """The installer as a user runs it: a separate process, so a traceback shows."""
    gpu = ["--gpu-arch", "gfx1201"] if args[0] != "status" else []
    return run_installer(recipes, *args, *gpu, "--prefix", str(prefix))


def invoke(recipes: Path, prefix: Path, *args: str):
    """The same CLI in-process (fast enough for hundreds of fuzz cases)."""
    argv = [*args, "--recipes-dir", str(recipes), "--prefix", str(prefix)]
    if args[0] != "status":
        argv += ["--gpu-arch", "gfx1201"]
    result = CliRunner().invoke(cli, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{' '.join(args)} raised {result.exception!r}: {result.output}") \
            from result.exception
    assert "Traceback" not in result.output
    return result


def no_traceback_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return next((ln[len("hint: "):] for ln in result.stderr.splitlines() if ln.startswith("hint: ")), "")


@pytest.fixture
def done(tmp_path):
    recipes = six_recipes(tmp_path / "src")
    prefix = tmp_path / "prefix"
    result = invoke(recipes, prefix, "install", "--no-checks")
    assert result.exit_code == 0, result.output
    (prefix / "order.log").unlink()
    return recipes, prefix


def stamp_path(prefix: Path, name: str = "torch") -> Path:
    return state.state_dir(prefix) / f"{name}.json"


# --- the listed cases, through a real process -------------------------------------------

@pytest.mark.parametrize("content", [b"[1, 2, 3]", b"7", b'"done"', b"null",
                                     b'{"status": "done", "fingerprint": 7}',
                                     b'{"status": "done", "inputs": []}',
                                     b'{"status": "done", "inputs": {"pins": [1]}}',
                                     b'{"status": ["done"]}', b'{"status": "weird"}', b"{\"status\": \"do",
                                     b"\xff\xfe\x00{",
                                     b"[" * 100000])
def test_damaged_stamp_is_treated_as_missing(done, content):
    recipes, prefix = done
    stamp_path(prefix).write_bytes(content)
    for args in (["plan"], ["status"], ["install", "--dry-run"]):
        result = cli_run(recipes, prefix, *args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    rows = json.loads(cli_run(recipes, prefix, "status", "--json").stdout)["recipes"]
    assert {r["recipe"]: r["status"] for r in rows}["torch"] == "pending", "a claim we cannot read is none"
    plan = cli_run(recipes, prefix, "plan").stdout
    assert any("will run" in ln and " torch " in ln and "not installed" in ln for ln in plan.splitlines()), plan
    result = cli_run(recipes, prefix, "install", "--no-checks")
    assert result.returncode == 0, result.stderr
    # torch is redone; its dependents' fingerprints did not move, so they stay
    assert order(prefix) == ["torch"]
    assert state.read_stamp(prefix, "torch")["status"] == "done"


@pytest.mark.parametrize("content", [b"[1,2,3]", b"7", b'{"archs": "gfx1201"}', b'{"pins": {"vllm": 3}}',
                                     b'{"components": []}', b"\xff", b"{"])
def test_damaged_receipt_is_treated_as_missing(done, content):
    recipes, prefix = done
    (prefix / state.RECEIPT).write_bytes(content)
    for args in (["plan"], ["status"], ["install", "--dry-run"]):
        result = cli_run(recipes, prefix, *args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    result = cli_run(recipes, prefix, "install", "--no-checks")
    assert result.returncode == 0, result.stderr
    assert set(json.loads((prefix / state.RECEIPT).read_text())["components"]) == set(RECIPES)


@pytest.mark.parametrize("where", ["stamp", "receipt", "lock", "children.lock", "state", ".rdna4"])
def test_a_directory_or_file_in_the_wrong_place_names_it_and_the_hint_heals(done, where):
    recipes, prefix = done
    path = {"stamp": stamp_path(prefix), "receipt": prefix / state.RECEIPT,
            "lock": state.meta_dir(prefix) / "lock", "children.lock": state.meta_dir(prefix) / "children.lock",
            "state": state.state_dir(prefix), ".rdna4": state.meta_dir(prefix)}[where]
    if path.is_dir():
        import shutil
        shutil.rmtree(path)
        path.write_text("not a folder\n")
    else:
        path.unlink(missing_ok=True)
        (path / "inside").mkdir(parents=True)
    for args in (["plan"], ["status"], ["install", "--dry-run"]):
        result = cli_run(recipes, prefix, *args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    refused = cli_run(recipes, prefix, "install", "--no-checks")
    hint = no_traceback_one_line(refused, 1, str(path))
    # the hint is a command (then "rerun"): run it, then the plain install
    command = hint.split("(", 1)[1].split(")", 1)[0]
    assert shlex.split(command)[:2] == ["rm", "-r"], hint
    subprocess.run(shlex.split(command), check=True)
    healed = cli_run(recipes, prefix, "install", "--no-checks")
    assert healed.returncode == 0, healed.stderr
    assert {r: s["status"] for r, s in state.all_stamps(prefix).items()} == {r: "done" for r in RECIPES}


def test_a_fifo_and_an_oversized_stamp_do_not_hang_or_eat_memory(done):
    recipes, prefix = done
    stamp_path(prefix, "torch").unlink()
    os.mkfifo(stamp_path(prefix, "torch"))
    with open(stamp_path(prefix, "vllm"), "wb") as fh:
        fh.truncate(64 << 30)   # sparse: 64 GiB of zeros, read no further than the cap
    result = cli_run(recipes, prefix, "plan")
    assert result.returncode == 0, result.stderr
    runs = {ln.split()[2] for ln in result.stdout.splitlines() if "will run" in ln}
    assert runs == {"torch", "vllm"}, result.stdout


@pytest.mark.parametrize("content, words", [
    (None, ["is larger than"]),                     # /dev/zero
    (b"[vllm]\nversion = \"\xff\"\n", ["not UTF-8"]),
    (b"\x00" * 10, ["not valid TOML"]),
    ("dir", ["is a directory"]),
])
def test_bad_pins_files_are_one_line(tmp_path, content, words):
    recipes = six_recipes(tmp_path / "src")
    if content is None:
        pins = Path("/dev/zero")
    elif content == "dir":
        pins = tmp_path / "pins-dir"
        pins.mkdir()
    else:
        pins = tmp_path / "pins.toml"
        pins.write_bytes(content)
    prefix = tmp_path / "prefix"
    for args in (["plan"], ["install", "--dry-run"], ["install"]):
        result = run_installer(recipes, *args, "--prefix", str(prefix), "--gpu-arch", "gfx1201",
                               env={"RDNA4_PINS": str(pins)})
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert len([ln for ln in result.stderr.splitlines() if ln.lower().startswith("error")]) == 1
        for word in words:
            assert word in result.stderr and str(pins) in result.stderr, result.stderr
    assert not prefix.exists()


# --- fuzz --------------------------------------------------------------------------------

def _value(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str", "list", "dict"] if depth < 3 else ["int", "str"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 7, 2 ** 70])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-9])
    if kind == "str":
        return rng.choice(["", "done", "failed", "incomplete", "x" * 40, "ä\u2603", "../../etc", "gfx1201"])
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = list(state.STAMP_FIELDS) + list(state.RECEIPT_FIELDS) + ["pins", "dists", "files", "x"]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _damage(rng: random.Random, valid: bytes) -> bytes:
    how = rng.choice(["value", "field", "truncate", "bytes"])
    data = json.loads(valid) if how == "field" else None
    if how == "value" or (how == "field" and not isinstance(data, dict)):   # the lock holds a PID
        return json.dumps(_value(rng)).encode()
    if how == "field":
        data[rng.choice(sorted(data))] = _value(rng)
        if isinstance(data.get("inputs"), dict) and rng.random() < 0.5:
            data["inputs"][rng.choice(sorted(data["inputs"]) or ["pins"])] = _value(rng)
        return json.dumps(data).encode()
    if how == "truncate":
        return valid[: rng.randint(0, len(valid) - 1)]
    return bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 40)))


def test_fuzz_state_files_never_give_a_traceback(done):
    recipes, prefix = done
    rng = random.Random(1212)
    targets = [stamp_path(prefix, n) for n in RECIPES] + [prefix / state.RECEIPT,
                                                         state.meta_dir(prefix) / "lock"]
    originals = {p: p.read_bytes() for p in targets}
    for case in range(120):
        victims = rng.sample(targets, rng.randint(1, 3))
        for path in victims:
            valid = originals[path] or b"{}"
            path.write_bytes(_damage(rng, valid))
        for args in (["plan"], ["status"], ["install", "--dry-run"]):
            result = invoke(recipes, prefix, *args)
            assert result.exit_code in (0, 2), (case, args, result.output)
        if case % 10 == 0:
            # the real install too: it redoes what it cannot trust and ends complete
            result = invoke(recipes, prefix, "install", "--no-checks")
            assert result.exit_code == 0, (case, result.output)
            assert {r: s["status"] for r, s in state.all_stamps(prefix).items()} == {r: "done" for r in RECIPES}
            originals = {p: p.read_bytes() for p in targets}
        else:
            for path in victims:
                path.write_bytes(originals[path])
