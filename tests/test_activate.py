"""Activation scripts, sourced by real shells over a real uv venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from installer import activate, actions
from installer.actions import StepContext
from installer.errors import InstallerError
from installer.proc import find_uv
from installer.recipes import load_recipe

REPO = Path(__file__).resolve().parent.parent
SH_SHELLS = [s for s in ("bash", "dash", "zsh") if shutil.which(s)]
HAS_FISH = shutil.which("fish") is not None
# variables a shell sets on its own; they say nothing about the activation
NOISE = ("_", "SHLVL", "PWD", "OLDPWD")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    # a space and a quote: the files must quote the prefix for both shells
    root = tmp_path_factory.mktemp("act") / "my rdna4 'prefix'"
    root.mkdir()
    subprocess.run([find_uv(), "venv", "-q", "--python", sys.executable, str(root / "venv")],
                   check=True, env={**os.environ, "UV_NO_CONFIG": "1"})
    return root


def _write(prefix: Path, **kw) -> activate.Activation:
    act = activate.plan(prefix, archs=("gfx1201",), **kw)
    activate.write(act)
    return act


def _env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and key not in NOISE:
            out[key] = value
    return out


def _session(shell: str, script: str, prefix: Path, extra_env: dict[str, str] | None = None):
    """Run `script` in `shell` with $1 = prefix; it prints env dumps between @@ markers."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], **(extra_env or {})}
    if shell == "fish":
        argv = ["fish", "--no-config", "-c", script, str(prefix)]
    else:
        argv = [shell, "-c", script, "sh", str(prefix)]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [_env(part) for part in res.stdout.split("@@\n")[:-1]], res


SH_ROUNDTRIP = """
dump() { env; echo @@; }
dump
. "$1/activate"; dump
. "$1/activate"; dump
rdna4_deactivate; dump
if command -v rdna4_deactivate >/dev/null 2>&1; then echo "function left behind" >&2; exit 3; fi
"""

FISH_ROUNDTRIP = """
function dump; env; echo @@; end
dump
source $argv[1]/activate.fish; dump
source $argv[1]/activate.fish; dump
rdna4_deactivate; dump
if functions -q rdna4_deactivate; echo "function left behind" >&2; exit 3; end
"""

BEFORE = {"ROCM_PATH": "/opt/rocm-old", "HSA_OVERRIDE_GFX_VERSION": "11.0.0",
          "ROCR_VISIBLE_DEVICES": "", "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE"}


def _check_active(env: dict[str, str], prefix: Path, backend_value: str) -> None:
    venv, rocm = prefix / "venv", prefix / "rocm"
    assert env["VIRTUAL_ENV"] == str(venv)
    assert env["PATH"].split(":")[:4] == [str(venv / "bin"), str(rocm / "bin"),
                                          str(rocm / "lib" / "llvm" / "bin"), "/usr/bin"]
    assert env["ROCM_PATH"] == str(rocm)
    assert env["HIP_DEVICE_LIB_PATH"] == str(rocm / "lib/llvm/amdgcn/bitcode")
    assert env["ROCR_VISIBLE_DEVICES"] == "GPU-81ba7e079f6f7889"
    assert env["PYTORCH_ROCM_ARCH"] == "gfx1201"
    assert env["RDNA4_PREFIX"] == str(prefix)
    assert env["VLLM_ROCM_USE_AITER"] == "0"
    assert env["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == backend_value
    assert "HSA_OVERRIDE_GFX_VERSION" not in env


@pytest.mark.parametrize("shell", SH_SHELLS)
def test_sourcing_sets_everything_once_and_deactivate_restores(shell, prefix):
    _write(prefix, visible_devices="GPU-81ba7e079f6f7889", flash_attention_backend="ck")
    before, once, twice, after = _session(shell, SH_ROUNDTRIP, prefix, BEFORE)[0]
    _check_active(once, prefix, "FALSE")
    assert twice == once
    assert after == before
    assert after["ROCR_VISIBLE_DEVICES"] == ""           # set-but-empty stays set
    assert after["HSA_OVERRIDE_GFX_VERSION"] == "11.0.0"
    assert "VIRTUAL_ENV" not in after and "PS1" not in after


# a shell that already carries its own RCCL/Ray choices: all of them must come back
MULTI_BEFORE = {"NCCL_PROTO": "LL", "CUDA_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "7"}
TWO = "GPU-1a2b3c4d5e6f7081,GPU-2b3c4d5e6f708192"   # the two cards; the iGPU hidden


@pytest.mark.parametrize("shell", SH_SHELLS + (["fish"] if HAS_FISH else []))
@pytest.mark.parametrize("gpus, p2p, ray, want", [
    (1, "", False, {"NCCL_PROTO": "LL", "NCCL_P2P_DISABLE": None}),
    (2, "yes", False, {"NCCL_PROTO": "Simple", "NCCL_P2P_DISABLE": None}),
    (2, "no", False, {"NCCL_PROTO": "Simple", "NCCL_P2P_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "1"}),
    (2, "no", True, {"NCCL_PROTO": "Simple", "NCCL_P2P_DISABLE": "1", "HIP_VISIBLE_DEVICES": "0,1",
                     "CUDA_VISIBLE_DEVICES": None, "RAY_USAGE_STATS_ENABLED": "0"}),
])
def test_multi_gpu_and_ray_settings_apply_and_deactivate_restores(shell, prefix, gpus, p2p, ray, want):
    _write(prefix, visible_devices=TWO, gpu_count=gpus, peer_access=p2p, ray=ray)
    script = FISH_ROUNDTRIP if shell == "fish" else SH_ROUNDTRIP
    before, once, twice, after = _session(shell, script, prefix, MULTI_BEFORE)[0]
    assert once["ROCR_VISIBLE_DEVICES"] == TWO
    for name, value in want.items():
        assert once.get(name) == value, name
    assert twice == once
    assert after == before and after["NCCL_PROTO"] == "LL" and "NCCL_P2P_DISABLE" not in after


@pytest.mark.skipif(not HAS_FISH, reason="fish is not installed")
def test_fish_sets_everything_once_and_deactivate_restores(prefix):
    _write(prefix, visible_devices="GPU-81ba7e079f6f7889", flash_attention_backend="triton")
    before, once, twice, after = _session("fish", FISH_ROUNDTRIP, prefix, BEFORE)[0]
    _check_active(once, prefix, "TRUE")
    assert twice == once
    assert after == before


@pytest.mark.parametrize("shell", SH_SHELLS)
def test_prompt_is_prefixed_and_stays_unexported(shell, prefix):
    _write(prefix)
    script = ('PS1="x> "; . "$1/activate"; printf "%s|" "$PS1"; env | grep -c "^PS1=" || true; '
              'rdna4_deactivate; printf "%s\\n" "$PS1"')
    res = subprocess.run([shell, "-c", script, "sh", str(prefix)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert res.stdout.split("\n")[:2] == ["(rdna4) x> |0", "x> "], res.stderr


@pytest.mark.parametrize("how", [s for s in SH_SHELLS] + ["exec"])
def test_running_instead_of_sourcing_prints_how_to_source(how, prefix):
    _write(prefix)
    path = prefix / "activate"
    argv = [str(path)] if how == "exec" else [how, str(path)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    assert "source it instead of running it" in res.stderr
    # the printed command works when pasted: it is the shell-quoted path
    pasted = res.stderr.splitlines()[1].split("(bash")[0].strip()
    check = subprocess.run(["bash", "-c", pasted + ' && printf "%s" "$VIRTUAL_ENV"'],
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert check.stdout == str(prefix / "venv")


@pytest.mark.skipif(not HAS_FISH, reason="fish is not installed")
def test_running_fish_file_prints_how_to_source(prefix):
    _write(prefix)
    res = subprocess.run(["fish", "--no-config", str(prefix / "activate.fish")],
                         capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 1 and "source it instead of running it" in res.stderr
    # the printed fish command works when pasted: it is the fish-quoted path
    pasted = res.stderr.splitlines()[1].split("(fish)")[0].strip()
    check = subprocess.run(["fish", "--no-config", "-c", pasted + '; and printf "%s" "$VIRTUAL_ENV"'],
                           capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert check.stdout == str(prefix / "venv"), check.stderr


def test_environment_matches_what_sourcing_gives(prefix, monkeypatch):
    """verify and bench start children with environment(), not through the file."""
    act = _write(prefix, visible_devices="GPU-81ba7e079f6f7889", flash_attention_backend="triton")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "11.0.0")
    built = activate.environment(act)
    sourced = _session("bash", '. "$1/activate"; env; echo @@', prefix,
                       {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"})[0][0]
    for name in ("PATH", "VIRTUAL_ENV", *(s.name for s in act.settings)):
        assert built.get(name) == sourced.get(name), name


def test_another_active_venv_is_deactivated_first(prefix, tmp_path):
    other = tmp_path / "other"
    subprocess.run([find_uv(), "venv", "-q", "--python", sys.executable, str(other)], check=True)
    _write(prefix)
    script = ('. "$2/bin/activate"; . "$1/activate"; printf "%s\\n" "$VIRTUAL_ENV"; '
              'rdna4_deactivate; printf "[%s] %s\\n" "${VIRTUAL_ENV:-}" "$PATH"')
    res = subprocess.run(["bash", "-c", script, "sh", str(prefix), str(other)],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert res.stdout.splitlines() == [str(prefix / "venv"), "[] /usr/bin:/bin"]
    assert f"deactivating the venv at {other}" in res.stderr


def test_missing_venv_fails_without_touching_the_shell(tmp_path):
    bare = tmp_path / "no venv here"
    activate.write(activate.plan(bare, archs=("gfx1201",)))
    res = subprocess.run(["bash", "-c", '. "$1/activate"; echo "rc=$? ${ROCM_PATH:-unset}"', "sh",
                          str(bare)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.stdout.strip() == "rc=1 unset"
    assert "no venv at" in res.stderr


def test_flash_attention_variable_follows_the_backend(tmp_path):
    def settings(backend):
        return {s.name: s.value for s in
                activate.plan(tmp_path, archs=("gfx1201",), flash_attention_backend=backend).settings}

    assert settings("triton")["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == "TRUE"
    assert settings("ck")["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == "FALSE"
    assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in settings("none")
    assert "ROCR_VISIBLE_DEVICES" not in settings("none")  # nothing to hide: leave it alone
    with pytest.raises(InstallerError, match="flash-attention backend"):
        settings("cuda")


def test_every_setting_has_a_one_line_reason(tmp_path):
    act = _write(tmp_path, visible_devices="0", flash_attention_backend="triton")
    sh = (tmp_path / "activate").read_text()
    fish = (tmp_path / "activate.fish").read_text()
    for s in act.settings:
        assert s.why and "\n" not in s.why
        assert f"# {s.why}\n" in sh and f"# {s.why}\n" in fish


@pytest.mark.skipif(shutil.which("shellcheck") is None and not (Path(sys.executable).parent / "shellcheck").exists(),
                    reason="shellcheck not installed")
def test_sh_file_passes_shellcheck_as_posix_sh(tmp_path):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    root = tmp_path / "with space"
    _write(root, visible_devices="GPU-1,GPU-2", flash_attention_backend="ck")
    res = subprocess.run([shellcheck, "-s", "sh", str(root / "activate")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _ctx(prefix: Path, **options) -> StepContext:
    return StepContext(name="activate", prefix=prefix, cache_dir=prefix / "cache",
                       work_dir=prefix / "work", log=prefix / "log", env={},
                       vars={"venv": str(prefix / "venv"), "rocm": str(prefix / "rocm"),
                             "flash-attention.backend": "ck"},
                       archs=("gfx1200", "gfx1201"), jobs=1, options=options)


def test_recipe_step_runs_the_registered_action(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "activate.toml")
    (step,) = recipe.steps
    fn = actions.lookup(step.action)
    ctx = _ctx(tmp_path)
    from installer.recipes import interpolate

    args = interpolate(dict(step.args), {"flash-attention.backend": "triton", "visible_devices": "GPU-aa",
                                         "gpu_count": "2", "peer_access": "no", "ray.enabled": "true"},
                       "activate.toml")
    fn(ctx, **args)
    text = (tmp_path / "activate").read_text()
    assert "export ROCR_VISIBLE_DEVICES=GPU-aa\n" in text
    assert "export FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE\n" in text
    assert "export PYTORCH_ROCM_ARCH='gfx1200;gfx1201'\n" in text
    assert os.access(tmp_path / "activate.fish", os.X_OK)
    assert ctx.facts["activate"]["settings"]["ROCR_VISIBLE_DEVICES"] == "GPU-aa"
    assert "export NCCL_P2P_DISABLE=1\n" in text and "export HIP_VISIBLE_DEVICES=0,1\n" in text
    assert ctx.facts["activate"]["multigpu"] == {"gpu_count": "2", "peer_access": "no"}
    # without a `with` value the pin decides
    fn(_ctx(tmp_path))
    assert "export FLASH_ATTENTION_TRITON_AMD_ENABLE=FALSE\n" in (tmp_path / "activate").read_text()


def test_unknown_action_argument_is_an_error(tmp_path):
    with pytest.raises(InstallerError, match="unknown argument 'shell'"):
        activate.write_step(_ctx(tmp_path), shell="bash")


@pytest.mark.parametrize("shell", SH_SHELLS + (["fish"] if HAS_FISH else []))
def test_toolchain_dirs_already_on_path_are_not_added_twice(shell, prefix):
    _write(prefix, flash_attention_backend="ck")
    rocm_bin = str(prefix / "rocm" / "bin")
    start = f"/usr/bin:{rocm_bin}:/bin"
    script = FISH_ROUNDTRIP if shell == "fish" else SH_ROUNDTRIP
    before, once, twice, after = _session(shell, script, prefix, {"PATH": start})[0]
    assert once["PATH"].split(":").count(rocm_bin) == 1
    assert once["PATH"].split(":").count(str(prefix / "rocm" / "lib" / "llvm" / "bin")) == 1
    assert twice == once and after["PATH"] == start


@pytest.mark.parametrize("shell", SH_SHELLS + (["fish"] if HAS_FISH else []))
def test_an_apu_prefix_repeats_verifys_memory_verdict_when_sourced(shell, prefix):
    """Sourcing imports no torch: it prints the failing verdict `verify` left (unifiedmem.record)."""
    from installer import unifiedmem

    script = ("source $argv[1]/activate.fish; echo @@" if shell == "fish"
              else '. "$1/activate"; echo @@')
    verdict = "torch reports 0.5 GiB device memory: the BIOS carve-out; --kv-cache-memory-bytes 16G"
    try:
        activate.write(activate.plan(prefix, archs=("gfx1151",)))
        assert "verify found" not in _session(shell, script, prefix)[1].stderr   # no verdict yet
        sysfs = prefix.parent / "sysfs-pages_limit"      # a watched file, as verify records it
        sysfs.write_text("16469033\n")
        unifiedmem.record(prefix, verdict, [sysfs])
        err = _session(shell, script, prefix)[1].stderr
        assert f"rdna4: verify found: {verdict}" in err and "rerun `rdna4-install verify`" in err
        assert "16469033" not in err and unifiedmem.STALE not in err
        sysfs.write_text("32505856\n")                   # the user raised the TTM limit since
        err = _session(shell, script, prefix)[1].stderr
        assert unifiedmem.STALE in err and "verify found" not in err
        sysfs.unlink()                                    # gone (another kernel): stale as well
        assert unifiedmem.STALE in _session(shell, script, prefix)[1].stderr
        unifiedmem.record(prefix, verdict)                # nothing to watch: the verdict stands
        assert "verify found" in _session(shell, script, prefix)[1].stderr
        _write(prefix)                                   # an RDNA4 prefix never looks
        assert "verify found" not in _session(shell, script, prefix)[1].stderr
        assert "device-memory" not in (prefix / "activate").read_text()
        shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
        apu = prefix.parent / "apu with space"
        activate.write(activate.plan(apu, archs=("gfx1151",)))
        res = subprocess.run([shellcheck, "-s", "sh", str(apu / "activate")], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stdout
    finally:
        unifiedmem.record(prefix, None)
        _write(prefix)
