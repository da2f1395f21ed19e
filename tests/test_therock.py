"""installer.therock: resolving versions from listings, and the install step."""

from __future__ import annotations

import sys
import os
from pathlib import Path

import pytest

from installer import download, therock
from installer.actions import ACTIONS, RESOLVERS, StepContext
from installer.errors import InstallerError, UsageError
from therock_fixtures import make_toolchain_tarball, serve, sha256_of

FAM = "gfx120X-all"


def _name(version: str, family: str = FAM, tests: bool = False) -> str:
    return f"therock-dist-linux-{family}-{'tests-' if tests else ''}{version}.tar.gz"


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A fake TheRock tarball directory: stable, rc, nightly, tests and other families."""
    root = tmp_path / "repo"
    root.mkdir()
    for v in ("7.9.0", "7.13.0", "9.2.0", "10.0.0", "10.1.0rc2", "10.1.0a20260827", "10.2.0a20260926",
              "10.2.0a20260927"):
        (root / _name(v)).write_bytes(b"x")
    (root / _name("10.3.0", tests=True)).write_bytes(b"x")        # test tarballs never count
    (root / _name("11.0.0", family="gfx110X-all")).write_bytes(b"x")
    (root / "therock-dist-windows-gfx120X-all-12.0.0.tar.gz").write_bytes(b"x")
    make_toolchain_tarball(root / _name("10.1.0"), "10.1.0")
    return root


def _pins(**kw) -> dict:
    return {"therock": {"channel": "stable", "version": "10.1.0", "family": "", "sha256": "", **kw}}


def test_registered_for_recipes():
    assert RESOLVERS["therock"] == "installer.therock:resolve"
    assert ACTIONS["install-toolchain"] == "installer.therock:install_step"


@pytest.mark.parametrize("version, url", [
    ("10.1.0", "https://stable.repo.amd.com/rocm/core/tarball/therock-dist-linux-gfx120X-all-10.1.0.tar.gz"),
    ("7.14.0", "https://repo.amd.com/rocm/tarball-multi-arch/therock-dist-linux-gfx120X-all-7.14.0.tar.gz"),
    ("7.12.0", "https://repo.amd.com/rocm/tarball/therock-dist-linux-gfx120X-all-7.12.0.tar.gz"),
    ("10.2.0a20260927",
     "https://nightly.repo.amd.com/rocm/core/tarball/therock-dist-linux-gfx120X-all-10.2.0a20260927.tar.gz"),
    ("7.12.0a20260202",
     "https://rocm.nightlies.amd.com/tarball/therock-dist-linux-gfx120X-all-7.12.0a20260202.tar.gz"),
    ("10.1.0rc2", "https://rc.repo.amd.com/rocm/core/tarball/therock-dist-linux-gfx120X-all-10.1.0rc2.tar.gz"),
    ("7.14.0rc1",
     "https://rocm.prereleases.amd.com/tarball-multi-arch/therock-dist-linux-gfx120X-all-7.14.0rc1.tar.gz"),
    ("10.1.0.dev0+" + "a" * 40,
     "https://dev.repo.amd.com/rocm/core/tarball/therock-dist-linux-gfx120X-all-10.1.0.dev0%2B"
     + "a" * 40 + ".tar.gz"),
])
def test_exact_versions_need_no_network(tmp_path, version, url):
    # no server exists for these hosts here: any request would fail the test
    got = therock.resolve(_pins(version=version, channel=""), ("gfx1201",), offline=True,
                          cache_dir=tmp_path)
    assert got["url"] == url and got["version"] == version and got["family"] == FAM


def test_family_for_rdna4_and_overrides(tmp_path):
    assert therock.family_for(("gfx1200",)) == therock.family_for(("gfx1201", "gfx1200")) == FAM
    assert therock.resolve(_pins(family="multiarch"), ("gfx1201",), offline=True,
                           cache_dir=tmp_path)["url"].endswith("multiarch-10.1.0.tar.gz")
    assert therock.family_for(("gfx1151",)) == "gfx1151"     # the strix-halo profile's group
    with pytest.raises(UsageError, match="gfx1100"):
        therock.family_for(("gfx1100",))
    with pytest.raises(UsageError, match="gfx1151,gfx1201"):     # two profiles: no one group
        therock.family_for(("gfx1151", "gfx1201"))
    with pytest.raises(UsageError, match="not a version"):
        therock.resolve(_pins(version="ten"), ("gfx1201",), offline=True, cache_dir=tmp_path)


@pytest.mark.parametrize("listing", ["json", "s3", "html"])
def test_latest_reads_every_listing_format_and_sorts_by_version(tmp_path, repo, listing):
    with serve(repo, listing=listing, page_size=3) as srv:
        pins = _pins(version="latest", index_url=srv.url)
        got = therock.resolve(pins, ("gfx1201",), offline=False, cache_dir=tmp_path)
        # string order would say 9.2.0; 10.3.0 is only a -tests- tarball
        assert got["version"] == "10.1.0"
        assert got["url"] == srv.url + _name("10.1.0")
        assert therock.resolve(_pins(version="latest-rc", index_url=srv.url), ("gfx1201",),
                               offline=False, cache_dir=tmp_path)["version"] == "10.1.0rc2"
        if listing == "s3":
            assert any("continuation-token" in r["query"] for r in srv.log)   # followed the pages


def test_latest_nightly_needs_torch_wheels(tmp_path, repo):
    asked = []

    def has_torch(v: str) -> bool:
        asked.append(v)
        return v != "10.2.0a20260927"

    with serve(repo) as srv:
        got = therock.resolve(_pins(version="latest", channel="nightly", index_url=srv.url), ("gfx1201",),
                              offline=False, cache_dir=tmp_path, has_torch=has_torch)
        assert got["version"] == "10.2.0a20260926" and got["channel"] == "nightly"
        assert asked == ["10.2.0a20260927", "10.2.0a20260926"]
        with pytest.raises(InstallerError, match="with torch wheels"):
            therock.resolve(_pins(version="latest", channel="nightly", index_url=srv.url), ("gfx1201",),
                            offline=False, cache_dir=tmp_path, has_torch=lambda v: False)


def test_latest_offline_uses_the_cache(tmp_path, repo):
    cache = tmp_path / "cache"
    with serve(repo) as srv:
        with pytest.raises(InstallerError, match="in the cache"):
            therock.resolve(_pins(version="latest", index_url=srv.url), ("gfx1201",), offline=True,
                            cache_dir=cache)
        download.fetch(srv.url + _name("10.1.0"), cache_dir=cache)
        got = therock.resolve(_pins(version="latest", index_url=srv.url), ("gfx1201",), offline=True,
                              cache_dir=cache)
    assert got["version"] == "10.1.0"


def _ctx(prefix: Path, cache: Path, offline: bool = False) -> StepContext:
    return StepContext(name="therock", prefix=prefix, cache_dir=cache, work_dir=prefix / ".rdna4/work/therock",
                       log=prefix / ".rdna4/logs/therock.log", env={}, vars={}, archs=("gfx1201",), jobs=2,
                       offline=offline)


def test_install_step_unpacks_links_and_records_facts(tmp_path, repo):
    cache = tmp_path / "cache"
    with serve(repo) as srv:
        pins = _pins(index_url=srv.url)
        got = therock.resolve(pins, ("gfx1201",), offline=False, cache_dir=cache)
        assert srv.log == []      # an exact version resolves without the network
        ctx = _ctx(tmp_path / "p1", cache)
        therock.install_step(ctx, url=got["url"], version=got["version"])
        rocm = ctx.prefix / "rocm"
        assert os.readlink(rocm) == "rocm-10.1.0"
        assert (rocm / "llvm/bin/clang").is_file() and (rocm / "share/amd_smi").is_dir()
        digest = sha256_of(repo / _name("10.1.0"))
        assert ctx.facts["sha256"] == digest and ctx.facts["url"] == got["url"]
        assert ctx.facts["toolchain_version"] == "10.1.0" and ctx.facts["the_rock_commit"].startswith("89553ce")
        # a second prefix shares the cache: no new request
        ctx2 = _ctx(tmp_path / "p2", cache)
        therock.install_step(ctx2, url=got["url"], version="10.1.0", sha256=digest)
        assert len(srv.downloads(_name("10.1.0"))) == 1
        assert (ctx2.prefix / "rocm/bin/rocminfo").is_file()
    # and offline, with no server left
    ctx3 = _ctx(tmp_path / "p3", cache, offline=True)
    therock.install_step(ctx3, url=got["url"], version="10.1.0")
    assert ctx3.facts["sha256"] == digest


def test_unknown_version_lists_the_nearest(tmp_path, repo):
    with serve(repo) as srv:
        with pytest.raises(InstallerError) as err:
            therock.install_step(_ctx(tmp_path / "p", tmp_path / "c"),
                                 url=srv.url + _name("10.0.1"), version="10.0.1")
    assert "HTTP 404" in err.value.message
    assert "nearest available: 10.1.0, 10.0.0, 9.2.0, 7.13.0, 7.9.0;" in err.value.hint
    assert not (tmp_path / "p" / "rocm").exists()


def test_a_tree_without_the_layout_is_refused(tmp_path):
    bad = tmp_path / "srv" / _name("10.1.0")
    bad.parent.mkdir()
    import tarfile
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(__file__, arcname="./bin/rocminfo")
    with serve(bad.parent) as srv, pytest.raises(InstallerError, match="lacks bin/amd-smi"):
        therock.install_step(_ctx(tmp_path / "p", tmp_path / "c"), url=srv.url + bad.name, version="10.1.0")
    assert not (tmp_path / "p" / "rocm-10.1.0").exists()


def test_truncated_tarball_is_dropped_from_the_cache(tmp_path):
    srvdir = tmp_path / "srv"
    make_toolchain_tarball(srvdir / _name("10.1.0"), "10.1.0", pad_bytes=1 << 20, truncate=True)
    cache = tmp_path / "c"
    with serve(srvdir) as srv, pytest.raises(InstallerError, match="truncated") as err:
        therock.install_step(_ctx(tmp_path / "p", cache), url=srv.url + _name("10.1.0"), version="10.1.0")
    assert "rerun" in err.value.hint
    # neither the file nor its recorded hash is left: the rerun downloads it afresh
    assert download.recorded_sha256(srv.url + _name("10.1.0"), cache) is None
    assert list((cache / "downloads").glob("*/" + _name("10.1.0"))) == []
    assert not (tmp_path / "p" / "rocm-10.1.0").exists()


def test_rocm_that_is_a_real_directory_is_not_replaced(tmp_path, repo):
    prefix = tmp_path / "p"
    (prefix / "rocm").mkdir(parents=True)
    with serve(repo) as srv, pytest.raises(InstallerError, match="not a link"):
        therock.install_step(_ctx(prefix, tmp_path / "c"), url=srv.url + _name("10.1.0"), version="10.1.0")
    assert (prefix / "rocm").is_dir() and not (prefix / "rocm").is_symlink()


def test_parse_listing_formats():
    page = '<script>\n const files = [{"name": "therock-dist-linux-gfx120X-all-10.1.0.tar.gz", "mtime": 1}];\n'
    assert therock.parse_listing(page) == (["therock-dist-linux-gfx120X-all-10.1.0.tar.gz"], None)
    xml = ('<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>false'
           '</IsTruncated><Contents><Key>v5/rocm/core/tarball/a.tar.gz</Key></Contents></ListBucketResult>')
    assert therock.parse_listing(xml) == (["a.tar.gz"], None)
    assert therock.parse_listing('<a href="therock-dist-linux-x-1.0.dev0%2Babc.tar.gz">')[0] == \
        ["therock-dist-linux-x-1.0.dev0+abc.tar.gz"]


def test_latest_nightly_asks_the_torch_index_from_the_pins(tmp_path, repo):
    # the plan calls the resolver without a callback: the torch pins name the index to ask
    from index_fixtures import build_torch_stack, request_log, serve_index

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_torch_stack(wheels, rocm="10.2.0a20260926")   # torch exists for the 26th only
    pins = _pins(version="latest", channel="nightly")
    index = serve_index(wheels)
    with serve(repo) as srv:
        pins["therock"]["index_url"] = srv.url
        pins["torch"] = {"index_url": index, "python": "%d.%d" % sys.version_info[:2]}
        got = therock.resolve(pins, ("gfx1201",), offline=False, cache_dir=tmp_path)
    assert got["version"] == "10.2.0a20260926"
    # the 27th was tried first and refused; the torch page was still read only once
    assert [r for r in request_log(index) if r.startswith("GET") and "/torch/" in r] == \
        ["GET /simple/torch/"]
