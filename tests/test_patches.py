"""Patch application: in order, idempotent on rerun, loud and precise on failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from build_fixtures import git, git_repo, make_ctx

from installer import patches
from installer.errors import InstallerError

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
