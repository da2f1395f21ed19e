"""`pins check`, `lock`, `install --lock`, `lock --from-receipt` and the install preflight,
against loopback stand-ins for TheRock, AMD's wheel index, PyPI and git."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import hintcheck
from pins_fixtures import write_exact_pins

from index_fixtures import request_log
from installer.cli import cli
from upstream_fixtures import upstreams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def ups(tmp_path_factory):
    with upstreams(tmp_path_factory.mktemp("upstreams")) as u:
        yield u


def run(runner, ups, tmp_path, *args, pins: dict | None = None):
    pins_file = ups.write_pins(tmp_path / "pins.toml", **(pins or {}))
    base = ["--pins", str(pins_file), "--cache-dir", str(tmp_path / "cache"), "--gpu-arch", "gfx1201",
            "--prefix", str(tmp_path / "prefix")]
    cmd = list(args)
    # selection options go after the (sub)command name
    at = 2 if cmd[0] == "pins" else 1
    result = runner.invoke(cli, cmd[:at] + base + cmd[at:])
    assert "Traceback" not in result.output, result.output
    return result


def test_check_all_present(runner, ups, tmp_path):
    result = run(runner, ups, tmp_path, "pins", "check", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    names = {(a["recipe"], a["name"]) for a in data["artifacts"]}
    assert ("therock", "therock-dist-linux-gfx120X-all-10.1.0.tar.gz") in names
    assert ("vllm", "vllm-0.33.0.tar.gz") in names
    assert {("torch", p) for p in ("rocm", "torch", "torchvision", "torchaudio", "triton")} <= names
    assert ("flash-attention", "flash-attention") in names and ("triton-kernels", "triton") in names
    for art in data["artifacts"]:
        assert set(art) >= {"recipe", "name", "want", "status", "url", "nearest"}
        assert art["status"] == "ok"
    triton = next(a for a in data["artifacts"] if (a["recipe"], a["name"]) == ("torch", "triton"))
    assert triton["want"] == "3.8.0+git669b31ac.rocm10.1.0"    # from torch 2.13.0's metadata
    text = run(runner, ups, tmp_path, "pins", "check")
    assert text.exit_code == 0 and "9 of 9 artifacts present" in text.output


@pytest.mark.parametrize("pins, recipe, name, nearest", [
    ({"torch": {"torch": "2.12.0"}}, "torch", "torch", ["2.14.0+rocm10.1.0", "2.13.0+rocm10.1.0"]),
    ({"torch": {"torchvision": "0.27.0"}}, "torch", "torchvision",
     ["0.29.0+rocm10.1.0", "0.28.0+rocm10.1.0"]),
    ({"vllm": {"version": "0.33.5"}}, "vllm", "vllm-0.33.5.tar.gz", ["0.35.0", "0.34.0", "0.33.0"]),
    ({"flash-attention": {"commit": "0" * 40}}, "flash-attention", "flash-attention", []),
])
def test_check_finds_each_kind_of_missing_artifact(runner, ups, tmp_path, pins, recipe, name, nearest):
    result = run(runner, ups, tmp_path, "pins", "check", "--json", pins=pins)
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["ok"] is False
    bad = [a for a in data["artifacts"] if a["status"] != "ok"]
    assert [(a["recipe"], a["name"], a["status"]) for a in bad] == [(recipe, name, "missing")]
    assert bad[0]["nearest"] == nearest
    # the rest was still checked
    assert len(data["artifacts"]) >= 9
    text = run(runner, ups, tmp_path, "pins", "check", pins=pins)
    assert f"missing     {recipe}" in text.output and "rdna4-install pins update" in text.output


def test_check_a_missing_tarball_and_the_wheels_of_its_rocm(runner, ups, tmp_path):
    exact = {"torchvision": "0.28.0", "torchaudio": "2.11.0.3", "triton": "3.8.0+git669b31ac.rocm10.1.5"}
    result = run(runner, ups, tmp_path, "pins", "check", "--json",
                 pins={"therock": {"version": "10.1.5"}, "torch": exact})
    assert result.exit_code == 1
    bad = {(a["recipe"], a["name"]): a for a in json.loads(result.output)["artifacts"] if a["status"] != "ok"}
    tarball = bad.pop(("therock", "therock-dist-linux-gfx120X-all-10.1.5.tar.gz"))
    assert tarball["status"] == "missing" and tarball["nearest"] == ["10.2.0", "10.1.0", "10.0.0"]
    assert set(bad) == {("torch", p) for p in ("rocm", "torch", "torchvision", "torchaudio", "triton")}
    assert bad[("torch", "torch")]["nearest"] == ["2.15.0+rocm10.2.0", "2.14.0+rocm10.1.0", "2.13.0+rocm10.1.0"]
    # with derived companions the torch resolver says which ROCm versions have torch
    derived = run(runner, ups, tmp_path, "pins", "check", pins={"therock": {"version": "10.1.5"}})
    assert "no torch wheel for ROCm 10.1.5" in derived.output
    assert "ROCm versions with one: 10.2.0, 10.1.0" in derived.output


def test_check_names_the_rocm_torch_builds_in_words(runner, ups, tmp_path):
    result = run(runner, ups, tmp_path, "pins", "check", pins={"torch": {"torch": "2.12.0"}})
    assert "torch 2.12.0+rocm10.1.0 is not on" in result.output
    assert "for rocm10.1.0 it has 2.14.0+rocm10.1.0, 2.13.0+rocm10.1.0" in result.output


def test_unreachable_and_bad_usage(runner, ups, tmp_path):
    down = run(runner, ups, tmp_path, "pins", "check", "--json",
               pins={"therock": {"index_url": "http://127.0.0.1:9/therock/"}})
    assert down.exit_code == 1
    statuses = {a["name"]: a["status"] for a in json.loads(down.output)["artifacts"]}
    assert statuses["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"] == "unreachable"
    no_index = run(runner, ups, tmp_path, "pins", "check", "--json",
                   pins={"torch": {"index_url": "http://127.0.0.1:9/simple/"}})
    assert no_index.exit_code == 1
    [only] = json.loads(no_index.output)["artifacts"]
    assert only["status"] == "unreachable"
    assert "torch.torchvision, torch.torchaudio, torch.triton are derived from" in only["detail"]
    bad = run(runner, ups, tmp_path, "pins", "check", "--set", "vllm.colour=red")
    assert bad.exit_code == 2 and "unknown pin 'vllm.colour'" in bad.output


def test_lock_holds_exact_values_and_their_sources(runner, ups, tmp_path):
    out = tmp_path / "stack.lock"
    result = run(runner, ups, tmp_path, "lock", "-o", str(out),
                 pins={"vllm": {"version": "latest"}, "torch": {"torch": "auto"}})
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "latest" not in text and '"auto"' not in text
    lock = tomllib.loads(text)
    assert lock["pins"]["vllm"]["version"] == "0.35.0"
    assert lock["pins"]["torch"]["torch"] == "2.14.0+rocm10.1.0"
    assert lock["pins"]["torch"]["triton"] == "3.9.0+gitabcdef12.rocm10.1.0"
    sdist = next(a for a in lock["artifacts"] if a["recipe"] == "vllm")
    assert sdist["url"].endswith("/vllm-0.35.0.tar.gz") and len(sdist["sha256"]) == 64
    assert sdist["from"]["sha256"] == "derived vllm.sdist_sha256 (vllm resolver)"
    tarball = next(a for a in lock["artifacts"] if a["recipe"] == "therock")
    assert tarball["from"]["version"] == "pin therock.version"
    assert tarball["from"]["sha256"].startswith("not published")
    fa = next(a for a in lock["artifacts"] if a["recipe"] == "flash-attention")
    assert fa["commit"] == ups.fa_commit and fa["from"]["commit"] == "pin flash-attention.commit"


def test_lock_install_elsewhere_and_back_from_the_receipt(runner, ups, tmp_path):
    lock_file = tmp_path / "stack.lock"
    made = run(runner, ups, tmp_path, "lock", "-o", str(lock_file))
    assert made.exit_code == 0
    receipts = []
    for name in ("a", "b"):
        prefix = tmp_path / name
        # what `lock` says to run next: install it with: rdna4-install install --lock FILE
        result = runner.invoke(cli, [*hintcheck.hint_argv(made.output), "--prefix", str(prefix),
                                     "--cache-dir", str(tmp_path / f"cache-{name}"), "--no-checks",
                                     "--only", "therock"])
        assert result.exit_code == 0, result.output
        receipts.append(json.loads((prefix / "rdna4-manifest.json").read_text()))
    a, b = receipts
    assert a["pins"] == b["pins"] and a["archs"] == b["archs"] == ["gfx1201"]
    assert a["components"]["therock"]["fingerprint"] == b["components"]["therock"]["fingerprint"]
    assert a["lock"]["pins"] == b["lock"]["pins"] == tomllib.loads(lock_file.read_text())["pins"]
    # and back: the receipt's lock, with the tarball hash recorded at install
    back = tmp_path / "back.lock"
    result = runner.invoke(cli, ["lock", "--from-receipt", str(tmp_path / "a"), "-o", str(back)])
    assert result.exit_code == 0, result.output
    original, again = tomllib.loads(lock_file.read_text()), tomllib.loads(back.read_text())
    sha = a["components"]["therock"]["facts"]["sha256"]
    assert again["pins"]["therock"]["sha256"] == sha
    again["pins"]["therock"]["sha256"] = ""
    assert again["pins"] == original["pins"] and again["archs"] == original["archs"]
    assert again["target"] == original["target"] == a["target"] == "rdna4"
    tarball = next(x for x in again["artifacts"] if x["recipe"] == "therock")
    assert tarball["sha256"] == sha


def test_install_lock_refuses_changes(runner, ups, tmp_path):
    lock_file = tmp_path / "stack.lock"
    assert run(runner, ups, tmp_path, "lock", "-o", str(lock_file)).exit_code == 0
    result = runner.invoke(cli, ["install", "--lock", str(lock_file), "--prefix", str(tmp_path / "p"),
                                 "--set", "vllm.version=0.34.0"])
    assert result.exit_code == 2 and "--lock installs exactly the lock's pins" in result.output
    # the hint is a lock with that change, and it holds it
    relock = run(runner, ups, tmp_path, *hintcheck.hint_argv(result.output, fill={"FILE": str(tmp_path / "new.lock")}))
    assert relock.exit_code == 0, relock.output
    assert tomllib.loads((tmp_path / "new.lock").read_text())["pins"]["vllm"]["version"] == "0.34.0"
    bad = tmp_path / "bad.lock"
    bad.write_text(lock_file.read_text().replace('"0.33.0"', '"latest"', 1))
    result = runner.invoke(cli, ["install", "--lock", str(bad), "--prefix", str(tmp_path / "p")])
    assert result.exit_code == 2 and "a lock holds exact values" in result.output
    # the hint regenerates it, and the install takes the new one
    regen = run(runner, ups, tmp_path, *hintcheck.hint_argv(result.output, fill={"FILE": str(bad)}))
    assert regen.exit_code == 0, regen.output
    assert tomllib.loads(bad.read_text())["pins"]["vllm"]["version"] == "0.33.0"
    taken = runner.invoke(cli, ["install", "--lock", str(bad), "--prefix", str(tmp_path / "p"), "--dry-run"])
    assert taken.exit_code == 0, taken.output
    shutil.rmtree(tmp_path / "p", ignore_errors=True)
    # the lock's target profile is the install's: another --target is refused, before anything
    result = runner.invoke(cli, ["install", "--lock", str(lock_file), "--prefix", str(tmp_path / "p"),
                                 "--target", "strix-halo"])
    assert result.exit_code == 2 and "--target strix-halo differs from the lock's target rdna4" in result.output
    assert not (tmp_path / "p").exists()
    halo = tmp_path / "halo.lock"
    made = runner.invoke(cli, [*hintcheck.hint_argv(result.output, fill={"FILE": str(halo)}),
                               "--pins", str(write_exact_pins(tmp_path))])
    assert made.exit_code == 0, made.output
    assert tomllib.loads(halo.read_text())["target"] == "strix-halo"
    assert tomllib.loads(halo.read_text())["archs"] == ["gfx1151"]


def test_preflight_fails_before_any_download(runner, ups, tmp_path):
    pins = {"torch": {"torchvision": "0.27.0"}}
    before = len(ups.http.log)
    index_before = len(request_log(ups.index_url))
    result = run(runner, ups, tmp_path, "install", "--no-checks", pins=pins)
    assert result.exit_code == 1, result.output
    assert "torch: torchvision 0.27.0+rocm10.1.0 is missing" in result.output
    assert "0.29.0+rocm10.1.0, 0.28.0+rocm10.1.0" in result.output
    assert "nothing was downloaded or built" in result.output
    assert "rdna4-install pins update" in result.output
    tarball_gets = [r for r in ups.http.log[before:] if r["method"] == "GET" and r["path"].endswith(".tar.gz")]
    assert tarball_gets == []                                          # only HEADs
    # the resolver read torch's metadata with Range requests; no wheel was downloaded whole
    assert not any(r.endswith(".whl") for r in request_log(ups.index_url)[index_before:])
    assert not (tmp_path / "cache" / "downloads").exists() or \
        not any((tmp_path / "cache" / "downloads").rglob("*.tar.gz"))
    assert not (tmp_path / "prefix" / "rocm").exists()
    # the hint's two commands work in this state: update proposes a stack that exists,
    # check lists the missing artifact (and fails, as the install did)
    shown = [hintcheck.hint_argv(result.output, which=n) for n in (0, 1)]
    update = run(runner, ups, tmp_path, *next(a for a in shown if a[1] == "update"), pins=pins)
    assert update.exit_code == 0 and "newest coherent stack" in update.output, update.output
    assert "torch.torchvision = 0.30.0+rocm10.2.0" in update.output
    check = run(runner, ups, tmp_path, *next(a for a in shown if a[1] == "check"), pins=pins)
    assert check.exit_code == 1 and "torchvision 0.27.0+rocm10.1.0" in check.output, check.output


def test_offline_preflight_checks_the_cache(runner, ups, tmp_path):
    # online once for the resolvers' pages, then offline with nothing downloaded
    assert run(runner, ups, tmp_path, "lock", "-o", str(tmp_path / "l")).exit_code == 0
    result = run(runner, ups, tmp_path, "install", "--no-checks", "--offline", "--only", "therock")
    assert result.exit_code == 1, result.output
    assert "not in the download cache (--offline)" in result.output
    assert "run once without --offline" in result.output


PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
Subject: [PATCH] {subject}

---
diff --git a/vllm/platforms/rocm.py b/vllm/platforms/rocm.py
--- a/vllm/platforms/rocm.py
+++ b/vllm/platforms/rocm.py
@@ -{line},2 +{line},2 @@ def {func}():
-    return {old}
+    return {new}
 
"""


GFX12 = ("0001-gfx12.patch", "gfx12", 2, "on_gfx12", "False", "True")
WAVE32 = ("0002-wave32.patch", "wave32", 6, "wave32", "64", "32")     # in 0.34.0 already
GONE = ("0003-gone.patch", "gone", 6, "wave32", "48", "16")           # matches nothing


def recipes_with_patches(root: Path, rows=(GFX12, WAVE32, GONE), versions: str = "") -> Path:
    import shutil

    from conftest import REPO

    recipes = root / "tree" / "recipes"
    shutil.copytree(REPO / "recipes", recipes)
    folder = root / "tree" / "patches" / "vllm"
    folder.mkdir(parents=True)
    for name, subject, line, func, old, new in rows:
        text = PATCH.format(subject=subject, line=line, func=func, old=old, new=new)
        if versions and name.startswith("0003"):
            text = text.replace("\n---\n", f"\nVersions: {versions}\n---\n", 1)
        (folder / name).write_text(text)
    return recipes


def test_update_proposes_the_newest_coherent_stack(runner, ups, tmp_path):
    recipes = recipes_with_patches(tmp_path)
    pins_file = ups.write_pins(tmp_path / "pins.toml")
    before = pins_file.read_text()
    result = run(runner, ups, tmp_path, "pins", "update", "--recipes-dir", str(recipes))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "therock.version  10.1.0 -> 10.2.0" in out and "skipped 10.3.0: no torch wheels" in out
    assert "torch.torch      2.13.0 -> 2.15.0" in out
    assert "vllm.version     0.33.0 -> 0.34.0" in out and "skipped 0.35.0: torch 2.16" in out
    assert "torch.triton = 3.10.0+git12345678.rocm10.2.0" in out
    assert "0001-gfx12.patch: applies" in out
    assert "0002-wave32.patch: already upstream; drop it" in out
    assert "0003-gone.patch: conflicts at vllm/platforms/rocm.py @@ -6,2 +6,2 @@" in out
    assert pins_file.read_text() == before                     # nothing written without --write
    # --write updates the file in place; the proposed stack then checks clean
    result = run(runner, ups, tmp_path, "pins", "update", "--recipes-dir", str(recipes),
                 "--write", str(pins_file))
    assert result.exit_code == 0, result.output
    runner_args = ["pins", "check", "--pins", str(pins_file), "--cache-dir", str(tmp_path / "cache"),
                   "--gpu-arch", "gfx1201", "--json"]
    check = runner.invoke(cli, runner_args)
    assert check.exit_code == 0, check.output
    assert {a["want"] for a in json.loads(check.output)["artifacts"]} >= {"10.2.0", "0.34.0",
                                                                          "2.15.0+rocm10.2.0"}


def test_a_patch_for_other_releases_is_left_out_at_plan_time(runner, ups, tmp_path):
    recipes = recipes_with_patches(tmp_path, versions="<0.33")
    result = run(runner, ups, tmp_path, "plan", "--recipes-dir", str(recipes))
    assert result.exit_code == 0, result.output
    assert "note: patch 0003-gone.patch skipped: it is for <0.33, not 0.33.0" in result.output
    on_old = run(runner, ups, tmp_path, "plan", "--json", "--recipes-dir", str(recipes),
                 "--set", "vllm.version=0.32.0")
    vllm = next(s for s in json.loads(on_old.output)["steps"] if s["recipe"] == "vllm")
    assert sorted(vllm["patches"]) == ["0001-gfx12.patch", "0002-wave32.patch", "0003-gone.patch"]
    assert vllm["notes"] == []


def test_a_conflicting_patch_stops_the_install_before_any_build(runner, ups, tmp_path):
    recipes = recipes_with_patches(tmp_path)
    before = len(ups.http.log)
    result = run(runner, ups, tmp_path, "install", "--no-checks", "--recipes-dir", str(recipes))
    assert result.exit_code == 1, result.output
    assert "vllm: patch 0003-gone.patch conflicts with vllm 0.33.0: first failing hunk " \
           "vllm/platforms/rocm.py @@ -6,2 +6,2 @@" in result.output
    assert "nothing was built" in result.output
    assert not [r for r in ups.http.log[before:] if r["method"] == "GET" and "therock-dist" in r["path"]]
    assert not (tmp_path / "prefix" / "rocm").exists()
    assert not list((tmp_path / "prefix").glob(".patchcheck*"))


def test_a_patch_already_in_the_release_is_noted(ups, tmp_path):
    from installer import patches
    from installer.cli import _settings
    from installer.plan import make_plan
    from installer.ui import UI

    seen: list[str] = []

    class Recorder(UI):
        def info(self, msg: str) -> None:
            seen.append(msg)

    recipes = recipes_with_patches(tmp_path, rows=(GFX12, WAVE32))
    opts = {"recipes_dir": recipes, "pins_file": ups.write_pins(tmp_path / "pins.toml"),
            "sets": ("vllm.version=0.34.0",), "gpu_arch": "gfx1201", "cache_dir": tmp_path / "cache",
            "prefix": tmp_path / "prefix"}
    plan = make_plan(_settings(opts, Recorder(), need_gpu=False))
    (tmp_path / "prefix").mkdir()
    patches.precheck([i for i in plan.items if i.name == "vllm"], prefix=tmp_path / "prefix",
                     cache_dir=tmp_path / "cache", offline=False, ui=Recorder())
    assert seen == ["vllm: patch 0002-wave32.patch is already in vllm 0.34.0; it is skipped "
                    "(drop it per its header)"]


def test_a_recipe_not_rerun_keeps_what_it_resolved_to(tmp_path):
    """`therock.version = latest` and a run of another recipe: the plan (and so the receipt
    and the lock) holds the installed version, not "latest", and reads no listing."""
    from installer import lock, recipes as rcp, state
    from installer.plan import Settings, make_plan

    prefix = tmp_path / "p"
    recorded = {"therock.version": "10.1.0", "therock.url": "https://example.invalid/t-10.1.0.tar.gz",
                "therock.channel": "stable", "therock.family": "gfx120X-all"}
    state.write_stamp(prefix, "therock", {"status": state.DONE, "fingerprint": "f",
                                          "inputs": {"pins": recorded}})
    folder = rcp.default_recipes_dir()
    pins = rcp.apply_overrides(rcp.load_pins(folder / rcp.PINS_FILE), sets=(
        "therock.version=latest", "torch.torchvision=0.28.0", "torch.torchaudio=2.11.0.3",
        "torch.triton=3.8.0+git669b31ac.rocm10.1.0",
        "vllm.sdist_url=https://example.invalid/vllm-0.33.0.tar.gz", "vllm.sdist_sha256=" + "a" * 64))
    plan = make_plan(Settings(prefix=prefix, cache_dir=tmp_path / "c", recipes_dir=folder,
                              archs=("gfx1201",), pins=pins, only=("triton-kernels",)))
    assert plan.pins["therock"]["version"] == "10.1.0"
    assert plan.pins["torch"]["rocm"] == "10.1.0"
    assert "latest" not in lock.dumps(lock.build(plan))


def test_a_lock_refuses_an_unresolved_pin():
    from types import SimpleNamespace

    from installer import lock
    from installer.errors import InstallerError

    plan = SimpleNamespace(pins={"therock": {"version": "latest"}}, items=[],
                           settings=SimpleNamespace(archs=("gfx1201",), pins={}, skip=()))
    with pytest.raises(InstallerError, match="not resolved: therock.version"):
        lock.build(plan)
