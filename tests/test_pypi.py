"""The vllm resolver: sdist URL + sha256 derived from a PEP 691 (PyPI JSON) index for
the chosen version, explicit pins checked against it, answers cached for reruns."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from index_fixtures import build_sdist, request_log, serve_index
from installer import pypi, recipes as rcp, sources, upstream
from installer.actions import StepContext
from installer.errors import InstallerError, UsageError

VERSIONS = ("0.32.0", "0.33.0", "0.33.1", "0.34.0rc1")


@pytest.fixture
def index(tmp_path: Path) -> tuple[str, Path]:
    files = tmp_path / "pypi"
    for v in VERSIONS + ("0.35.0",):
        build_sdist(files, "vllm", v)
    # a yanked release is never "latest"
    return serve_index(files, yanked=("vllm-0.35.0.tar.gz",)), files


def _pins(index_url: str, **vllm: str) -> dict:
    pins = rcp.load_pins(rcp.default_recipes_dir() / rcp.PINS_FILE)
    pins["vllm"].update(index_url=index_url, **vllm)
    return pins


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_version_rederives_url_sha256_and_tag(index, tmp_path):
    url, files = index
    pins = rcp.apply_overrides(_pins(url), sets=("vllm.version=0.33.1",))
    got = pypi.resolve(pins, ("gfx1201",), offline=False, cache_dir=tmp_path / "c")
    assert got["version"] == "0.33.1"
    assert got["sdist_url"].endswith("/vllm-0.33.1.tar.gz")
    assert got["sdist_sha256"] == _sha(files / "vllm-0.33.1.tar.gz")
    assert got["tag"] == "v0.33.1"
    base = pypi.resolve(_pins(url), ("gfx1201",), offline=False, cache_dir=tmp_path / "c")
    assert base["sdist_sha256"] == _sha(files / "vllm-0.33.0.tar.gz") != got["sdist_sha256"]


def test_latest_is_the_newest_final_release_not_yanked(index, tmp_path):
    url, files = index
    got = pypi.resolve(_pins(url, version="latest"), (), offline=False, cache_dir=tmp_path / "c")
    assert got["version"] == "0.33.1" and got["tag"] == "v0.33.1"
    assert got["sdist_sha256"] == _sha(files / "vllm-0.33.1.tar.gz")


def test_an_exact_version_reruns_and_resolves_offline_from_the_cache(index, tmp_path):
    url, _ = index
    cache = tmp_path / "c"
    first = pypi.resolve(_pins(url), (), offline=False, cache_dir=cache)
    asked = len(request_log(url))
    assert asked == 1
    assert pypi.resolve(_pins(url), (), offline=False, cache_dir=cache) == first
    assert pypi.resolve(_pins(url), (), offline=True, cache_dir=cache) == first
    assert len(request_log(url)) == asked          # neither touched the network
    # on a later run (a new process), a version the recorded page lacks asks again:
    # it may have been released since
    upstream._READ.clear()
    with pytest.raises(InstallerError, match="0.40.0 has no sdist"):
        pypi.resolve(_pins(url, version="0.40.0"), (), offline=False, cache_dir=cache)
    assert len(request_log(url)) == asked + 1
    with pytest.raises(InstallerError, match="was never read"):
        pypi.resolve(_pins(url), (), offline=True, cache_dir=tmp_path / "empty")


def test_a_missing_version_names_the_nearest(index, tmp_path):
    url, _ = index
    with pytest.raises(InstallerError) as exc:
        pypi.resolve(_pins(url, version="0.33.2"), (), offline=False, cache_dir=tmp_path / "c")
    assert "it has 0.34.0rc1, 0.33.1, 0.33.0" in exc.value.message
    assert "--set vllm.version=0.34.0rc1" in exc.value.hint


def test_explicit_pins_win_but_must_not_contradict(index, tmp_path):
    url, files = index
    cache = tmp_path / "c"
    good = pypi.resolve(_pins(url), (), offline=False, cache_dir=cache)
    # explicit URL + sha256: kept, no network needed
    mirror = {"sdist_url": "https://mirror.example/vllm-0.33.0.tar.gz", "sdist_sha256": good["sdist_sha256"]}
    got = pypi.resolve(_pins("http://127.0.0.1:9/simple", **mirror), (), offline=False, cache_dir=cache)
    assert got["sdist_url"] == mirror["sdist_url"]
    # the README's example: a new version with the old URL left in place
    with pytest.raises(UsageError) as exc:
        pypi.resolve(_pins(url, version="0.33.1", **mirror), (), offline=False, cache_dir=cache)
    assert "0.33.0 sdist" in exc.value.message and "vllm.version is 0.33.1" in exc.value.message
    with pytest.raises(UsageError, match=r"sdist_sha256 is pinned to 0{64} but .* lists"):
        pypi.resolve(_pins(url, sdist_sha256="0" * 64), (), offline=False, cache_dir=cache)
    with pytest.raises(UsageError, match="vllm.tag is pinned to v0.33.0 but vllm.version 0.33.1"):
        pypi.resolve(_pins(url, version="0.33.1", tag="v0.33.0"), (), offline=False, cache_dir=cache)


def test_git_source_derives_the_tag_commit(tmp_path):
    from build_fixtures import git, git_repo

    repo = tmp_path / "vllm-git"
    head = git_repo(repo, {"f": "x"})
    git("tag", "-a", "v0.33.0", "-m", "release", cwd=repo)   # annotated: ls-remote peels it
    git_repo(repo, {"f": "y"}, "after the release")
    pins = _pins("http://127.0.0.1:9/simple", source="git", git_url=str(repo))
    got = pypi.resolve(pins, (), offline=False, cache_dir=tmp_path / "c")
    assert got["commit"] == head and got["tag"] == "v0.33.0"
    with pytest.raises(InstallerError, match="has no tag v0.33.1"):
        pypi.resolve({**pins, "vllm": {**pins["vllm"], "version": "0.33.1"}}, (), offline=False,
                     cache_dir=tmp_path / "c")


def _ctx(tmp_path: Path) -> StepContext:
    work = tmp_path / "work"
    work.mkdir()
    return StepContext(name="vllm", prefix=tmp_path / "p", cache_dir=tmp_path / "c", work_dir=work,
                       log=tmp_path / "log", env={}, vars={}, archs=("gfx1201",), jobs=1)


def test_fetch_sdist_refuses_an_sdist_of_another_version(index, tmp_path):
    url, files = index
    liar = build_sdist(tmp_path / "liar", "vllm", "0.33.1", says="0.33.0")
    with pytest.raises(InstallerError) as exc:
        sources.fetch_sdist(_ctx(tmp_path), url=str(liar), sha256=_sha(liar), version="0.33.1")
    assert "holds version 0.33.0, not the 0.33.1 asked for" in exc.value.message
    ok = build_sdist(tmp_path / "ok", "vllm", "0.33.1")
    (tmp_path / "again").mkdir()
    dest = sources.fetch_sdist(_ctx(tmp_path / "again"), url=str(ok), sha256=_sha(ok), version="0.33.1")
    assert sources.sdist_version(dest) == "0.33.1"


def test_a_short_git_commit_stops_the_plan(tmp_path):
    pins = _pins("http://127.0.0.1:9/simple", source="git", commit="4ba787ec9")
    with pytest.raises(UsageError) as exc:
        pypi.resolve(pins, (), offline=False, cache_dir=tmp_path / "c")
    assert "full 40-character SHA" in exc.value.message and "git rev-parse v0.33.0" in exc.value.hint
