"""Target profiles (recipes/targets/*.toml): loading, detection's proposal, --target and
--gpu-arch, what a profile changes in the plan, and one target per prefix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hintcheck

from detect_fixtures import (RX9070XT_UUID, S3_KFD, fake_rocminfo, fake_sysfs, fixture,
                             strix_halo_host)
from installer import detect, state, targetprofile
from installer.cli import cli
from installer.errors import RecipeError, UsageError
from installer.recipes import load_pins

REPO = Path(__file__).resolve().parent.parent


def invoke(runner, *args):
    result = runner.invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def profiles():
    return targetprofile.load_all()


# ---------------------------------------------------------------- the shipped files

def test_the_shipped_profiles(profiles):
    assert list(profiles) == ["rdna4", "strix-halo"]     # discrete first: detection's preference
    rdna4, strix = profiles["rdna4"], profiles["strix-halo"]
    assert (rdna4.archs, rdna4.integrated, rdna4.fp8, rdna4.unified_memory) == (
        ("gfx1200", "gfx1201"), False, "native", False)
    assert (strix.archs, strix.integrated, strix.fp8, strix.unified_memory) == (
        ("gfx1151",), True, "weight-only", True)
    assert rdna4.pins["therock"]["family"] == "gfx120X-all"
    assert strix.pins["therock"]["family"] == "gfx1151"
    # a profile sets only pins recipes/pins.toml declares (others would be dropped)
    declared = load_pins(REPO / "recipes" / "pins.toml")
    for p in profiles.values():
        for table, values in p.pins.items():
            assert set(values) <= set(declared[table]), (p.name, table)
    # every patch a profile leaves out exists, so a rename cannot silently re-include it
    for p in profiles.values():
        for recipe, names in p.leave_out.items():
            for name in names:
                assert (REPO / "patches" / recipe / name).is_file(), (p.name, name)


def test_leave_out_filters_patches_and_says_so(profiles):
    files = sorted((REPO / "patches" / "vllm").glob("*.patch"))
    kept, notes = profiles["strix-halo"].patches_for("vllm", files)
    assert [p.name for p in kept] == ["0002-wave32-llmm1-k-limit.patch"]
    assert notes == ["patch 0001-rdna4-fp8-no-rowwise-scaled-mm.patch left out: not for target strix-halo"]
    assert profiles["rdna4"].patches_for("vllm", files) == (files, [])
    assert profiles["strix-halo"].patches_for("flash-attention", files) == (files, [])


RDNA3 = """\
[target]
name = "rdna3"
archs = ["gfx1100"]
integrated = false
[pins.therock]
family = "gfx110X-all"
[verify]
fp8 = "none"
"""


def _recipes_with(tmp_path: Path, name: str, text: str) -> Path:
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO / "recipes", recipes)
    (recipes / "targets" / f"{name}.toml").write_text(text)
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    return recipes


def test_a_new_target_is_a_new_file(tmp_path, runner, exact_pins):
    recipes = _recipes_with(tmp_path, "rdna3", RDNA3)
    profiles = targetprofile.load_all(recipes)
    assert list(profiles) == ["rdna3", "rdna4", "strix-halo"]
    # detection proposes it for a 7900 XTX (KFD GC 11.0.0) with no code change
    root = fake_sysfs(tmp_path / "root", kfd={0: S3_KFD[0], 1: {
        "cpu_cores_count": 0, "simd_count": 192, "gfx_target_version": 110000, "vendor_id": 4098,
        "device_id": 0x744C, "location_id": 0x0300, "domain": 0}})
    d = detect.detect(sysfs_root=root, rocminfo="/nonexistent", profiles=profiles)
    assert (d.profile, d.target) == ("rdna3", ("gfx1100",))
    # and plan takes its tarball group, with no --allow-unsupported-arch
    out = invoke(runner, "plan", "--prefix", str(tmp_path / "p"), "--recipes-dir", str(recipes),
                 "--gpu-arch", "gfx1100", "--json")
    assert out.exit_code == 0, out.output
    therock = next(s for s in json.loads(out.output)["steps"] if s["recipe"] == "therock")
    assert therock["pins"]["therock.url"].endswith("/therock-dist-linux-gfx110X-all-10.1.0.tar.gz")
    assert json.loads(out.output)["target"] == "rdna3"


@pytest.mark.parametrize("text, words", [
    (RDNA3.replace('name = "rdna3"', 'name = "other"'), "name must be 'rdna3'"),
    (RDNA3.replace('fp8 = "none"', 'fp8 = "fast"'), "fp8 must be one of"),
    (RDNA3.replace('archs = ["gfx1100"]', 'archs = ["gfx1201"]'), "gfx1201 is in targets rdna3 and rdna4"),
    (RDNA3.replace('archs = ["gfx1100"]', 'archs = []'), "archs must be a non-empty list"),
    (RDNA3 + "[serve]\nx = 1\n", "unknown table(s) serve"),
    (RDNA3 + "[patches.leave_out]\nvllm = \"0001.patch\"\n", "must be a list of patch file names"),
    (RDNA3 + "[pins.vllm]\nversion = [1]\n", "[pins.vllm] must hold"),
])
def test_a_broken_profile_is_one_line_naming_the_file(tmp_path, runner, text, words):
    recipes = _recipes_with(tmp_path, "rdna3", text)
    with pytest.raises(RecipeError, match=None) as err:
        targetprofile.load_all(recipes)
    assert words in err.value.message and "rdna3.toml" in err.value.message
    out = invoke(runner, "plan", "--prefix", str(tmp_path / "p"), "--recipes-dir", str(recipes),
                 "--gpu-arch", "gfx1201")
    assert out.exit_code == 2 and words in out.output.splitlines()[0]


# ---------------------------------------------------------------- detection and choice

def test_strix_halo_alone_is_proposed_and_chosen(tmp_path, profiles):
    d = detect.detect(sysfs_root=strix_halo_host(tmp_path / "root"), rocminfo="/nonexistent",
                      profiles=profiles)
    assert (d.profile, d.target, d.visible_devices) == ("strix-halo", ("gfx1151",), "")
    assert detect.choose_target(d, None, False, profiles=profiles) == ("gfx1151",)


def test_a_discrete_rdna4_card_wins_over_the_apu_unless_told(tmp_path, profiles):
    root = strix_halo_host(tmp_path / "root", dgpu=True)
    d = detect.detect(sysfs_root=root, rocminfo="/nonexistent", profiles=profiles)
    assert (d.profile, d.target, d.visible_devices) == ("rdna4", ("gfx1201",), RX9070XT_UUID)
    assert any("hidden at run time" in w and "gfx1151" in w for w in d.warnings)
    # --target strix-halo: the APU's GPU is the target and the card is hidden (by index:
    # the iGPU has no unique id; ROCr numbers GPU agents in KFD node order)
    assert detect.choose_target(d, None, False, target="strix-halo", profiles=profiles) == ("gfx1151",)
    assert (d.profile, d.target, d.visible_devices) == ("strix-halo", ("gfx1151",), "0")
    # --gpu-arch gfx1151 implies the same
    d = detect.detect(sysfs_root=root, rocminfo="/nonexistent", profiles=profiles)
    assert detect.choose_target(d, "gfx1151", False, profiles=profiles) == ("gfx1151",)
    assert (d.profile, d.visible_devices) == ("strix-halo", "0")
    assert not any("this host's target is" in w for w in d.warnings)


def test_an_apu_reporting_gfx1201_under_an_override_is_not_rdna4(tmp_path, no_gpu_env, monkeypatch, profiles):
    # ROCm/ROCm#5745's machine with HSA_OVERRIDE_GFX_VERSION=12.0.1: rocminfo alone says gfx1201,
    # its chip id says Strix Halo, so it is the strix-halo target and never an RDNA4 one
    text = fixture("F4").replace("  Name:                    gfx1151   ", "  Name:                    gfx1201   ")
    assert text != fixture("F4")
    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, text).parent))
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "12.0.1")
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "empty", kfd=None), profiles=profiles)
    [g] = d.gpus
    assert (g.arch, g.reported_arch, g.integrated) == ("gfx1151", "gfx1201", True)
    assert (d.profile, d.target) == ("strix-halo", ("gfx1151",))
    assert any("rocminfo reports gfx1201" in w and "HSA_OVERRIDE_GFX_VERSION=12.0.1" in w for w in d.warnings)


@pytest.fixture
def no_gpu_env(monkeypatch):
    for var in ("HSA_OVERRIDE_GFX_VERSION", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)


def test_target_without_its_gpu_builds_all_of_its_arches_and_says_so(tmp_path, profiles):
    d = detect.detect(sysfs_root=fake_sysfs(tmp_path / "r", kfd={0: S3_KFD[0], 1: {
        "cpu_cores_count": 0, "simd_count": 128, "gfx_target_version": 120001, "vendor_id": 4098,
        "device_id": 0x7550, "location_id": 0x0300, "domain": 0}}), rocminfo="/nonexistent",
        profiles=profiles)
    assert detect.choose_target(d, None, False, target="strix-halo", profiles=profiles) == ("gfx1151",)
    assert any("building for target strix-halo but this host's GPUs are rdna4" in w for w in d.warnings)
    none = detect.Detection([], (), "")
    assert detect.choose_target(none, None, False, target="rdna4", profiles=profiles) == ("gfx1200", "gfx1201")


@pytest.mark.parametrize("gpu_arch, target, words, hint", [
    ("gfx1151,gfx1201", None, "mixes target profiles (rdna4: gfx1201; strix-halo: gfx1151)",
     "install each into its own prefix"),
    ("gfx1201", "strix-halo", "--gpu-arch gfx1201 is target rdna4, not --target strix-halo",
     "--gpu-arch gfx1151"),
    (None, "strix", "unknown target 'strix'", "rdna4 (gfx1200, gfx1201), strix-halo (gfx1151)"),
])
def test_choices_that_cannot_be_one_target(profiles, gpu_arch, target, words, hint):
    with pytest.raises(UsageError) as err:
        detect.choose_target(detect.Detection([], (), ""), gpu_arch, False, target=target, profiles=profiles)
    assert words in err.value.message and hint in err.value.hint


# ---------------------------------------------------------------- plan

def test_a_strix_halo_plan(tmp_path, runner, exact_pins, monkeypatch):
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(strix_halo_host(tmp_path / "root")))
    out = invoke(runner, "plan", "--prefix", str(tmp_path / "p"), "--json")
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert (plan["target"], plan["archs"]) == ("strix-halo", ["gfx1151"])
    steps = {s["recipe"]: s for s in plan["steps"]}
    assert steps["therock"]["pins"]["therock.url"] == (
        "https://stable.repo.amd.com/rocm/core/tarball/therock-dist-linux-gfx1151-10.1.0.tar.gz")
    assert steps["therock"]["pins"]["therock.family"] == "gfx1151"
    assert list(steps["vllm"]["patches"]) == ["0002-wave32-llmm1-k-limit.patch"]
    text = invoke(runner, "plan", "--prefix", str(tmp_path / "p")).output
    assert "(target: strix-halo gfx1151)" in text
    assert "patch 0001-rdna4-fp8-no-rowwise-scaled-mm.patch left out: not for target strix-halo" in text
    # --set still beats the profile's pins
    out = invoke(runner, "plan", "--prefix", str(tmp_path / "p"), "--json", "--set", "therock.family=multiarch")
    url = next(s for s in json.loads(out.output)["steps"] if s["recipe"] == "therock")["pins"]["therock.url"]
    assert url.endswith("therock-dist-linux-multiarch-10.1.0.tar.gz")


def test_an_rdna4_plan_is_unchanged(tmp_path, runner, exact_pins):
    out = invoke(runner, "plan", "--prefix", str(tmp_path / "p"), "--gpu-arch", "gfx1201", "--json")
    steps = {s["recipe"]: s for s in json.loads(out.output)["steps"]}
    assert steps["therock"]["pins"]["therock.url"].endswith("/therock-dist-linux-gfx120X-all-10.1.0.tar.gz")
    assert list(steps["vllm"]["patches"]) == ["0001-rdna4-fp8-no-rowwise-scaled-mm.patch",
                                              "0002-wave32-llmm1-k-limit.patch"]


# ---------------------------------------------------------------- one target per prefix

def _receipt(prefix: Path, archs: tuple[str, ...], target: str = "") -> None:
    prefix.mkdir(parents=True, exist_ok=True)
    state.write_receipt(prefix, archs=archs, pins={}, tools={}, installer_version="0", target=target)


@pytest.mark.parametrize("recorded", ["strix-halo", ""])   # "" = an older receipt: from its archs
def test_a_prefix_of_another_target_is_refused_with_a_hint_that_works(tmp_path, runner, exact_pins, recorded):
    prefix = tmp_path / "p"
    _receipt(prefix, ("gfx1151",), recorded)
    out = invoke(runner, "plan", "--prefix", str(prefix), "--gpu-arch", "gfx1201")
    assert out.exit_code == 2
    error, hint = out.output.splitlines()[:2]
    assert error == f"error: {prefix} holds target strix-halo; this run chose rdna4 (one prefix holds one target)"
    assert hint.startswith(f"hint: rdna4-install install --prefix '{prefix}' --target strix-halo (or ")
    # the hint's command (a dry run: the real one would build): accepted for this prefix
    again = invoke(runner, *hintcheck.hint_argv(hint), "--dry-run")
    assert again.exit_code == 0, again.output
    assert "(target: strix-halo gfx1151)" in again.output


def test_rocminfo_and_sysfs_agree_on_a_box_with_both(tmp_path, no_gpu_env, monkeypatch, profiles):
    from detect_fixtures import strix_halo_with_9070xt_rocminfo

    monkeypatch.setenv("PATH", str(fake_rocminfo(tmp_path, strix_halo_with_9070xt_rocminfo()).parent))
    d = detect.detect(sysfs_root=strix_halo_host(tmp_path / "root", dgpu=True), profiles=profiles)
    assert [(g.arch, g.integrated, g.pci, g.source, g.targeted) for g in d.gpus] == [
        ("gfx1151", True, "0000:c1:00.0", "rocminfo+kfd+pci", False),
        ("gfx1201", False, "0000:03:00.0", "rocminfo+kfd+pci", True)]
    assert d.gpus[1].marketing_name == "AMD Radeon RX 9070 XT"
    assert (d.profile, d.visible_devices) == ("rdna4", RX9070XT_UUID)
    assert detect.choose_target(d, None, False, target="strix-halo", profiles=profiles) == ("gfx1151",)
    assert d.visible_devices == "0"
