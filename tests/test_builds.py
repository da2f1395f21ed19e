"""Tiny real builds (setuptools -> CMake -> ninja -> fake ROCm clang) through the actions."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from build_fixtures import (
    compiler_calls,
    fa_like_repo,
    fake_rocm,
    make_ctx,
    make_venv,
    triton_like_repo,
    vllm_like_sdist,
)
from codeobject_fixtures import bundle, ccob, ids_for, make_so, needs_elf, padded, undecodable_zstd_ccob

from installer import builds, codeobjects, sources
from installer.errors import InstallerError
from installer.recipes import Source
from installer.ui import UI


class Env:
    """Upstreams, a fake toolchain and a shared cache; one prefix per call to ctx()."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.rocm = fake_rocm(tmp / "rocm")
        self.cache = tmp / "cache"
        self.tk_repo, self.tk_sha = triton_like_repo(tmp / "up" / "triton")
        self.sdist = vllm_like_sdist(tmp / "up")
        self.sdist_sha = hashlib.sha256(self.sdist.read_bytes()).hexdigest()

    def ctx(self, name: str, prefix: str, source: Source, **kw):
        p = self.tmp / prefix
        venv = p / "venv"
        if not venv.exists():
            make_venv(venv)
        return make_ctx(self.tmp, name, prefix=p, rocm=self.rocm, venv=venv, cache=self.cache,
                        source=source, **kw)

    def install_vllm(self, prefix: str, **kw):
        tk = self.ctx("triton-kernels", prefix, Source(kind="git", url=str(self.tk_repo), commit=self.tk_sha))
        sources.fetch_git(tk, sparse=["python/triton_kernels"])
        ctx = self.ctx("vllm", prefix, Source(kind="url", url=str(self.sdist), sha256=self.sdist_sha),
                       version="0.33.0", **kw)
        sources.fetch_sdist(ctx)
        builds.build_wheel(ctx, kind="vllm",
                           triton_kernels=str(tk.src_dir / "python/triton_kernels/triton_kernels"))
        builds.install_wheel(ctx)
        return ctx


def site(ctx) -> Path:
    return next(Path(ctx.vars["venv"]).glob("lib/python*/site-packages"))


@pytest.fixture
def world(tmp_path) -> Env:
    return Env(tmp_path)


def test_vllm_build_gets_the_pins_and_carries_exactly_the_target(world):
    ctx = world.install_vllm("p1")
    calls = compiler_calls(world.rocm)
    device = [c for c in calls if "--offload-arch=gfx1201" in c["argv"]]
    assert len(device) == 6  # 3 sources x (_C, _rocm_C); cumem_allocator is host-only
    assert all(c["env"]["PYTORCH_ROCM_ARCH"] == "gfx1201" for c in calls)
    assert not any("--offload-arch" in a and a != "--offload-arch=gfx1201" for c in calls for a in c["argv"])

    seen = json.loads((site(ctx) / "vllm" / "_build_env.json").read_text())
    assert seen["VLLM_TARGET_DEVICE"] == "rocm" and seen["SETUPTOOLS_SCM_PRETEND_VERSION"] == "0.33.0"
    assert seen["TRITON_KERNELS_SRC_DIR"].endswith("python/triton_kernels/triton_kernels")
    # host code from the system compiler, device code from the toolchain (buildenv)
    assert seen["CC"] == shutil.which("cc") and seen["HIP_CLANG_PATH"] == str(world.rocm / "lib/llvm/bin")
    assert ctx.facts["host_compiler"]["kind"] == "system" and ctx.facts["host_compiler"]["version"]
    assert (site(ctx) / "vllm/third_party/triton_kernels/matmul.py").is_file()
    # use_existing_torch --prefix ran, and the build requirements lost the stack and AMD's index
    assert (ctx.src_dir / "use_existing_torch.ran").is_file()
    build_req = (ctx.src_dir / "requirements/build/rocm.rdna4.txt").read_text()
    assert "-r ../common.txt" in build_req
    assert not any(w in build_req for w in ("torch", "triton", "amdsmi", "extra-index-url"))
    assert "[4/4] Linking C shared module" in ctx.log.read_text()

    got = builds.check_code_objects(ctx, required=["vllm/_C*.so", "vllm/_rocm_C*.so"], scan="vllm")
    assert sorted(got) == sorted(str(p.relative_to(site(ctx))) for p in (site(ctx) / "vllm").glob("_*C.*.so"))
    assert set(map(tuple, got.values())) == {("gfx1201",)}


def test_second_prefix_installs_the_cached_wheel_and_compiles_nothing(world):
    first = world.install_vllm("p1")
    assert first.facts["wheel_cache"] == "stored"
    ran = len(compiler_calls(world.rocm))
    second = world.install_vllm("p2")
    assert second.facts["wheel_cache"] == "hit"
    assert second.facts["build_fingerprint"] == first.facts["build_fingerprint"]
    assert len(compiler_calls(world.rocm)) == ran
    assert list((site(second) / "vllm").glob("_rocm_C*.so"))


def test_another_target_arch_is_another_fingerprint(world):
    first = world.install_vllm("p1")
    other = world.install_vllm("p2", archs=("gfx1200",))
    assert other.facts["wheel_cache"] == "stored"
    assert other.facts["build_fingerprint"] != first.facts["build_fingerprint"]


def test_a_wrong_arch_in_the_binaries_fails_loudly(world):
    ctx = world.install_vllm("p1")
    ctx.archs = ("gfx1200", "gfx1201")
    with pytest.raises(InstallerError, match="missing gfx1200") as err:
        builds.check_code_objects(ctx, required=["vllm/_C*.so"], scan="vllm")
    assert "arch pin did not reach the compiler" in err.value.hint


def test_flash_attention_ck_build_without_the_triton_switch(world, tmp_path):
    repo, sha, _ = fa_like_repo(tmp_path / "up" / "fa" / "flash-attention")
    ctx = world.ctx("flash-attention", "p1", Source(kind="git", url=str(repo), commit=sha))
    ctx.env["FLASH_ATTENTION_TRITON_AMD_ENABLE"] = "TRUE"  # as the seed Dockerfile had it
    sources.fetch_git(ctx, submodules=["csrc/composable_kernel"])
    shutil.rmtree(tmp_path / "up" / "fa")  # setup.py's `git submodule update` must not need upstream
    builds.build_wheel(ctx, kind="flash-attention", backend="ck")
    # the CK build needs no aiter: it was never fetched
    assert not any((ctx.src_dir / "third_party/aiter").iterdir())
    builds.install_wheel(ctx)
    seen = json.loads((site(ctx) / "flash_attn" / "_build_env.json").read_text())
    assert seen["FLASH_ATTENTION_TRITON_AMD_ENABLE"] is None
    assert seen["GPU_ARCHS"] == "gfx1201" and seen["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert builds.check_code_objects(ctx, required=["flash_attn_2_cuda*.so"]) == {
        next(p.name for p in site(ctx).glob("flash_attn_2_cuda*.so")): ["gfx1201"]}


def test_missing_ck_extension_is_named(world):
    ctx = world.ctx("flash-attention", "p1", None)
    with pytest.raises(InstallerError, match="flash_attn_2_cuda") as err:
        builds.check_code_objects(ctx, required=["flash_attn_2_cuda*.so"])
    assert "Triton-only" in err.value.hint


@needs_elf
def test_compressed_bundles_are_read_without_the_toolchain(tmp_path, monkeypatch):
    # vLLM 0.33 builds _rocm_C with --offload-compress; the check decodes the
    # bundles itself, so a toolchain without clang-offload-bundler is fine
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "no-rocm",
                   venv=make_venv(tmp_path / "p" / "venv"), cache=tmp_path / "cache")
    vllm = site(ctx) / "vllm"
    make_so(vllm / "_rocm_C.abi3.so", ccob(bundle(ids_for("gfx1201")), version=3), tmp_path)
    make_so(vllm / "cumem_allocator.abi3.so", None, tmp_path)
    assert builds.check_code_objects(ctx, required=["vllm/_rocm_C*.so"], scan="vllm") == {
        "vllm/_rocm_C.abi3.so": ["gfx1201"]}

    make_so(vllm / "_moe_C.abi3.so", padded(ccob(bundle(ids_for("gfx942")))), tmp_path)
    with pytest.raises(InstallerError, match=r"vllm/_moe_C.abi3.so has code objects for gfx942 "
                                             r"\(missing gfx1201; unexpected gfx942\)"):
        builds.check_code_objects(ctx, required=["vllm/_rocm_C*.so"], scan="vllm")

    # a zstd bundle on a host with no zstd decoder at all: say what to install
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", ())
    make_so(vllm / "_moe_C.abi3.so", undecodable_zstd_ccob(), tmp_path)
    with pytest.raises(InstallerError, match="vllm: _moe_C.abi3.so: .*no zstd decoder") as err:
        builds.check_code_objects(ctx, required=["vllm/_rocm_C*.so"], scan="vllm")
    assert "install zstd" in err.value.hint


def test_ninja_progress_eta_and_phases():
    now = [0.0]
    seen = []

    class FakeUI(UI):
        def info(self, msg):
            seen.append(msg)

    p = builds.NinjaProgress(FakeUI(), "compiling", every=0, clock=lambda: now[0])
    for n in range(1, 11):
        now[0] = n * 2.0
        p.on_line(f"[{n}/40] Building HIP object x{n}.o")
    assert p.eta() == pytest.approx(60.0, rel=0.15)  # 30 steps left at ~2 s each
    p.on_line("[1/5] next target")  # a new CMake target restarts the count
    assert (p.done, p.total) == (1, 5)
    p.on_line("not a ninja line")
    p.close()
    assert any("10/40 (25%)" in m and "left" in m for m in seen)


def test_jobs_come_from_the_option_else_from_memory(tmp_path):
    from installer import buildenv

    rocm = fake_rocm(tmp_path / "rocm")
    ctx = make_ctx(tmp_path, "flash-attention", prefix=tmp_path / "p", rocm=rocm, venv=tmp_path / "venv",
                   cache=tmp_path / "cache")
    assert builds.arch_env(ctx, "flash-attention")["MAX_JOBS"] == str(buildenv.max_jobs("flash-attention"))
    ctx.jobs = 1  # --jobs 1 (within what any host can run)
    assert builds.arch_env(ctx, "flash-attention")["MAX_JOBS"] == "1"
    ctx.jobs = 10000  # more than the host can run: capped
    assert builds.arch_env(ctx, "flash-attention")["MAX_JOBS"] == str(buildenv.jobs_cap("flash-attention"))


def test_a_toolchain_without_hipcc_builds_flash_attention_through_the_replacement(world, tmp_path):
    # a TheRock release after the hipcc shim is gone: amdclang++ is the documented replacement
    (world.rocm / "bin" / "hipcc").unlink()
    (world.rocm / "bin" / "amdclang++").symlink_to(world.rocm / "lib/llvm/bin/clang++")
    repo, sha, _ = fa_like_repo(tmp_path / "up" / "fa" / "flash-attention")
    ctx = world.ctx("flash-attention", "p1", Source(kind="git", url=str(repo), commit=sha))
    sources.fetch_git(ctx, submodules=["csrc/composable_kernel"])
    builds.build_wheel(ctx, kind="flash-attention", backend="ck")
    device = [c for c in compiler_calls(world.rocm) if "--offload-arch=gfx1201" in c["argv"]]
    assert device, "the CK sources reached the toolchain's compiler"
    assert all(f"--hip-path={world.rocm}" in c["argv"] and
               f"--hip-device-lib-path={world.rocm / 'lib/llvm/amdgcn/bitcode'}" in c["argv"] for c in device)
    assert all(c["argv"][0].endswith("amdclang++") for c in device)
    shim = Path(device[0]["env"]["ROCM_HOME"])
    assert shim.is_relative_to(ctx.work_dir), "the replacement lives in the work dir"
    assert (shim / "lib").resolve() == (world.rocm / "lib").resolve(), "everything else is the real tree"
    assert not (world.rocm / "bin" / "hipcc").exists(), "the toolchain tree is never written to"


def test_pip_install_refuses_a_plain_http_index_before_running_anything(tmp_path):
    from installer.actions import StepContext
    from installer.errors import UsageError

    ctx = StepContext(name="ray", prefix=tmp_path / "p", cache_dir=tmp_path, work_dir=tmp_path,
                      log=tmp_path / "log", env={}, vars={}, archs=("gfx1201",), jobs=1)
    with pytest.raises(UsageError, match="ray.index_url must be an https URL"):
        builds.pip_install_step(ctx, "ray==2.56.1", index_url="http://mirror.example/simple")
    assert not (tmp_path / "log").exists()


@needs_elf
@pytest.mark.parametrize("carried, words", [
    (("gfx1201", "gfx1100"), "unexpected gfx1100"),          # the target plus an extra arch
    (("gfx1100",), "missing gfx1201; unexpected gfx1100"),
])
def test_check_code_objects_wants_exactly_the_target(tmp_path, carried, words):
    venv = tmp_path / "p" / "venv"
    site = venv / "lib" / "python3.12" / "site-packages"
    make_so(site / "vllm" / "_C.abi3.so", bundle(ids_for("gfx1201")), tmp_path)
    make_so(site / "vllm" / "_moe_C.abi3.so", ccob(bundle(ids_for(*carried))), tmp_path)
    ctx = make_ctx(tmp_path, "vllm", prefix=tmp_path / "p", rocm=tmp_path / "rocm", venv=venv,
                   cache=tmp_path / "cache")
    with pytest.raises(InstallerError, match=words) as err:
        builds.check_code_objects(ctx, required=["vllm/_C*.so"], scan="vllm")
    assert "_moe_C.abi3.so" in err.value.message
    make_so(site / "vllm" / "_moe_C.abi3.so", ccob(bundle(ids_for("gfx1201"))), tmp_path)
    assert builds.check_code_objects(ctx, required=["vllm/_C*.so"], scan="vllm") == {
        "vllm/_C.abi3.so": ["gfx1201"], "vllm/_moe_C.abi3.so": ["gfx1201"]}
