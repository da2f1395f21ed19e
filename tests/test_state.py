"""What a prefix remembers (installer/state.py), read and written directly: stamps, the
receipt, the downloads they vouch for, the prefix lock and the children record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer import state
from installer.errors import InstallerError

SHA = "ab" * 32


def stamp(**over):
    return {"status": state.DONE, "fingerprint": "f1", "version": "1.0", **over}


def test_write_json_atomic_writes_sorted_indented_json_and_leaves_no_temp(tmp_path):
    path = tmp_path / "deep" / "x.json"
    state.write_json_atomic(path, {"b": 1, "a": [1]})
    assert path.read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
    with pytest.raises(TypeError):
        state.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": [1], "b": 1}   # the old one is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


@pytest.mark.parametrize("content", [b"{", b"\xff\xfe", b"[" * 100000 + b"]" * 100000, None, "dir"])
def test_an_unreadable_state_file_reads_as_missing(tmp_path, content):
    path = tmp_path / "x.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert state.read_json(path) is None


@pytest.mark.parametrize("data", [
    stamp(), stamp(status=state.FAILED, error="boom"), stamp(status=state.INCOMPLETE),
    stamp(inputs={"recipe": "r", "archs": ["gfx1201"]})])
def test_a_stamp_we_wrote_is_read_back(tmp_path, data):
    state.write_stamp(tmp_path, "torch", data)
    assert state.read_stamp(tmp_path, "torch") == data
    assert state.all_stamps(tmp_path) == {"torch": data}


@pytest.mark.parametrize("data", [
    stamp(status="weird"), {"fingerprint": "f1"}, stamp(fingerprint=7), stamp(facts=[]),
    stamp(inputs=[]), stamp(inputs={"archs": "gfx1201"}), stamp(inputs={"pins": [1]}), [stamp()]])
def test_a_stamp_of_another_shape_is_ignored_whole(tmp_path, data):
    state.write_stamp(tmp_path, "torch", data)
    state.write_stamp(tmp_path, "vllm", stamp())
    assert state.read_stamp(tmp_path, "torch") is None
    assert state.all_stamps(tmp_path) == {"vllm": stamp()}


def test_no_state_dir_means_no_stamps(tmp_path):
    assert state.all_stamps(tmp_path) == {}
    assert state.read_stamp(tmp_path, "torch") is None


def test_recorded_downloads_come_from_stamps_over_the_receipt(tmp_path):
    state.write_stamp(tmp_path, "therock", stamp(facts={"tarball": {"url": "https://a/t.tgz", "sha256": SHA.upper()}}))
    state.write_stamp(tmp_path, "torch", stamp(facts={"wheels": [{"url": "https://a/w.whl", "sha256": SHA},
                                                                 {"url": "https://a/short", "sha256": "ab"},
                                                                 {"url": 7, "sha256": SHA}]}))
    other = "cd" * 32
    state.write_receipt(tmp_path, archs=("gfx1201",), pins={}, tools={}, installer_version="0.1")
    receipt = json.loads((tmp_path / state.RECEIPT).read_text())
    receipt["components"]["old"] = {"facts": {"x": {"url": "https://a/old", "sha256": other}}}
    receipt["components"]["therock"]["facts"] = {"url": "https://a/t.tgz", "sha256": other}
    (tmp_path / state.RECEIPT).write_text(json.dumps(receipt))
    assert state.recorded_downloads(tmp_path) == {"https://a/t.tgz": SHA, "https://a/w.whl": SHA,
                                                  "https://a/old": other}


def test_the_receipt_keeps_what_this_run_does_not_say(tmp_path):
    first = state.write_receipt(tmp_path, archs=("gfx1201",), pins={"a": {"v": "1"}}, tools={"uv": "0.5"},
                                installer_version="0.1", lock={"l": 1}, target="rdna4")
    data = json.loads((tmp_path / state.RECEIPT).read_text())
    data["tuned"] = {"k": 1}
    (tmp_path / state.RECEIPT).write_text(json.dumps(data))
    state.write_stamp(tmp_path, "torch", stamp(facts={"x": 1}, inputs={"recipe": "r"}, error="e"))
    again = state.write_receipt(tmp_path, archs=("gfx1200",), pins={}, tools={}, installer_version="0.2",
                                visible_devices="0")
    assert again["created"] == first["created"] and again["tools"] == {"uv": "0.5"}
    assert again["lock"] == {"l": 1} and again["target"] == "rdna4" and again["tuned"] == {"k": 1}
    assert again["archs"] == ["gfx1200"] and again["visible_devices"] == "0" and again["prefix"] == str(tmp_path)
    assert again["components"] == {"torch": {"status": "done", "version": "1.0", "fingerprint": "f1",
                                             "facts": {"x": 1}, "source": None, "patches": None, "env": None,
                                             "started": None, "finished": None}}
    assert state.read_receipt(tmp_path) == again
    fresh = state.write_receipt(tmp_path / "p2", archs=(), pins={}, tools={}, installer_version="0.2")
    assert fresh["lock"] is None and fresh["target"] == "" and "tuned" not in fresh


@pytest.mark.parametrize("over", [{"archs": [1]}, {"pins": {"a": 1}}, {"components": {"a": []}},
                                  {"tools": []}])
def test_a_receipt_of_another_shape_reads_as_missing(tmp_path, over):
    state.write_receipt(tmp_path, archs=("gfx1201",), pins={}, tools={}, installer_version="0.1")
    data = {**json.loads((tmp_path / state.RECEIPT).read_text()), **over}
    (tmp_path / state.RECEIPT).write_text(json.dumps(data))
    assert state.read_receipt(tmp_path) is None


def test_started_groups_reads_the_children_record(tmp_path):
    record = tmp_path / "children"
    assert state.started_groups(record) == {}
    record.write_bytes(b"123 4567\n\nx 1\n456  89 \n789\n\xff\n")
    assert state.started_groups(record) == {123: "4567", 456: "89", 789: ""}


def test_pid_alive():
    assert state.pid_alive(os.getpid())
    dead = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout)
    assert not state.pid_alive(dead)


def test_the_prefix_lock_names_its_holder_and_is_free_once_released(tmp_path):
    prefix = tmp_path / "p"
    with state.PrefixLock(prefix) as lock:
        assert (prefix / ".rdna4" / "lock").read_text() == f"{os.getpid()}\n"
        assert (prefix / ".rdna4" / "children").read_text() == ""
        with pytest.raises(InstallerError) as err:
            state.PrefixLock(prefix).acquire()
        assert err.value.message == f"prefix {prefix} is in use by another rdna4-install (PID {os.getpid()})"
        assert err.value.hint == "wait for it to finish, or stop that process"
        assert lock._fd is not None
    assert lock._fd is None and lock._children_fd is None
    state.PrefixLock(prefix).acquire().release()


def test_lock_holders_are_the_other_processes_with_the_file_open(tmp_path):
    path = tmp_path / "lockfile"
    path.write_text("")
    assert state.lock_holders(tmp_path / "missing") == []
    with open(path):
        assert state.lock_holders(path) == []      # this process does not count
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                                   "print('open', flush=True); time.sleep(60)", str(path)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "open\n"
            assert state.lock_holders(path) == [holder.pid]
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()


def test_now_is_utc_iso_8601():
    import re

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state.now())


def test_a_writes_temp_is_beside_the_file_where_the_sweep_finds_it(tmp_path, monkeypatch):
    import fnmatch

    temps = []
    real_replace = os.replace
    monkeypatch.setattr(state.os, "replace", lambda src, dst: (temps.append(src), real_replace(src, dst)))
    state.write_stamp(tmp_path, "torch", stamp())
    temp = Path(temps[0])
    assert temp.parent == state.state_dir(tmp_path)
    rel = str(temp.relative_to(tmp_path))
    assert any(fnmatch.fnmatch(rel, pattern) for pattern in state.PREFIX_TEMPS), rel


def test_the_receipt_keeps_its_creation_time_and_names_the_installer(tmp_path):
    (tmp_path / state.RECEIPT).write_text(json.dumps({"created": "2020-01-01T00:00:00Z", "archs": ["gfx1201"]}))
    got = state.write_receipt(tmp_path, archs=("gfx1201",), pins={}, tools={}, installer_version="0.3")
    assert got["created"] == "2020-01-01T00:00:00Z" and got["installer_version"] == "0.3"
    assert got["updated"] != got["created"] and got["visible_devices"] == ""


def test_a_receipt_without_the_optional_fields_is_read(tmp_path):
    (tmp_path / state.RECEIPT).write_text(json.dumps({"prefix": str(tmp_path)}))
    assert state.read_receipt(tmp_path) == {"prefix": str(tmp_path)}
    assert state.recorded_downloads(tmp_path) == {}


def test_recorded_downloads_without_a_receipt_come_from_the_stamps(tmp_path):
    state.write_stamp(tmp_path, "torch", stamp(facts={"url": "https://a/w.whl", "sha256": SHA}))
    assert state.recorded_downloads(tmp_path) == {"https://a/w.whl": SHA}


def test_a_holder_that_wrote_no_pid_is_named_unknown(tmp_path):
    import fcntl

    lock = tmp_path / ".rdna4" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InstallerError, match=r"in use by another rdna4-install \(PID unknown\)$"):
            state.PrefixLock(tmp_path).acquire()


def test_the_lock_file_holds_only_the_new_pid(tmp_path):
    lock = tmp_path / ".rdna4" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("123456789012\n")           # a longer PID of an earlier run
    with state.PrefixLock(tmp_path):
        assert lock.read_text() == f"{os.getpid()}\n"


def test_asking_whether_a_process_lives_does_not_signal_it(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert state.pid_alive(child.pid)
        time.sleep(0.1)
        assert child.poll() is None           # still running
    finally:
        child.kill()
        child.wait()


def test_stamps_live_in_the_prefixs_state_dir(tmp_path):
    state.write_stamp(tmp_path, "torch", stamp())
    assert json.loads((tmp_path / ".rdna4" / "state" / "torch.json").read_text()) == stamp()
