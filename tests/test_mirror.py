"""The mirror seam (installer/mirror.py): rules, checks, and every kind of URL through it."""

from __future__ import annotations

import pytest
from build_fixtures import fa_like_repo, git, make_ctx
from click.testing import CliRunner
from therock_fixtures import make_toolchain_tarball, serve, sha256_of

from installer import download, mirror, sources
from installer.cli import cli
from installer.errors import InstallerError, UsageError
from installer.recipes import Source

NAME = "therock-dist-linux-gfx120X-all-10.2.0.dev0+abc.tar.gz"


@pytest.fixture(autouse=True)
def no_mirror():
    mirror.use(None)
    yield
    mirror.use(None)


def write(tmp_path, body: str, name: str = "mirror.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_longest_prefix_wins_and_relative_paths_follow_the_file(tmp_path):
    (tmp_path / "usb" / "git").mkdir(parents=True)
    path = write(tmp_path / "usb", '[rewrite]\n'
                 '"https://github.com/" = "git/"\n'
                 '"https://github.com/ROCm/" = "https://mirror.example/rocm-git/"\n'
                 '"https://pypi.org/simple" = "http://127.0.0.1:3141/simple"\n'
                 '"https://repo.example/t/" = "file:///srv/t/"\n')
    m = mirror.load(path)
    assert m.rewrite("https://github.com/ROCm/triton.git") == "https://mirror.example/rocm-git/triton.git"
    assert m.rewrite("https://github.com/Dao-AILab/flash-attention.git") == \
        f"{tmp_path}/usb/git/Dao-AILab/flash-attention.git"
    assert m.rewrite("https://pypi.org/simple/cmake/") == "http://127.0.0.1:3141/simple/cmake/"
    # a local target has the file's real name (URLs carry %2B for TheRock dev versions)
    assert m.rewrite("https://repo.example/t/a%2Bb.tar.gz") == "/srv/t/a+b.tar.gz"
    assert m.rewrite("https://elsewhere.example/x") == "https://elsewhere.example/x"
    mirror.use(m)
    assert mirror.index_url("https://pypi.org/simple") == "http://127.0.0.1:3141/simple"
    assert mirror.index_url("https://github.com/x/") == (tmp_path / "usb" / "git" / "x").as_uri() + "/"


@pytest.mark.parametrize("body, words", [
    ('[rewrite]\n"https://github.com/" = "http://mirror.example/git/"\n', ["refusing", "https"]),
    ('[rewrite]\n"https://github.com/" = "ftp://mirror.example/git/"\n', ["refusing"]),
    ('[rewrite]\n"https://github.com/" = ""\n', ["non-empty string"]),
    ('[rewrites]\n"https://github.com/" = "/srv/git/"\n', ["expected one [rewrite] table", "rewrites"]),
    ('[rewrite\n', ["not valid TOML"]),
])
def test_a_bad_mirror_file_is_refused_naming_the_file(tmp_path, body, words):
    path = write(tmp_path, body)
    with pytest.raises(UsageError) as err:
        mirror.load(path)
    assert str(path) in err.value.message and err.value.hint
    for word in words:
        assert word in err.value.message + err.value.hint


def test_downloads_come_from_the_mirror_but_keep_the_upstream_identity(tmp_path):
    tarball = make_toolchain_tarball(tmp_path / "usb" / "core" / "tarball" / NAME, "10.2.0")
    upstream = "https://therock.example/rocm/core/tarball/" + NAME.replace("+", "%2B")
    mirror.use(mirror.load(write(tmp_path, '[rewrite]\n"https://therock.example/rocm/" = "usb/"\n')))
    cache = tmp_path / "cache"
    got = download.fetch(upstream, cache_dir=cache)
    assert got.sha256 == sha256_of(tarball) and not got.from_cache
    # recorded under the upstream URL: the same file from another mirror is the same file
    assert download.recorded_sha256(upstream, cache) == got.sha256
    # and still checked against a pin
    with pytest.raises(InstallerError, match="sha256 mismatch"):
        download.fetch(upstream, cache_dir=tmp_path / "cache2", sha256="0" * 64)


def test_a_mirror_over_http_serves_the_file_and_the_listing(tmp_path):
    from installer import therock

    tarball = make_toolchain_tarball(tmp_path / "srv" / "elsewhere" / NAME, "10.2.0")
    with serve(tmp_path / "srv") as srv:
        mirror.use(mirror.load(write(tmp_path, f'[rewrite]\n"https://therock.example/rocm/core/tarball/" = '
                                               f'"{srv.url}elsewhere/"\n')))
        versions = therock.list_versions("https://therock.example/rocm/core/tarball/", "gfx120X-all")
        assert [str(v) for v, _ in versions] == ["10.2.0.dev0+abc"]
        got = download.fetch("https://therock.example/rocm/core/tarball/" + NAME, cache_dir=tmp_path / "c")
        assert got.sha256 == sha256_of(tarball)
        assert [r["path"] for r in srv.log] == ["elsewhere/", f"elsewhere/{NAME}"]


def test_git_remotes_and_their_submodules_go_through_the_mirror(tmp_path):
    repo, sha, subs = fa_like_repo(tmp_path / "usb" / "git" / "Dao-AILab" / "flash-attention")
    mirror.use(mirror.load(write(tmp_path, '[rewrite]\n"https://github.com/" = "usb/git/"\n')))
    url = "https://github.com/Dao-AILab/flash-attention"
    ctx = make_ctx(tmp_path, "flash-attention", prefix=tmp_path / "p", rocm=tmp_path / "rocm",
                   venv=tmp_path / "p" / "venv", cache=tmp_path / "cache",
                   source=Source(kind="git", url=url, commit=sha))
    src = sources.fetch_git(ctx, submodules=["csrc/composable_kernel"])
    assert git("rev-parse", "HEAD", cwd=src / "csrc" / "composable_kernel") == subs["csrc/composable_kernel"]
    assert ctx.facts["source"]["url"] == url, "the upstream URL is what is recorded"
    # the cache is keyed by the upstream URL, not the mirror's path
    assert sources.mirror_dir(tmp_path / "cache", url).is_dir()


def test_a_local_only_mirror_never_reaches_past_itself(tmp_path):
    with serve(tmp_path) as srv:
        m = mirror.load(write(tmp_path, '[rewrite]\n"https://github.com/" = "git/"\n'), local_only=True)
        mirror.use(m)
        assert mirror.rewrite("https://github.com/a/b") == f"{tmp_path}/git/a/b"
        with pytest.raises(InstallerError, match="is not in") as err:
            download.fetch(srv.url + "mirror.toml", cache_dir=tmp_path / "cache")
        assert err.value.hint and srv.log == [], "refused before any request"


def test_plan_verbose_shows_where_each_url_is_read_from(tmp_path, exact_pins):
    path = write(tmp_path, '[rewrite]\n"https://github.com/" = "https://git.lab.example/gh/"\n'
                           '"https://stable.repo.amd.com/" = "/srv/amd/"\n')
    result = CliRunner().invoke(cli, ["plan", "-v", "--gpu-arch", "gfx1201", "--prefix", str(tmp_path / "p"),
                                      "--cache-dir", str(tmp_path / "c"), "--mirror", str(path)])
    assert result.exit_code == 0, result.output
    assert "source url = https://github.com/Dao-AILab/flash-attention.git  " \
           "(via https://git.lab.example/gh/Dao-AILab/flash-attention.git)" in result.output
    assert "pin torch.index_url = https://stable.repo.amd.com/rocm/whl-next/  (via /srv/amd/rocm/whl-next/)" \
        in result.output
    # the mirror is not part of any fingerprint
    plain = CliRunner().invoke(cli, ["plan", "--json", "--gpu-arch", "gfx1201", "--prefix", str(tmp_path / "p"),
                                     "--cache-dir", str(tmp_path / "c")])
    mirrored = CliRunner().invoke(cli, ["plan", "--json", "--gpu-arch", "gfx1201", "--prefix",
                                        str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c"),
                                        "--mirror", str(path)])
    assert plain.output == mirrored.output


def test_ls_remote_asks_the_mirror_for_an_upstream_url(tmp_path):
    # tag -> commit at plan time (vllm.source = git) and pins check read refs through the same seam
    repo, sha, _ = fa_like_repo(tmp_path / "usb" / "git" / "Dao-AILab" / "flash-attention")
    git("tag", "v9.9.9", cwd=repo)
    mirror.use(mirror.load(write(tmp_path, '[rewrite]\n"https://github.com/" = "usb/git/"\n')))
    refs = sources.ls_remote("https://github.com/Dao-AILab/flash-attention", "refs/tags/v9.9.9")
    assert refs == {"refs/tags/v9.9.9": sha}
