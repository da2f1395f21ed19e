"""installer/lock.py in-process: what a lock holds, its TOML round trip, the checks
that refuse a damaged or unresolved lock, the hashes a receipt adds, and what
`install --lock` refuses. The CLI paths are in test_e2e.py and test_mirror_e2e.py;
these are the fast cases the mutation score (benchmarks/mutation_score.py) runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from installer import lock, recipes as rcp, state
from installer.errors import UsageError
from installer.plan import Settings, make_plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

THEROCK = "https://example.invalid/therock-dist-linux-gfx120X-all-10.1.0.tar.gz"
SDIST = "https://example.invalid/vllm-0.33.0.tar.gz"
# everything a resolver would otherwise look up on the network
EXACT = ("therock.url=" + THEROCK, "torch.torchvision=0.28.0", "torch.torchaudio=2.11.0.3",
         "torch.triton=3.8.0+git669b31ac.rocm10.1.0", "vllm.sdist_url=" + SDIST, "vllm.sdist_sha256=" + "a" * 64)
REGENERATE = "regenerate it with `rdna4-install lock -o FILE`"


def plan_of(tmp_path: Path, *sets: str, **settings):
    folder = rcp.default_recipes_dir()
    pins = rcp.apply_overrides(rcp.load_pins(folder / rcp.PINS_FILE), sets=EXACT + sets)
    return make_plan(Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=folder,
                              archs=("gfx1201",), pins=pins, **settings))


def by_name(lk: dict) -> dict[str, dict]:
    return {a["name"]: a for a in lk["artifacts"]}


def test_a_lock_holds_every_artifact_and_where_each_value_came_from(tmp_path):
    lk = lock.build(plan_of(tmp_path, "therock.sha256=" + "b" * 64))
    assert lk["lock_version"] == lock.FORMAT and lk["archs"] == ["gfx1201"]
    assert lk["pins"]["therock"]["url"] == THEROCK and lk["pins"]["ray"]["enabled"] == "false"
    assert not [v for vals in lk["pins"].values() for v in vals.values() if v in lock.UNRESOLVED]
    arts = by_name(lk)
    assert [a["recipe"] for a in lk["artifacts"]] == [
        "therock", "triton-kernels", "torch", "torch", "torch", "torch", "torch", "flash-attention", "vllm"]
    assert arts["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"] == {
        "recipe": "therock", "kind": "file", "name": "therock-dist-linux-gfx120X-all-10.1.0.tar.gz",
        "url": THEROCK, "sha256": "b" * 64, "version": "10.1.0",
        "from": {"url": "pin therock.url", "sha256": "pin therock.sha256", "version": "pin therock.version"}}
    assert arts["flash-attention.git"] == {
        "recipe": "flash-attention", "kind": "git", "name": "flash-attention.git",
        "url": "https://github.com/Dao-AILab/flash-attention.git",
        "commit": lk["pins"]["flash-attention"]["commit"], "version": lk["pins"]["flash-attention"]["commit"],
        "from": {"url": "pin flash-attention.git_url", "commit": "pin flash-attention.commit"}}
    assert arts["rocm"] == {
        "recipe": "torch", "kind": "wheel", "name": "rocm", "url": lk["pins"]["torch"]["index_url"],
        "version": "10.1.0", "python": "3.12",
        "from": {"rocm": "derived torch.rocm (torch resolver)", "index_url": "pin torch.index_url"}}
    assert arts["torchvision"]["version"] == "0.28.0+rocm10.1.0"
    assert arts["vllm-0.33.0.tar.gz"]["from"]["sha256"] == "pin vllm.sdist_sha256"


def test_a_file_without_a_published_hash_says_it_is_recorded_at_the_first_download(tmp_path):
    arts = by_name(lock.build(plan_of(tmp_path)))
    therock = arts["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"]
    assert therock["sha256"] == ""
    assert therock["from"] == {"url": "pin therock.url", "version": "pin therock.version",
                               "sha256": "not published: recorded at the first download"}


def test_what_is_left_out_of_the_stack_is_left_out_of_the_lock(tmp_path):
    names = {a["name"] for a in lock.build(plan_of(tmp_path, skip=("flash-attention",)))["artifacts"]}
    assert "flash-attention.git" not in names and "vllm-0.33.0.tar.gz" in names
    plan = plan_of(tmp_path)
    assert [a["name"] for a in lock.artifacts(plan, ["vllm"])] == ["vllm-0.33.0.tar.gz"]
    assert lock.artifacts(plan, []) == []


def test_a_git_source_is_locked_as_its_commit_and_tag(tmp_path):
    commit = "1" * 40
    arts = lock.artifacts(plan_of(tmp_path, "vllm.source=git", "vllm.commit=" + commit), ["vllm"])
    assert arts == [{"recipe": "vllm", "kind": "git", "name": "vllm.git",
                     "url": "https://github.com/vllm-project/vllm.git", "commit": commit,
                     "version": "v0.33.0",
                     "from": {"url": "pin vllm.git_url", "commit": "pin vllm.commit",
                              "tag": "derived vllm.tag (vllm resolver)"}}]


def test_dumps_then_load_gives_the_lock_back(tmp_path):
    lk = lock.build(plan_of(tmp_path, target="rdna4"))
    lk["pins"]["vllm"]["odd"] = 'a "quoted" \\ back\u00e9 \n line'
    lk["artifacts"][0]["from"]["note"] = "tab\there"
    path = tmp_path / "deep" / "er" / "rdna4.lock"
    lock.write(lk, path)
    assert [p.name for p in path.parent.iterdir()] == ["rdna4.lock"]   # the temp file was renamed
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# rdna4-install lock: exact artifacts; install with `rdna4-install install --lock FILE`.\n"
                           "# Generated by `rdna4-install lock`; edit recipes/pins.toml (intent) instead.\n")
    assert "back\u00e9" in text        # readable in a diff, not \u escapes
    assert lock.load(path) == lk
    assert tomllib.loads(text)["target"] == "rdna4"


def test_booleans_are_written_as_the_strings_pins_use():
    assert lock._plain(True) == "true" and lock._plain(False) == "false" and lock._plain(3) == "3"
    lk = {"lock_version": 1, "archs": [], "pins": {"ray": {"enabled": "true"}}, "artifacts": []}
    assert lock.check(tomllib.loads(lock.dumps(lk)), "x") == {**lk, "created": "", "target": ""}


def test_a_missing_or_broken_lock_file_is_named_with_the_fix(tmp_path):
    with pytest.raises(UsageError) as err:
        lock.load(tmp_path / "nope.lock")
    assert err.value.message == f"lock file not found: {tmp_path / 'nope.lock'}"
    assert err.value.hint == "write one with `rdna4-install lock -o FILE`"
    bad = tmp_path / "bad.lock"
    bad.write_text("lock_version = = 1\n")
    with pytest.raises(UsageError) as err:
        lock.load(bad)
    assert err.value.message.startswith(f"{bad}: not valid TOML: ") and err.value.hint == REGENERATE
    bad.write_text("lock_version = 2\n")
    with pytest.raises(UsageError) as err:
        lock.load(bad)
    assert err.value.message == f"{bad}: not an rdna4-install lock (lock_version 1)"


GOOD = {"lock_version": 1, "pins": {"vllm": {"version": "0.33.0"}}}


@pytest.mark.parametrize("data, says", [
    ([1, 2], "not an rdna4-install lock (lock_version 1)"),
    ({"pins": {}}, "not an rdna4-install lock (lock_version 1)"),
    ({"lock_version": 2, "pins": {}}, "not an rdna4-install lock (lock_version 1)"),
    ({"lock_version": 1}, "no [pins.<recipe>] tables"),
    ({"lock_version": 1, "pins": []}, "no [pins.<recipe>] tables"),
    ({"lock_version": 1, "pins": {"vllm": "0.33.0"}}, "no [pins.<recipe>] tables"),
    ({"lock_version": 1, "pins": {"vllm": {"a": "1"}, "torch": {"version": 2}}}, "pins.torch.version must be a string"),
    ({"lock_version": 1, "pins": {"therock": {"version": "latest"}}},
     "pins.therock.version is 'latest'; a lock holds exact values"),
    ({"lock_version": 1, "pins": {"torch": {"triton": "auto"}}}, "pins.torch.triton is 'auto'; a lock holds exact values"),
    ({"lock_version": 1, "pins": {"torch": {"torch": "latest-for-rocm"}}},
     "pins.torch.torch is 'latest-for-rocm'; a lock holds exact values"),
    ({**GOOD, "target": 7}, "target must be a string (a target profile name)"),
])
def test_a_damaged_lock_is_refused_naming_what_is_wrong(data, says):
    with pytest.raises(UsageError) as err:
        lock.check(data, "x.lock")
    assert err.value.message == f"x.lock: {says}" and err.value.hint == REGENERATE


def test_a_lock_without_the_optional_fields_gets_their_defaults():
    assert lock.check(dict(GOOD), "x.lock") == {**GOOD, "archs": [], "target": "", "artifacts": []}
    kept = {**GOOD, "archs": ["gfx1201"], "target": "rdna4", "artifacts": [{"kind": "git"}]}
    assert lock.check(dict(kept), "x.lock") == kept


def receipt_with(prefix: Path, lk: dict | None, facts: dict) -> None:
    state.write_stamp(prefix, "therock", {"status": state.DONE, "fingerprint": "f", "facts": facts})
    state.write_receipt(prefix, archs=("gfx1201",), pins={}, tools={}, installer_version="0", lock=lk)


def test_from_receipt_fills_the_hashes_the_install_recorded(tmp_path):
    lk = lock.build(plan_of(tmp_path))
    prefix = tmp_path / "p"
    receipt_with(prefix, lk, {"sha256": "c" * 64})
    got = lock.from_receipt(prefix)
    therock = by_name(got)["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"]
    assert therock["sha256"] == "c" * 64
    assert therock["from"]["sha256"] == f"recorded by the install in {prefix}"
    assert got["pins"]["therock"]["sha256"] == "c" * 64     # so an install from the lock checks it
    assert by_name(got)["flash-attention.git"] == by_name(lk)["flash-attention.git"]


def test_from_receipt_reads_a_source_hash_and_keeps_a_pinned_one(tmp_path):
    lk = lock.build(plan_of(tmp_path, "therock.sha256=" + "b" * 64))
    prefix = tmp_path / "p"
    receipt_with(prefix, lk, {"source": {"sha256": "d" * 64}})
    assert by_name(lock.from_receipt(prefix))["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"]["sha256"] == "b" * 64
    lk["artifacts"][0]["sha256"] = ""
    receipt_with(prefix, lk, {"source": {"sha256": "d" * 64}})
    assert by_name(lock.from_receipt(prefix))["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"]["sha256"] == "d" * 64


def test_from_receipt_without_a_receipt_or_a_lock_says_what_to_do(tmp_path):
    prefix = tmp_path / "p"
    with pytest.raises(UsageError) as err:
        lock.from_receipt(prefix)
    assert err.value.message == f"no receipt in {prefix}"
    assert err.value.hint == "install into it first, or check --from-receipt"
    receipt_with(prefix, None, {})
    with pytest.raises(UsageError) as err:
        lock.from_receipt(prefix)
    assert err.value.message == f"the receipt in {prefix} holds no lock (installed by an older version)"
    assert err.value.hint == f"rerun `rdna4-install install --prefix {prefix}` to record one"
    receipt_with(prefix, {"lock_version": 1, "pins": {"a": {"b": "auto"}}}, {})
    with pytest.raises(UsageError, match=f"^{prefix}/{state.RECEIPT}: pins.a.b is 'auto'"):
        lock.from_receipt(prefix)


@pytest.fixture
def lock_file(tmp_path) -> Path:
    path = tmp_path / "stack.lock"
    lock.write({"lock_version": 1, "archs": ["gfx1200", "gfx1201"], "target": "rdna4",
                "pins": {"vllm": {"version": "0.33.0"}}, "artifacts": []}, path)
    return path


def test_install_from_a_lock_takes_its_pins_archs_and_target(lock_file):
    pins, opts = lock.settings_from({"lock_file": lock_file, "jobs": 3}, ())
    assert pins == {"vllm": {"version": "0.33.0"}}
    assert opts == {"lock_file": lock_file, "jobs": 3, "gpu_arch": "gfx1200,gfx1201", "target": "rdna4"}
    pins["vllm"]["version"] = "9"          # a copy: the caller may change it
    assert lock.load(lock_file)["pins"]["vllm"]["version"] == "0.33.0"
    _, opts = lock.settings_from({"lock_file": lock_file, "gpu_arch": "gfx1201,gfx1200", "target": "rdna4"}, ())
    assert opts["gpu_arch"] == "gfx1201,gfx1200"


def test_a_lock_without_archs_or_target_leaves_them_to_detection(tmp_path):
    path = tmp_path / "bare.lock"
    lock.write({"lock_version": 1, "archs": [], "pins": {"vllm": {}}, "artifacts": []}, path)
    _, opts = lock.settings_from({"lock_file": path}, ())
    assert opts["gpu_arch"] is None and opts["target"] is None
    _, opts = lock.settings_from({"lock_file": path, "gpu_arch": "gfx1151", "target": "strix-halo"}, ())
    assert opts["gpu_arch"] == "gfx1151" and opts["target"] == "strix-halo"


@pytest.mark.parametrize("sets, pins_file, says", [
    (("vllm.version=0.34.0", "a b=c"), None, "rdna4-install lock --set vllm.version=0.34.0 --set 'a b=c' -o FILE"),
    ((), "my pins.toml", "rdna4-install lock --pins 'my pins.toml' -o FILE"),
])
def test_install_from_a_lock_refuses_other_pins(lock_file, sets, pins_file, says):
    with pytest.raises(UsageError) as err:
        lock.settings_from({"lock_file": lock_file, "pins_file": pins_file}, sets)
    assert err.value.message == ("--lock installs exactly the lock's pins; --set, --pins, "
                                 "--flash-attention-backend and --without flash-attention cannot change them")
    assert err.value.hint == f"make a new lock with those options: {says}"


def test_install_from_a_lock_refuses_another_target(lock_file):
    with pytest.raises(UsageError) as err:
        lock.settings_from({"lock_file": lock_file, "gpu_arch": "gfx1201"}, ())
    assert err.value.message == "--gpu-arch gfx1201 differs from the lock's target gfx1200,gfx1201"
    assert err.value.hint == "drop --gpu-arch, or make a lock for that target"
    with pytest.raises(UsageError) as err:
        lock.settings_from({"lock_file": lock_file, "target": "strix-halo"}, ())
    assert err.value.message == "--target strix-halo differs from the lock's target rdna4"
    assert err.value.hint == "drop --target, or make a lock for it: rdna4-install lock --target strix-halo -o FILE"


def test_the_write_is_a_rename_of_a_hidden_temp_file_beside_the_lock(tmp_path, monkeypatch):
    import os

    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a), Path(b))), real(a, b)))
    path = tmp_path / "stack.lock"
    lock.write({"lock_version": 1, "archs": [], "pins": {"vllm": {}}, "artifacts": []}, path)
    [(tmp, dest)] = renamed
    # same directory: the rename is atomic, and a crash leaves a dot file, not a half lock
    assert dest == path and tmp.parent == path.parent and tmp.name.startswith(".stack.lock.")


def test_a_lock_refuses_an_unresolved_pin_naming_each():
    from types import SimpleNamespace

    from installer.errors import InstallerError

    plan = SimpleNamespace(pins={"therock": {"version": "latest"}, "torch": {"triton": "auto", "torch": "2.13.0"}},
                           items=[], settings=SimpleNamespace(archs=("gfx1201",), pins={}, skip=()))
    with pytest.raises(InstallerError) as err:
        lock.build(plan)
    assert err.value.message == "not resolved: therock.version, torch.triton (a lock never contains latest/auto)"
    assert err.value.hint == "give the recipe a resolver, or pin the values exactly"


def test_where_a_value_came_from():
    intent = {"vllm": {"version": "0.33.0", "tag": "", "commit": "auto"}}
    assert lock._origin("vllm.version", intent, "vllm") == "pin vllm.version"
    assert lock._origin("vllm.tag", intent, "vllm") == "derived vllm.tag (vllm resolver)"
    assert lock._origin("vllm.commit", intent, "") == "derived vllm.commit"
    assert lock._origin("vllm.sdist_url", intent, "") == "derived vllm.sdist_url"
    assert lock._origin("ray.version", intent, "") == "derived ray.version"


def test_only_string_fields_are_values_and_a_literal_comes_from_the_recipe(tmp_path):
    from types import SimpleNamespace

    item = SimpleNamespace(vars={"vllm.version": "0.33.0", "ray.version": "2.56.1"},
                           recipe=SimpleNamespace(path=tmp_path / "vllm.toml"))
    got = lock._values({"jobs": 4, "version": "{vllm.version}", "ray": "{ray.version}", "name": "vllm-{vllm.version}"},
                       item, {"vllm": {"version": "0.33.0"}}, {"vllm": "vllm"})
    assert got == {"version": ("0.33.0", "pin vllm.version"), "ray": ("2.56.1", "derived ray.version"),
                   "name": ("vllm-0.33.0", "recipe")}


def test_a_git_artifact_without_a_tag_is_named_by_its_url_and_versioned_by_its_commit():
    arts = lock._step_artifacts("x", "fetch-git", {"url": ("https://example.invalid/org/flash-attention.git/", "p"),
                                                   "commit": ("c" * 40, "pin x.commit")})
    assert arts == [{"recipe": "x", "kind": "git", "name": "flash-attention.git",
                     "url": "https://example.invalid/org/flash-attention.git/", "commit": "c" * 40,
                     "version": "c" * 40, "from": {"url": "p", "commit": "pin x.commit"}}]
    assert lock._step_artifacts("x", "run", {}) == []


def test_a_recipe_source_tag_becomes_the_version_of_its_git_artifact(tmp_path):
    import shutil

    folder = tmp_path / "recipes"
    shutil.copytree(rcp.default_recipes_dir(), folder)
    recipe = folder / "flash-attention.toml"
    recipe.write_text(recipe.read_text().replace('commit = "{flash-attention.commit}"\n',
                                                 'commit = "{flash-attention.commit}"\ntag = "v2.8.3"\n', 1))
    pins = rcp.apply_overrides(rcp.load_pins(folder / rcp.PINS_FILE), sets=EXACT)
    plan = make_plan(Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=folder,
                              archs=("gfx1201",), pins=pins))
    [art] = lock.artifacts(plan, ["flash-attention"])
    assert art["version"] == "v2.8.3" and art["from"]["tag"] == "recipe"
    assert art["url"] == "https://github.com/Dao-AILab/flash-attention.git"


def test_from_receipt_fills_only_the_pin_that_holds_the_hash(tmp_path):
    prefix = tmp_path / "p"
    lk = {"lock_version": 1, "pins": {"therock": {"version": "10.1.0"}},
          "artifacts": [{"recipe": "therock", "kind": "file", "name": "t.tar.gz", "sha256": ""}]}
    receipt_with(prefix, lk, {"sha256": "e" * 64, "source": {}})
    got = lock.from_receipt(prefix)
    assert got["artifacts"][0] == {"recipe": "therock", "kind": "file", "name": "t.tar.gz", "sha256": "e" * 64,
                                   "from": {"sha256": f"recorded by the install in {prefix}"}}
    assert got["pins"] == {"therock": {"version": "10.1.0"}}
    receipt_with(prefix, lk, {"source": {}})
    assert lock.from_receipt(prefix)["artifacts"][0]["sha256"] == ""


def test_a_recipe_left_out_by_its_when_has_no_artifacts_even_if_its_steps_would(tmp_path):
    import shutil

    folder = tmp_path / "recipes"
    shutil.copytree(rcp.default_recipes_dir(), folder)
    recipe = folder / "flash-attention.toml"
    # a later recipe whose fetch step has no `when` of its own
    recipe.write_text(recipe.read_text().replace('when = { "flash-attention.backend" = "ck" }\n', "", 1))
    pins = rcp.apply_overrides(rcp.load_pins(folder / rcp.PINS_FILE), sets=EXACT + ("flash-attention.backend=none",))
    plan = make_plan(Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=folder,
                              archs=("gfx1201",), pins=pins))
    assert lock.artifacts(plan, ["flash-attention"]) == []
    pins["flash-attention"]["backend"] = "triton"
    plan = make_plan(Settings(prefix=tmp_path / "p", cache_dir=tmp_path / "c", recipes_dir=folder,
                              archs=("gfx1201",), pins=pins))
    assert [a["name"] for a in lock.artifacts(plan, ["flash-attention"])] == ["flash-attention.git"] * 2
