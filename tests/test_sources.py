"""fetch-git / fetch-sdist against local git repos and a locally made sdist."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from build_fixtures import (
    fa_like_repo,
    git,
    make_ctx,
    triton_like_repo,
    vllm_like_sdist,
)

from installer import sources
from installer.errors import InstallerError, RecipeError, UsageError
from installer.recipes import Source


def ctx_for(tmp_path: Path, name: str, source: Source, prefix: str = "p1", **kw):
    return make_ctx(tmp_path, name, prefix=tmp_path / prefix, rocm=tmp_path / "rocm",
                    venv=tmp_path / prefix / "venv", cache=tmp_path / "cache", source=source, **kw)


def test_fetch_git_checks_out_the_pinned_commit_with_recorded_submodules(tmp_path):
    repo, sha, subs = fa_like_repo(tmp_path / "up" / "flash-attention")
    ctx = ctx_for(tmp_path, "flash-attention", Source(kind="git", url=str(repo), commit=sha))
    src = sources.fetch_git(ctx, submodules=["csrc/composable_kernel", "third_party/aiter"])

    assert git("rev-parse", "HEAD", cwd=src) == sha
    assert git("rev-parse", "--is-shallow-repository", cwd=src) == "true"
    for path in ("csrc/composable_kernel", "third_party/aiter"):
        assert git("rev-parse", "HEAD", cwd=src / path) == subs[path]
    # not asked for: the CUDA-only submodule stays empty
    assert not any((src / "csrc" / "cutlass").iterdir())
    status = git("submodule", "status", "--", "csrc/composable_kernel", "third_party/aiter", cwd=src)
    # "-" = not initialised, "+" = at another commit than recorded
    assert status and not any(line.startswith(("-", "+", "U")) for line in status.splitlines()), status
    assert ctx.facts["source"]["submodules"] == {k: subs[k] for k in ("csrc/composable_kernel",
                                                                       "third_party/aiter")}
    assert (tmp_path / "cache" / "git").is_dir()


def test_submodule_update_in_the_tree_needs_no_upstream(tmp_path):
    """flash-attention's setup.py runs `git submodule update --init`: it must be a no-op."""
    repo, sha, _ = fa_like_repo(tmp_path / "up" / "flash-attention")
    ctx = ctx_for(tmp_path, "flash-attention", Source(kind="git", url=str(repo), commit=sha))
    src = sources.fetch_git(ctx, submodules=["csrc/composable_kernel"])
    shutil.rmtree(tmp_path / "up")
    subprocess.run(["git", "submodule", "update", "--init", "csrc/composable_kernel"], cwd=src,
                   check=True, capture_output=True)
    assert (src / "csrc/composable_kernel/example/ck_tile/01_fmha/generate.py").is_file()


def test_second_prefix_is_served_from_the_mirror_cache(tmp_path):
    repo, sha, subs = fa_like_repo(tmp_path / "up" / "flash-attention")
    source = Source(kind="git", url=str(repo), commit=sha)
    first = ctx_for(tmp_path, "flash-attention", source)
    sources.fetch_git(first, submodules=["csrc/composable_kernel"])
    assert first.facts["source"]["from_cache"] is False
    shutil.rmtree(tmp_path / "up")  # upstream gone: only the cache can serve it now

    second = ctx_for(tmp_path, "flash-attention", source, prefix="p2", offline=True)
    src = sources.fetch_git(second, submodules=["csrc/composable_kernel"])
    assert second.facts["source"]["from_cache"] is True
    assert git("rev-parse", "HEAD", cwd=src / "csrc/composable_kernel") == subs["csrc/composable_kernel"]


def test_offline_without_a_cached_commit_fails_with_a_hint(tmp_path):
    repo, sha = triton_like_repo(tmp_path / "up" / "triton")
    ctx = ctx_for(tmp_path, "triton-kernels", Source(kind="git", url=str(repo), commit=sha), offline=True)
    with pytest.raises(InstallerError, match="offline") as err:
        sources.fetch_git(ctx)
    assert "without --offline" in err.value.hint


def test_commit_must_be_a_full_sha(tmp_path):
    repo, sha = triton_like_repo(tmp_path / "up" / "triton")
    ctx = ctx_for(tmp_path, "triton-kernels", Source(kind="git", url=str(repo), commit=sha[:12]))
    with pytest.raises(RecipeError, match="full 40-character SHA"):
        sources.fetch_git(ctx)


def test_unknown_submodule_names_what_exists(tmp_path):
    repo, sha, _ = fa_like_repo(tmp_path / "up" / "flash-attention")
    ctx = ctx_for(tmp_path, "flash-attention", Source(kind="git", url=str(repo), commit=sha))
    with pytest.raises(RecipeError, match="no submodule at 'csrc/nope'") as err:
        sources.fetch_git(ctx, submodules=["csrc/nope"])
    assert "csrc/composable_kernel" in err.value.hint


def test_sparse_checkout_keeps_only_the_named_folder(tmp_path):
    repo, sha = triton_like_repo(tmp_path / "up" / "triton")
    ctx = ctx_for(tmp_path, "triton-kernels", Source(kind="git", url=str(repo), commit=sha))
    src = sources.fetch_git(ctx, sparse=["python/triton_kernels"])
    assert (src / "python/triton_kernels/triton_kernels/matmul.py").is_file()
    assert not (src / "python/triton/big_file.py").exists()


@pytest.mark.parametrize("url", ["http://example.com/x.git", "git://example.com/x.git",
                                 "ssh://git@example.com/x.git"])
def test_only_https_or_local_git_urls(tmp_path, url):
    ctx = ctx_for(tmp_path, "x", Source(kind="git", url=url, commit="a" * 40))
    with pytest.raises(UsageError, match="refusing"):
        sources.fetch_git(ctx)


@pytest.mark.parametrize("url", ["https://github.com/ROCm/triton.git", "https://h/../../etc/x",
                                 "/tmp/../..", "https://github.com/a/b/"])
def test_mirror_dir_stays_inside_the_cache(tmp_path, url):
    got = sources.mirror_dir(tmp_path, url)
    assert got.parent == tmp_path / "git"
    assert got.name.endswith(".git") and got.name not in (".git", "..git")


def test_fetch_sdist_verifies_and_strips_the_top_dir(tmp_path):
    archive = vllm_like_sdist(tmp_path / "up")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    ctx = ctx_for(tmp_path, "vllm", Source(kind="url", url=str(archive), sha256=digest))
    (ctx.src_dir / "stale").mkdir(parents=True)    # a rerun's old tree is replaced, not merged
    src = sources.fetch_sdist(ctx)
    assert src == ctx.src_dir
    assert (src / "setup.py").is_file() and (src / "tools/use_existing_torch.py").is_file()
    assert not (src / "stale").exists()
    assert ctx.facts["source"]["sha256"] == digest


def test_fetch_sdist_refuses_a_wrong_sha256(tmp_path):
    archive = vllm_like_sdist(tmp_path / "up")
    ctx = ctx_for(tmp_path, "vllm", Source(kind="url", url=str(archive), sha256="0" * 64))
    with pytest.raises(InstallerError, match="sha256 mismatch"):
        sources.fetch_sdist(ctx)
    assert not ctx.src_dir.exists()


def test_fetch_sdist_needs_a_pinned_sha256(tmp_path):
    archive = vllm_like_sdist(tmp_path / "up")
    ctx = ctx_for(tmp_path, "vllm", Source(kind="url", url=str(archive)))
    with pytest.raises(RecipeError, match="sha256"):
        sources.fetch_sdist(ctx)


def test_an_unsafe_sdist_is_dropped_from_the_cache_and_never_recorded(tmp_path):
    """Unpacking is part of accepting a download: a pinned sdist whose tarball
    is unsafe is refused, removed from the cache, and the hint reruns it."""
    import tarfile

    from installer import download
    from therock_fixtures import _add

    archive = tmp_path / "up" / "vllm-0.33.0.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tf:
        _add(tf, "vllm-0.33.0/setup.py", b"print('x')\n")
        _add(tf, "vllm-0.33.0/../../evil.py", b"pwned\n")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    ctx = ctx_for(tmp_path, "vllm", Source(kind="url", url=str(archive), sha256=digest))
    with pytest.raises(InstallerError, match="refusing member") as err:
        sources.fetch_sdist(ctx)
    assert "removed from the cache" in err.value.hint and "rdna4-install run vllm" in err.value.hint
    assert not ctx.src_dir.exists() and not (tmp_path / "evil.py").exists()
    assert not (tmp_path / "cache" / "downloads" / digest).exists()
    assert download.recorded_sha256(str(archive), tmp_path / "cache") is None
