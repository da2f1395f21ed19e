"""Verify, then publish; own only what you made (issue 12), through the real CLI.

A recipes dir holding only the real therock recipe and pins, a loopback server
standing in for AMD's, and `python -m installer` as a user runs it. Each case
checks the exit code, one error line with no traceback, that the prefix and the
cache hold nothing refused, and that the printed hint, run as printed, ends in
a working prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_fixtures import hint_command
from installer import download, unpack
from installer.state import read_stamp, write_stamp
from therock_fixtures import make_toolchain_tarball, serve, sha256_of

REPO = Path(__file__).resolve().parent.parent
VERSION = "10.1.0"
NAME = f"therock-dist-linux-gfx120X-all-{VERSION}.tar.gz"


class World:
    def __init__(self, root: Path, srv):
        self.root, self.srv = root, srv
        self.files = root / "srv"
        self.prefix = root / "prefix"
        self.cache = root / "cache"
        self.recipes = root / "tree" / "recipes"
        self.recipes.mkdir(parents=True)
        shutil.copy(REPO / "recipes" / "therock.toml", self.recipes)
        shutil.copy(REPO / "recipes" / "pins.toml", self.recipes)
        self.pins = root / "pins.toml"
        self.pins.write_text(f'[therock]\nversion = "{VERSION}"\nindex_url = "{srv.url}"\n')

    @property
    def url(self) -> str:
        return self.srv.url + NAME

    def serve_tarball(self, **kw) -> str:
        """Put a tarball at the URL; returns its sha256."""
        return sha256_of(make_toolchain_tarball(self.files / NAME, VERSION, **kw))

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), "RDNA4_RECIPES_DIR": str(self.recipes),
               "RDNA4_PINS": str(self.pins), "RDNA4_CACHE_DIR": str(self.cache)}
        out = subprocess.run([sys.executable, "-m", "installer", *args], env=env, capture_output=True,
                             text=True, timeout=300, cwd=self.root)
        assert "Traceback" not in out.stderr + out.stdout, out.stderr
        return out

    def install(self) -> subprocess.CompletedProcess:
        return self.cli("install", "--prefix", str(self.prefix), "--gpu-arch", "gfx1201", "--no-checks")

    def tree(self) -> Path:
        return self.prefix / f"rocm-{VERSION}"

    def fail_stamp(self) -> None:
        """What a failed or killed rerun leaves: the stamp not done, its facts kept."""
        stamp = read_stamp(self.prefix, "therock")
        write_stamp(self.prefix, "therock", {**stamp, "status": "failed"})

    def cached_files(self) -> list[Path]:
        return [p for p in (self.cache / "downloads").glob("*/*") if p.is_file() and p.parent.name != "partial"]


@pytest.fixture
def world(tmp_path):
    (tmp_path / "srv").mkdir()
    with serve(tmp_path / "srv") as srv:
        yield World(tmp_path, srv)


def errors_of(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error: ")]


def test_a_swapped_tarball_is_refused_by_the_prefix_record_even_with_a_fresh_cache(world):
    first = world.serve_tarball(pad_bytes=1 << 20)
    assert world.install().returncode == 0
    tree_ino = world.tree().stat().st_ino
    link = os.readlink(world.prefix / "rocm")
    # the server now serves other bytes under the same name; the cache is gone
    swapped = world.serve_tarball(pad_bytes=1 << 20, seed=7)
    shutil.rmtree(world.cache)
    world.fail_stamp()
    out = world.install()
    assert out.returncode == 1
    [err] = errors_of(out)
    assert "sha256 mismatch" in err and "recorded in this prefix" in err and first in err and swapped in err
    # nothing refused became visible or trusted
    assert world.tree().stat().st_ino == tree_ino and os.readlink(world.prefix / "rocm") == link
    assert read_stamp(world.prefix, "therock")["facts"]["sha256"] == first
    assert download.recorded_sha256(world.url, world.cache) is None and world.cached_files() == []
    assert not list(world.prefix.glob(".rocm-*"))
    # the hint pins the new file; run as printed, it installs it
    argv = hint_command(out)
    assert f"--set therock.sha256={swapped}" in " ".join(argv)
    again = world.cli(*argv)
    assert again.returncode == 0, again.stderr
    assert read_stamp(world.prefix, "therock")["facts"]["sha256"] == swapped
    assert world.tree().stat().st_ino != tree_ino


def test_force_accepts_what_the_server_serves_now(world):
    world.serve_tarball()
    assert world.install().returncode == 0
    swapped = world.serve_tarball(seed=7, pad_bytes=1 << 16)
    out = world.cli("run", "therock", "--force", "--prefix", str(world.prefix))
    assert out.returncode == 0, out.stderr
    assert read_stamp(world.prefix, "therock")["facts"]["sha256"] == swapped


@pytest.mark.parametrize("bad", ["unsafe", "layout", "truncated"])
def test_a_refused_tarball_leaves_no_tree_and_no_trace_in_the_cache(world, bad):
    kw = {"unsafe": {"evil": "escape_link"}, "layout": {"manifest": True},
          "truncated": {"truncate": True, "pad_bytes": 1 << 20}}[bad]
    if bad == "layout":
        import tarfile

        (world.files / NAME).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(world.files / NAME, "w:gz") as tf:
            tf.add(__file__, arcname="./bin/rocminfo")
    else:
        world.serve_tarball(**kw)
    out = world.install()
    assert out.returncode == 1
    [err] = errors_of(out)
    assert err.startswith("error: therock: ")
    assert "removed from the cache" in out.stderr and str(world.prefix) in out.stderr
    assert not os.path.lexists(world.tree()) and not os.path.lexists(world.prefix / "rocm")
    assert not list(world.prefix.glob(".rocm-*"))
    assert download.recorded_sha256(world.url, world.cache) is None and world.cached_files() == []
    assert not list((world.cache / "downloads" / "partial").glob("*.part"))
    # the server is fixed: the command in the hint installs the good file
    good = world.serve_tarball()
    again = world.cli(*hint_command(out))
    assert again.returncode == 0, again.stderr
    assert read_stamp(world.prefix, "therock")["facts"]["sha256"] == good
    assert (world.prefix / "rocm" / "bin" / "rocminfo").is_file()


def test_a_refused_cached_tarball_is_dropped_and_the_old_tree_kept(world):
    """A layout failure on a tarball already in the cache (pinned): the cache
    drops it and the published tree stays."""
    world.serve_tarball()
    assert world.install().returncode == 0
    tree_ino = world.tree().stat().st_ino
    import tarfile

    bad = world.root / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(__file__, arcname="./bin/rocminfo")
    digest = sha256_of(bad)
    # the bad file sits in the cache under its hash, as a mirror copy would
    (world.cache / "downloads" / digest).mkdir(parents=True)
    shutil.copy(bad, world.cache / "downloads" / digest / NAME)
    out = world.cli("run", "therock", "--prefix", str(world.prefix), "--set", f"therock.sha256={digest}")
    assert out.returncode == 1 and "lacks bin/amd-smi" in out.stderr
    assert not (world.cache / "downloads" / digest).exists()
    assert world.tree().stat().st_ino == tree_ino and (world.tree() / "bin/amd-smi").is_file()
    # the hint downloads it again; the server's file is not the one pinned, which is refused
    # with the next hint, pinning what the server has; that one installs it
    again = world.cli(*hint_command(out))
    assert again.returncode == 1 and "sha256 mismatch" in again.stderr, again.stderr
    assert world.cli(*hint_command(again)).returncode == 0
    assert (world.tree() / "bin/amd-smi").is_file()


def test_a_user_file_in_the_toolchain_tree_is_never_deleted(world):
    world.serve_tarball()
    assert world.install().returncode == 0
    mine = world.tree() / "lib" / "my-notes.txt"
    mine.write_text("mine")
    world.fail_stamp()
    shutil.rmtree(world.cache)          # so a check made only after the download would show
    gets = len(world.srv.downloads(NAME))
    out = world.install()
    assert out.returncode == 1
    [err] = errors_of(out)
    assert str(mine) in err and "did not put there" in err
    assert mine.read_text() == "mine"
    assert len(world.srv.downloads(NAME)) == gets        # refused before downloading
    # the hint's --force command replaces the tree (and the file with it)
    argv = hint_command(out)
    assert "--force" in argv
    assert world.cli(*argv).returncode == 0
    assert not mine.exists() and (world.tree() / "bin" / "rocminfo").is_file()


def test_a_tree_the_installer_did_not_make_is_not_replaced(world):
    world.serve_tarball()
    theirs = world.tree()
    theirs.mkdir(parents=True)
    (theirs / "README").write_text("someone's ROCm")
    (world.prefix / ".rdna4").mkdir()   # a prefix of ours (an earlier install), with a stranger's tree
    out = world.install()
    assert out.returncode == 1 and "was not made by rdna4-install" in errors_of(out)[0]
    assert (theirs / "README").read_text() == "someone's ROCm"
    assert not os.path.lexists(world.prefix / "rocm")


def test_a_rocm_link_to_another_rocm_is_not_repointed(world, tmp_path):
    world.serve_tarball()
    other = tmp_path / "opt-rocm-6.4"
    other.mkdir()
    (world.prefix / ".rdna4").mkdir(parents=True)   # a prefix of ours, its link changed by hand
    os.symlink(other, world.prefix / "rocm")
    out = world.install()
    assert out.returncode == 1
    [err] = errors_of(out)
    assert f"points to {other}" in err
    assert os.readlink(world.prefix / "rocm") == str(other)
    assert world.srv.downloads(NAME) == []               # refused before downloading
    assert not os.path.lexists(world.tree())
    argv = hint_command(out)
    assert world.cli(*argv).returncode == 0
    assert os.readlink(world.prefix / "rocm") == f"rocm-{VERSION}" and other.is_dir()


def test_a_link_to_an_older_tree_of_ours_is_repointed(world):
    world.serve_tarball()
    assert world.install().returncode == 0
    old = world.prefix / "rocm-10.0.0"
    world.tree().rename(old)
    os.symlink("rocm-10.0.0", world.prefix / "rocm.new")
    os.replace(world.prefix / "rocm.new", world.prefix / "rocm")
    world.fail_stamp()
    assert world.install().returncode == 0
    assert os.readlink(world.prefix / "rocm") == f"rocm-{VERSION}"
    assert (old / unpack.OWNED_LIST).is_file()            # left alone, not deleted


def test_the_tree_lists_what_was_unpacked(world):
    world.serve_tarball()
    assert world.install().returncode == 0
    listed = (world.tree() / unpack.OWNED_LIST).read_text().splitlines()
    assert "bin/rocminfo" in listed and "lib/llvm/bin/clang" in listed and "llvm" in listed
    assert unpack.foreign_path(world.tree()) is None
    receipt = json.loads((world.prefix / "rdna4-manifest.json").read_text())
    assert receipt["components"]["therock"]["facts"]["url"] == world.url
