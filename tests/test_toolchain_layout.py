"""The toolchain layout check: every file the builds and probes call, checked at the
toolchain step, so a tarball without one fails there by name and not inside a compile."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from therock_fixtures import make_toolchain_tarball, serve

from installer import therock
from installer.actions import StepContext
from installer.errors import InstallerError

NAME = "therock-dist-linux-gfx120X-all-10.1.0.tar.gz"


def _install(tmp_path: Path, **tarball) -> StepContext:
    make_toolchain_tarball(tmp_path / "srv" / NAME, "10.1.0", **tarball)
    prefix = tmp_path / "p"
    ctx = StepContext(name="therock", prefix=prefix, cache_dir=tmp_path / "c", work_dir=prefix / ".rdna4/work/t",
                      log=prefix / ".rdna4/logs/therock.log", env={}, vars={}, archs=("gfx1201",), jobs=1,
                      offline=False)
    with serve(tmp_path / "srv") as srv:
        therock.install_step(ctx, url=srv.url + NAME, version="10.1.0")
    return ctx


@pytest.mark.parametrize("member, named", [
    ("./bin/rocminfo", "bin/rocminfo"),
    ("./bin/amd-smi", "bin/amd-smi"),
    ("./lib/llvm/bin/clang", "lib/llvm/bin/clang"),
    ("./lib/llvm/bin/clang++", "lib/llvm/bin/clang++"),
    ("./bin/hipcc", "bin/hipcc (or its replacement bin/amdclang++)"),
    ("./bin/hipconfig", "bin/hipconfig (or its replacement bin/amdclang++)"),
])
def test_a_tree_missing_a_called_file_fails_at_the_toolchain_step(tmp_path, member, named):
    with pytest.raises(InstallerError) as err:
        _install(tmp_path, drop=(member,))
    assert named in err.value.message and "lacks" in err.value.message
    assert not (tmp_path / "p" / "rocm-10.1.0").exists(), "nothing half-checked becomes visible"


def test_missing_device_libs_are_named(tmp_path):
    drop = ("./lib/llvm/amdgcn/bitcode", "./lib/llvm/amdgcn/bitcode/ocml.bc")
    with pytest.raises(InstallerError, match="lib/llvm/amdgcn/bitcode"):
        _install(tmp_path, drop=drop)


def test_a_release_without_hipcc_passes_with_its_documented_replacement(tmp_path):
    # TheRock's hipcc_deprecation.md: amdclang++ (a link into lib/llvm/bin) replaces hipcc
    link = ("./bin/amdclang++", b"", 0o777, tarfile.SYMTYPE, "../lib/llvm/bin/clang++")
    ctx = _install(tmp_path, drop=("./bin/hipcc", "./bin/hipconfig"), add=(link,))
    root = Path(ctx.facts["rocm_path"])
    assert not (root / "bin/hipcc").exists() and therock.missing_files(root) == []


def test_the_full_fake_tree_is_complete(tmp_path):
    ctx = _install(tmp_path)
    assert therock.missing_files(Path(ctx.facts["rocm_path"])) == []
