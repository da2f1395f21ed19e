"""Patch application: in order, idempotent on rerun, loud and precise on failure."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
from build_fixtures import git, git_repo, make_ctx

from installer import patches
from installer.errors import InstallerError
from installer.ui import UI

REPO = Path(__file__).resolve().parent.parent
HEADER_BODY = ("Why: the fake needs it.\n\nUpstream: https://github.com/example/x/pull/1\n"
               "Drop when: upstream merges #1.\n")


def format_patches(tmp_path: Path, edits: list[tuple[str, str, str]]) -> tuple[Path, list[Path]]:
    """A pristine tree plus one git format-patch file per (path, old, new) edit, in order."""
    base = {"csrc/a.c": "".join(f"int a{i} = {i};\n" for i in range(20)), "README": "fake\n"}
    up = tmp_path / "upstream"
    git_repo(up, base)
    for path, old, new in edits:
        text = (up / path).read_text()
        assert old in text
        (up / path).write_text(text.replace(old, new))
        git("commit", "-q", "-a", "-m", f"fix {new.strip()}", "-m", HEADER_BODY, cwd=up)
    out = tmp_path / "patches"
    git("format-patch", "-q", "-o", str(out), f"HEAD~{len(edits)}", cwd=up)
    tree = tmp_path / "tree"
    tree.mkdir()
    for rel, text in base.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    return tree, sorted(out.glob("*.patch"))


def test_patches_apply_in_order_and_a_rerun_skips_them(tmp_path):
    # the second patch edits the line the first one wrote: order matters
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a3 = 3;", "int a3 = 33;"),
                                            ("csrc/a.c", "int a3 = 33;", "int a3 = 333;")])
    got = patches.apply_all(tree, files, env={"PATH": "/usr/bin:/bin"}, what="fake")
    assert list(got.values()) == [patches.APPLIED, patches.APPLIED]
    assert "int a3 = 333;" in (tree / "csrc/a.c").read_text()

    again = patches.apply_all(tree, files[-1:], env={"PATH": "/usr/bin:/bin"}, what="fake")
    assert again == {files[-1].name: patches.ALREADY}
    assert "int a3 = 333;" in (tree / "csrc/a.c").read_text()


def test_a_failing_patch_names_itself_the_version_and_the_hunk(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    before = (tree / "csrc/a.c").read_text()
    with pytest.raises(InstallerError) as err:
        patches.apply_all(tree, files, env={"PATH": "/usr/bin:/bin"}, what="vllm", version="vllm 0.33.0")
    msg = err.value.message
    assert files[0].name in msg and "vllm 0.33.0" in msg
    assert "csrc/a.c @@ -10,7 +10,7 @@" in msg
    assert "refresh it or drop it" in err.value.hint
    assert (tree / "csrc/a.c").read_text() == before  # nothing half-applied


def test_a_patch_whose_second_file_fails_changes_neither_file(tmp_path):
    # apply_one relies on git apply being all-or-nothing (it runs no --check first)
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    up = tmp_path / "upstream"
    for rel, old, new in (("README", "patched", "twice"), ("csrc/a.c", "int a5 = 5;", "int a5 = 55;")):
        (up / rel).write_text((up / rel).read_text().replace(old, new))
    both = tmp_path / "both.patch"
    both.write_text(git("diff", cwd=up) + "\n")
    patches.apply_all(tree, files, env={"PATH": "/usr/bin:/bin"}, what="fake")
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a4 = 4;", "int a4 = -4;"))
    before = {rel: (tree / rel).read_text() for rel in ("README", "csrc/a.c")}
    with pytest.raises(InstallerError, match="first failing hunk csrc/a.c"):
        patches.apply_all(tree, [both], env={"PATH": "/usr/bin:/bin"}, what="fake")
    assert {rel: (tree / rel).read_text() for rel in before} == before


def test_an_sdist_tree_inside_another_repo_is_patched_relative_to_itself(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    outer = tmp_path / "outer"
    git_repo(outer, {"x": "x\n"})
    moved = outer / "work" / "src"
    moved.parent.mkdir()
    tree.rename(moved)
    patches.apply_all(moved, files, env={"PATH": "/usr/bin:/bin"}, what="fake")
    assert (moved / "README").read_text() == "patched\n"


def test_apply_patches_action_uses_the_planned_list_and_records_facts(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "c", patches=tuple(files), version="0.33.0")
    ctx.src_dir.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(ctx.src_dir)
    patches.apply_patches(ctx)
    assert ctx.facts["patches"] == {files[0].name: patches.APPLIED}
    assert f"patch {files[0].name}: applied" in ctx.log.read_text()


def test_header_problems_accepts_a_complete_header_and_lists_gaps(tmp_path):
    _, files = format_patches(tmp_path, [("README", "fake", "patched")])
    assert patches.header_problems(files[0]) == []
    bare = tmp_path / "bare.patch"
    bare.write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    assert len(patches.header_problems(bare)) == 4


SHIPPED = sorted((REPO / "patches").glob("*/*.patch"))


@pytest.mark.parametrize("patch", SHIPPED or [pytest.param(None, marks=pytest.mark.skip("no patches shipped"))],
                         ids=lambda p: p and f"{p.parent.name}/{p.name}")
def test_every_shipped_patch_explains_itself(patch):
    assert patches.header_problems(patch) == []


ENV = {"PATH": "/usr/bin:/bin"}


def test_a_conflict_without_a_version_names_the_source_and_the_caller(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    with pytest.raises(InstallerError) as err:
        patches.apply_all(tree, files, env=ENV, what="fake")
    assert err.value.message.startswith(f"fake: patch {files[0].name} does not apply to this source: ")


def test_the_hunk_named_is_the_failing_one_of_a_two_file_patch(tmp_path):
    # both files have a hunk at the same line; the second file's fails
    base = {"csrc/a.c": "".join(f"int a{i} = {i};\n" for i in range(20))}
    base["csrc/b.c"] = base["csrc/a.c"].replace("int a", "int b")
    up = tmp_path / "upstream"
    git_repo(up, base)
    for rel, old, new in (("csrc/a.c", "int a5 = 5;", "int a5 = 55;"), ("csrc/b.c", "int b5 = 5;", "int b5 = 55;")):
        (up / rel).write_text((up / rel).read_text().replace(old, new))
    patch = tmp_path / "0001-both.patch"
    patch.write_text(git("diff", cwd=up) + "\n")
    tree = tmp_path / "tree"
    for rel, text in base.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text.replace("int b4 = 4;", "int b4 = -4;"))
    with pytest.raises(InstallerError) as err:
        patches.apply_all(tree, [patch], env=ENV, what="fake")
    assert err.value.message.endswith("first failing hunk csrc/b.c @@ -3,7 +3,7 @@ int b1 = 1;")


def test_a_corrupt_patch_names_gits_complaint(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a3 = 3;", "int a3 = 33;")])
    text = files[0].read_text()
    files[0].write_text(text[:text.index("@@")] + "@@ -1,7 +1,7 @@\n-nonsense\n")
    with pytest.raises(InstallerError) as err:
        patches.apply_all(tree, files, env=ENV, what="fake")
    assert re.search(r"first failing hunk corrupt patch at line \d+$", err.value.message)


@pytest.mark.parametrize("error, named", [
    ("error: corrupt patch at line 7\n", "corrupt patch at line 7"),
    ("Checking patch x...\nerror: corrupt patch at line 7\nerror: more\n", "corrupt patch at line 7"),
    ("fatal: not a git repository\n", "fatal: not a git repository"),
    ("", "no hunk named")])
def test_first_failing_hunk_without_a_hunk_names_the_first_error(tmp_path, error, named):
    assert patches.first_failing_hunk(tmp_path / "unused.patch", error) == named


def test_a_patch_that_is_not_utf8_is_still_read(tmp_path):
    # an author name in Latin-1: the header check and the hunk report still work
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    data = files[0].read_bytes().replace(b"From: t <", b"From: Jos\xe9 <")
    files[0].write_bytes(data)
    assert patches.header_problems(files[0]) == []
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    with pytest.raises(InstallerError, match="first failing hunk csrc/a.c @@ -10,7 "):
        patches.apply_all(tree, files, env=ENV, what="fake")


def test_header_problems_names_each_gap(tmp_path):
    bare = tmp_path / "bare.patch"
    bare.write_text("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    assert patches.header_problems(bare) == [
        "no Subject: line (git format-patch header)", "no upstream link (https://...)",
        "does not say when to drop it", "no 'diff --git' section"]


def test_a_link_in_the_diff_is_not_the_headers_link(tmp_path):
    # the header is what comes before the first file's diff, even with several files
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    text = files[0].read_text().replace("Upstream: https://github.com/example/x/pull/1\n", "")
    second = "diff --git a/OTHER b/OTHER\n--- a/OTHER\n+++ b/OTHER\n@@ -1 +1 @@\n-x\n+see https://example.com\n"
    files[0].write_text(text.replace("\n-- \n", "\n" + second + "-- \n", 1))
    assert patches.header_problems(files[0]) == ["no upstream link (https://...)"]


def _versioned(tmp_path: Path, name: str, versions: str | None) -> Path:
    patch = tmp_path / name
    line = f"Versions: {versions}\n" if versions is not None else ""
    patch.write_text(f"Subject: [PATCH] x\n{line}\ndiff --git a/x b/x\n--- a/x\n+++ b/x\n"
                     "@@ -1 +1 @@\n-Versions: <0.1\n+b\n")
    return patch


def test_for_version_keeps_the_patches_a_release_needs_and_notes_the_rest(tmp_path):
    old = _versioned(tmp_path, "0001-old.patch", "<0.33")
    new = _versioned(tmp_path, "0002-new.patch", ">=0.33.0,<0.35")
    always = _versioned(tmp_path, "0003-always.patch", None)
    assert patches.header_field(new, "Versions") == ">=0.33.0,<0.35"
    assert patches.header_field(always, "Versions") == ""  # the one in the diff is not the header's
    kept, notes = patches.for_version([old, new, always], "0.34.0")
    assert kept == [new, always]
    assert notes == ["patch 0001-old.patch skipped: it is for <0.33, not 0.34.0"]
    # a pre-release of a version a range covers needs the patch too
    assert patches.for_version([old, new], "0.35.0rc1") == ([], [
        "patch 0001-old.patch skipped: it is for <0.33, not 0.35.0rc1",
        "patch 0002-new.patch skipped: it is for >=0.33.0,<0.35, not 0.35.0rc1"])
    assert patches.for_version([old, new], "0.34.0rc1")[0] == [new]
    # a version that is not PEP 440 (a branch name): every patch, no notes
    assert patches.for_version([old, new], "main") == ([old, new], [])


def test_for_version_refuses_a_versions_line_that_is_not_a_specifier(tmp_path):
    bad = _versioned(tmp_path, "0001-bad.patch", "0.33 or later")
    with pytest.raises(InstallerError) as err:
        patches.for_version([bad], "0.34.0")
    assert err.value.message == "patch 0001-bad.patch: 'Versions: 0.33 or later' is not a version specifier"
    assert err.value.hint == "write e.g. Versions: >=0.33.0,<0.35"


class Recorder(UI):
    def __init__(self):
        super().__init__(verbosity=1, stream=io.StringIO())
        self.said: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.said.append(("info", msg))

    def detail(self, msg: str) -> None:
        self.said.append(("detail", msg))


@pytest.mark.parametrize("source, label", [
    ({"tag": "v0.33.0", "commit": "c" * 40}, "vllm 0.33.0 (v0.33.0)"),
    ({"commit": "0123456789abcdef" * 2}, "vllm 0.33.0 (0123456789ab)"),
    ({"sha256": "fedcba9876543210" * 4}, "vllm 0.33.0 (fedcba987654)"),
    ({}, "vllm 0.33.0")])
def test_apply_patches_names_the_source_a_patch_does_not_apply_to(tmp_path, source, label):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "c", patches=tuple(files), version="0.33.0")
    ctx.facts["source"] = source
    ctx.src_dir.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(ctx.src_dir)
    with pytest.raises(InstallerError) as err:
        patches.apply_patches(ctx)
    assert err.value.message.startswith(f"vllm: patch {files[0].name} does not apply to {label}: ")


def test_apply_patches_without_a_version_label_names_the_recipe(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "c", patches=tuple(files))
    ctx.facts["source"] = {"tag": "v0.33.0"}
    ctx.src_dir.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(ctx.src_dir)
    with pytest.raises(InstallerError, match=r"does not apply to vllm \(v0\.33\.0\): "):
        patches.apply_patches(ctx)


def test_apply_patches_tells_the_user_what_it_did(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched"), ("csrc/a.c", "int a3 = 3;", "int a3 = 4;")])
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "c", patches=tuple(files[:1]))
    ctx.ui = Recorder()
    ctx.src_dir.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(ctx.src_dir)
    patches.apply_all(ctx.src_dir, files[1:], env=ENV, what="vllm")
    ctx.patches = tuple(files)
    patches.apply_patches(ctx)
    assert ctx.ui.said == [("detail", f"{files[0].name}: applied, {files[1].name}: already applied")]


# --- precheck: every patch against the sdist before any build ---

def _sdist_item(tmp_path: Path, files: list[Path], tree: Path, *, when=(), version: str | None = "0.33.0",
                sha256: str = "", url: str = "{sdist}"):
    from installer import recipes as rcp
    from installer.plan import Item

    sdist = tmp_path / "vllm-0.33.0.tar.gz"
    subprocess.run(["tar", "-czf", str(sdist), "-C", str(tree.parent), tree.name], check=True)
    fetch = rcp.Step(name="fetch", action="fetch-sdist", args=(("url", url), ("sha256", sha256)), when=when)
    recipe = rcp.Recipe(name="vllm", path=tmp_path / "vllm.toml", steps=(fetch,))
    variables = {"sdist": str(sdist), "rocm_major": "10"}
    if version is not None:
        variables["_version"] = version
    return Item(recipe=recipe, action="build", reason="", patches=tuple(files), vars=variables)


def test_precheck_stops_on_a_conflict_before_any_build_and_leaves_nothing(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text((tree / "csrc/a.c").read_text().replace("int a11 = 11;", "int a11 = -1;"))
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    with pytest.raises(InstallerError) as err:
        patches.precheck([_sdist_item(tmp_path, files, tree)], prefix=prefix, cache_dir=tmp_path / "cache",
                         offline=False)
    assert err.value.message == (f"vllm: patch {files[0].name} conflicts with vllm 0.33.0: first failing "
                                 "hunk csrc/a.c @@ -10,7 +10,7 @@ int a8 = 8;; nothing was built")
    assert err.value.hint == ("refresh or drop the patch (its header says when); "
                              "`rdna4-install pins update` checks every patch against a release")
    assert list(prefix.iterdir()) == []


def test_precheck_notes_a_patch_already_in_the_sdist_and_passes_one_that_applies(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched"), ("csrc/a.c", "int a3 = 3;", "int a3 = 4;")])
    patches.apply_all(tree, files[:1], env=ENV, what="vllm")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    ui = Recorder()
    patches.precheck([_sdist_item(tmp_path, files, tree, version=None)], prefix=prefix,
                     cache_dir=tmp_path / "cache", offline=False, ui=ui)
    assert [m for _, m in ui.said if "patch" in m] == [
        f"vllm: patch {files[0].name} is already in vllm; it is skipped (drop it per its header)"]
    assert any("vllm source" in m for _, m in ui.said)  # the download is shown, by name
    assert list(prefix.iterdir()) == []
    assert (tree / "csrc/a.c").read_text().count("int a3 = 3;") == 1  # the sdist itself is untouched


@pytest.mark.parametrize("case", ["no patches", "when unmet", "no sdist step"])
def test_precheck_skips_what_has_nothing_to_check(tmp_path, case):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text("conflicting\n")
    item = _sdist_item(tmp_path, [] if case == "no patches" else files, tree,
                       when=(("rocm_major", "9"),) if case == "when unmet" else ())
    if case == "no sdist step":
        from dataclasses import replace
        item.recipe = replace(item.recipe, steps=(replace(item.recipe.steps[0], action="fetch-git"),))
    (tmp_path / "vllm-0.33.0.tar.gz").unlink()  # nothing is fetched either
    ui = Recorder()
    # offline with no sdist and a conflicting tree: a check that ran would raise
    patches.precheck([item], prefix=tmp_path, cache_dir=tmp_path / "cache", offline=True, ui=ui)
    assert ui.said == [] and not (tmp_path / "cache").exists()


def test_precheck_checks_the_sdist_against_its_pin(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    with pytest.raises(InstallerError, match="sha256 mismatch for vllm source: expected 0000"):
        patches.precheck([_sdist_item(tmp_path, files, tree, sha256="0" * 64)], prefix=prefix,
                         cache_dir=tmp_path / "cache", offline=False)
    assert list(prefix.iterdir()) == []


def test_precheck_offline_needs_the_sdist_in_the_cache(tmp_path):
    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    with pytest.raises(InstallerError, match="offline, and vllm source is not in the cache"):
        patches.precheck([_sdist_item(tmp_path, files, tree)], prefix=tmp_path, cache_dir=tmp_path / "cache",
                         offline=True)


def test_precheck_checks_every_item_after_one_without_patches(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text("conflicting\n")
    items = [_sdist_item(tmp_path, [], tree), _sdist_item(tmp_path, files, tree)]
    with pytest.raises(InstallerError, match="conflicts with vllm 0.33.0"):
        patches.precheck(items, prefix=tmp_path, cache_dir=tmp_path / "cache", offline=False)


@pytest.mark.parametrize("when, url, message", [
    ((("nope", "1"),), "{sdist}", "'when' names unknown pin 'nope'"),
    ((), "{nope}", "nope")])
def test_precheck_names_the_recipe_whose_step_is_wrong(tmp_path, when, url, message):
    from installer.errors import RecipeError

    tree, files = format_patches(tmp_path, [("README", "fake", "patched")])
    item = _sdist_item(tmp_path, files, tree, when=when, url=url)
    with pytest.raises(RecipeError) as err:
        patches.precheck([item], prefix=tmp_path, cache_dir=tmp_path / "cache", offline=False)
    assert err.value.message.startswith(f"{tmp_path / 'vllm.toml'}: ") and message in err.value.message


def test_apply_patches_without_a_version_variable_names_the_recipe_alone(tmp_path):
    tree, files = format_patches(tmp_path, [("csrc/a.c", "int a12 = 12;", "int a12 = 1200;")])
    (tree / "csrc/a.c").write_text("conflicting\n")
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "c", patches=tuple(files))
    del ctx.vars["_version"]
    ctx.src_dir.parent.mkdir(parents=True, exist_ok=True)
    tree.rename(ctx.src_dir)
    with pytest.raises(InstallerError, match=f"patch {files[0].name} does not apply to vllm: "):
        patches.apply_patches(ctx)


def test_a_versions_line_is_read_from_a_patch_that_is_not_utf8(tmp_path):
    patch = _versioned(tmp_path, "0001-x.patch", ">=0.33")
    patch.write_bytes(patch.read_bytes().replace(b"Subject: [PATCH] x", b"Subject: [PATCH] Jos\xe9"))
    assert patches.header_field(patch, "Versions") == ">=0.33"
