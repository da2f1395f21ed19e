"""PREFIX/activate (bash, zsh, sh) and PREFIX/activate.fish.

Sourcing either file activates the prefix's venv and sets what the pinned
stack needs at run time on gfx1200/gfx1201; `rdna4_deactivate` puts back every
variable exactly as it was (unset stays unset). Sourcing again first undoes the
earlier activation, so nothing is ever added twice. The prefix is written into
the files as a quoted literal, so prefixes with spaces or quotes work.

The `write-activation` action reads (a `with` argument wins over an install
option, which wins over a pin):
  visible_devices          ROCR_VISIBLE_DEVICES value from detection
                           (detect.Detection.visible_devices); "" = all GPUs
  flash_attention_backend  "ck" | "triton" | "none"; default: the pin
                           flash-attention.backend
  gpu_count, peer_access   target GPUs and their P2P (multigpu.facts); with two or
                           more, the RCCL settings of multigpu.settings
  ray                      "true" when Ray is installed (`--with ray`): what vLLM's
                           Ray executor needs on ROCm
plus ctx.prefix, ctx.vars["venv"] / ctx.vars["rocm"] and ctx.archs.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import multigpu, proc, state, targetprofile, unifiedmem
from .errors import InstallerError

SH_FILE = "activate"
FISH_FILE = "activate.fish"
MEMORY_NOTE_WHY = ("# unified memory: what `rdna4-install verify` found wrong with torch's device memory,",
                   "# unless the sysfs values it was judged on have changed since (unifiedmem.record)")


@dataclass(frozen=True)
class Setting:
    name: str
    value: str | None      # None: the variable is unset while active
    why: str               # one line, written above it


@dataclass(frozen=True)
class Activation:
    prefix: Path
    venv: Path
    path_dirs: tuple[Path, ...]   # prepended to PATH, first wins
    settings: tuple[Setting, ...]
    archs: tuple[str, ...] = ()
    flash_attention_backend: str = "none"
    memory_note: Path | None = None   # an APU target: verify's device-memory verdict, shown on source

    @property
    def saved(self) -> tuple[str, ...]:
        """Every variable sourcing may change, so deactivation can put it back.

        The venv's own activate script touches PATH, PYTHONHOME and the
        VIRTUAL_ENV variables. PS1 is handled apart (sh only): it is a shell
        variable, usually not exported, and must stay that way.
        """
        own = tuple(s.name for s in self.settings)
        return ("PATH", "PYTHONHOME", "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT",
                "VIRTUAL_ENV_DISABLE_PROMPT") + own


def plan(prefix: Path, *, archs: tuple[str, ...], venv: Path | None = None,
         rocm: Path | None = None, visible_devices: str = "",
         flash_attention_backend: str = "none", gpu_count: int = 0, peer_access: str = "",
         ray: bool = False) -> Activation:
    """What the activation files set, each with the reason written beside it."""
    venv = venv or prefix / "venv"
    rocm = rocm or prefix / "rocm"
    backend = (flash_attention_backend or "none").lower()
    if backend not in ("ck", "triton", "none"):
        raise InstallerError(f"unknown flash-attention backend {flash_attention_backend!r}",
                             hint="use ck, triton or none (--set flash-attention.backend=...)")
    s: list[Setting] = [
        Setting("RDNA4_PREFIX", str(prefix),
                "marks this shell as activated; rdna4-install verify/bench default to it"),
        Setting("ROCM_PATH", str(rocm),
                "the TheRock toolchain of this prefix, for hipcc/clang and tools that look it up"),
        Setting("HIP_DEVICE_LIB_PATH", str(rocm / "lib" / "llvm" / "amdgcn" / "bitcode"),
                "TheRock keeps device bitcode under lib/llvm; without it clang reports "
                "'cannot find ROCm device library' (ROCm/ROCm#5773)"),
        Setting("PYTORCH_ROCM_ARCH", ";".join(archs),
                "extensions built in this shell (torch cpp_extension, pip builds) target only "
                "the installed arch"),
        Setting("HSA_OVERRIDE_GFX_VERSION", None,
                "an override left from another install would make ROCr report a different "
                "gfx target than the code objects were built for (ROCR-Runtime's HSA_OVERRIDE_GFX_VERSION)"),
    ]
    if visible_devices:
        s.append(Setting("ROCR_VISIBLE_DEVICES", visible_devices,
                         "shows only the target GPUs (found by detection); an iGPU or another "
                         "card would get work it has no code objects for"))
    s += multigpu.settings(gpu_count, peer_access, ray)
    s += [
        Setting("VLLM_ROCM_USE_AITER", "0",
                "AITER is built for CDNA (gfx942/gfx950) only in this stack; off is vLLM's "
                "default (vllm/envs.py:1267); an image that turned it on broke R9700 multi-node "
                "Ray serving (ROCm/ROCm#5656, #5567), and Ray workers inherit it from here"),
        Setting("HSA_NO_SCRATCH_RECLAIM", "1",
                "upstream's validated ROCm env sets it for RCCL (vLLM 0.33 "
                "docker/Dockerfile.rocm_base:56-57)"),
        Setting("HIP_FORCE_DEV_KERNARG", "1",
                "kernel arguments in device memory, upstream's performance setting "
                "(vLLM 0.33 docker/Dockerfile.rocm:1008-1009)"),
        Setting("PYTORCH_NVML_BASED_CUDA_CHECK", "1",
                "keeps torch.cuda.is_available() fork-safe for vLLM's workers "
                "(vLLM 0.33 docker/Dockerfile.rocm:1011-1012)"),
        Setting("SAFETENSORS_FAST_GPU", "1",
                "faster safetensors loading straight to the GPU "
                "(vLLM 0.33 docker/Dockerfile.rocm:1005-1006)"),
    ]
    if backend == "triton":
        s.append(Setting("FLASH_ATTENTION_TRITON_AMD_ENABLE", "TRUE",
                         "flash-attention was built with its Triton backend, which it only "
                         "uses when this is TRUE (Dao-AILab/flash-attention setup.py at 0251105a)"))
    elif backend == "ck":
        s.append(Setting("FLASH_ATTENTION_TRITON_AMD_ENABLE", "FALSE",
                         "flash-attention was built with CK kernels for this arch; TRUE from "
                         "another setup would switch it to the slower Triton path"))
    dirs = (rocm / "bin", rocm / "lib" / "llvm" / "bin")
    # LD_LIBRARY_PATH stays untouched on purpose: torch loads the HIP runtime
    # from the venv's rocm-sdk wheels, and a tarball lib dir first on the path
    # could load a second copy of it.
    # an APU's device memory needs torch to judge, far too slow for `source`: verify judges it
    # and leaves a failing verdict in the prefix, which sourcing only prints (a file test + cat)
    profile = targetprofile.of_archs(targetprofile.load_all(), archs)
    note = unifiedmem.note_path(prefix) if profile is not None and profile.unified_memory else None
    return Activation(prefix=prefix, venv=venv, path_dirs=dirs, settings=tuple(s), archs=archs,
                      flash_attention_backend=backend, memory_note=note)


def from_receipt(prefix: Path, *, archs: tuple[str, ...] | None = None,
                 visible_devices: str = "", receipt: Mapping[str, Any] | None = None) -> Activation:
    """The activation of an installed prefix, from its receipt (for verify and bench).

    Pass `receipt` when the caller has read it already.
    """
    if receipt is None:
        receipt = state.read_receipt(prefix) or {}
    archs = tuple(archs or receipt.get("archs") or ())
    if not archs:
        raise InstallerError(f"no target arch recorded in {prefix / state.RECEIPT}",
                             hint="pass --gpu-arch gfx1201 (or gfx1200)")
    fa_done = ((receipt.get("components") or {}).get("flash-attention") or {}).get("status") == "done"
    backend = ((receipt.get("pins") or {}).get("flash-attention") or {}).get("backend", "none")
    gpus = multigpu.recorded(receipt)
    return plan(prefix, archs=archs, visible_devices=visible_devices,
                flash_attention_backend=str(backend) if fa_done else "none",
                gpu_count=_count(gpus.get("gpu_count")), peer_access=gpus.get("peer_access", ""),
                ray=_ray_enabled(receipt))


def _count(value: Any) -> int:
    try:
        return max(int(str(value or "0")), 0)
    except ValueError:
        raise InstallerError(f"gpu_count must be a whole number, not {value!r}") from None


def _ray_enabled(receipt: Mapping[str, Any]) -> bool:
    # the pin the activation files were written with (`--with ray`)
    return str(((receipt.get("pins") or {}).get("ray") or {}).get("enabled", "")).lower() == "true"


def environment(act: Activation, *, inherit: bool = False) -> dict[str, str]:
    """What sourcing the activation gives a child process, built without a shell.

    By default on top of proc's allow-listed variables only (verify, bench); with
    `inherit` on top of the whole caller's environment, as an activated shell has it
    (`cluster`: Ray's workers need the user's NCCL_SOCKET_IFNAME, HF_HOME, ...).
    """
    env = proc.base_env({s.name: s.value for s in act.settings if s.value is not None},
                        allow=tuple(os.environ) if inherit else proc.ENV_ALLOW,
                        drop=[s.name for s in act.settings if s.value is None])
    env["VIRTUAL_ENV"] = str(act.venv)
    env["PATH"] = ":".join([str(act.venv / "bin"), *map(str, act.path_dirs), env.get("PATH", "")])
    return env


# --- rendering --------------------------------------------------------------------

def _sh(value: str | Path) -> str:
    return shlex.quote(str(value))


def _fish(value: str | Path) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _source_commands(act: Activation) -> tuple[str, str]:
    """The pasteable commands that activate the prefix: (bash/zsh/sh, fish)."""
    return ". " + _sh(act.prefix / SH_FILE), "source " + _fish(act.prefix / FISH_FILE)


def _header(shebang: str, shells: str, use: str) -> list[str]:
    return [shebang,
            f"# rdna4-install activation for {shells}; written by `rdna4-install`, edits are",
            f"# lost on the next install. Use it with:   {use}",
            "# and leave with:   rdna4_deactivate"]


def _no_venv_message(act: Activation) -> str:
    return f"rdna4: no venv at {act.venv}; rerun rdna4-install for this prefix"


def _setting_lines(act: Activation, quote, assign: str, remove: str) -> list[str]:
    """Each setting below its reason; `assign`/`remove` are the shell's command templates."""
    out: list[str] = []
    for st in act.settings:
        out.append(f"# {st.why}")
        out.append(remove.format(name=st.name) if st.value is None
                   else assign.format(name=st.name, value=quote(st.value)))
    return out


def render_sh(act: Activation) -> str:
    q = _sh
    sh_cmd, fish_cmd = _source_commands(act)
    out = _header("#!/bin/sh", "bash, zsh and sh", sh_cmd) + [
        "# shellcheck disable=SC1091  # the venv's activate is generated by uv",
        "",
        "# Only a sourced file can change the calling shell: refuse to run as a program.",
        'if [ -n "${ZSH_VERSION:-}" ]; then',
        '    case "${ZSH_EVAL_CONTEXT:-}" in *:file*) _rdna4_sourced=1 ;; *) _rdna4_sourced=0 ;; esac',
        'elif [ -n "${BASH_VERSION:-}" ]; then',
        "    if (return 0 2>/dev/null); then _rdna4_sourced=1; else _rdna4_sourced=0; fi",
        "else",
        "    # dash and other sh: $0 names this file only when it runs as a script",
        '    case "${0##*/}" in ' + SH_FILE + ") _rdna4_sourced=0 ;; *) _rdna4_sourced=1 ;; esac",
        "fi",
        'if [ "$_rdna4_sourced" = 0 ]; then',
        "    cat >&2 <<'RDNA4_EOF'",
        "this file changes the current shell, so source it instead of running it:",
        "    " + sh_cmd + "        (bash, zsh, sh)",
        "    " + fish_cmd + "   (fish)",
        "RDNA4_EOF",
        "    exit 1",
        "fi",
        "unset _rdna4_sourced",
        "",
        "# Sourcing again starts from a clean shell, so nothing is added twice.",
        "if command -v rdna4_deactivate >/dev/null 2>&1; then rdna4_deactivate; fi",
        "if [ ! -f " + q(act.venv / "bin" / "activate") + " ]; then",
        "    echo " + q(_no_venv_message(act)) + " >&2",
        "    return 1",
        "fi",
        "# Another venv is replaced the way its own activate script would, before saving.",
        'if [ -n "${VIRTUAL_ENV:-}" ] && command -v deactivate >/dev/null 2>&1; then',
        '    echo "rdna4: deactivating the venv at $VIRTUAL_ENV first" >&2',
        "    deactivate",
        "fi",
        "",
        "# Remember every variable this file may change (set or not) for rdna4_deactivate.",
    ]
    for name in act.saved + ("PS1",):
        out.append(f'if [ -n "${{{name}+x}}" ]; then _RDNA4_OLD_{name}=${name}; '
                   f"_RDNA4_HAD_{name}=1; else _RDNA4_HAD_{name}=0; fi")
    out += ["", "rdna4_deactivate() {",
            "    if [ \"${VIRTUAL_ENV:-}\" = " + q(act.venv) + " ] && command -v deactivate "
            ">/dev/null 2>&1; then deactivate; fi"]
    for name in act.saved:
        out.append(f'    if [ "${{_RDNA4_HAD_{name}:-0}}" = 1 ]; then {name}=$_RDNA4_OLD_{name}; '
                   f"export {name}; else unset {name}; fi")
        out.append(f"    unset _RDNA4_OLD_{name} _RDNA4_HAD_{name}")
    out += ["    # a plain assignment keeps PS1 exported or not, as it was",
            '    if [ "${_RDNA4_HAD_PS1:-0}" = 1 ]; then PS1=$_RDNA4_OLD_PS1; fi',
            "    unset _RDNA4_OLD_PS1 _RDNA4_HAD_PS1",
            "    hash -r 2>/dev/null || true",
            "    unset -f rdna4_deactivate",
            "}", "",
            ""]
    out.append("# the toolchain's bin (amd-smi, rocminfo) and lib/llvm/bin (clang) on PATH, behind the venv")
    for d in reversed(act.path_dirs):
        out += [f"_rdna4_dir={q(d)}",
                'case ":$PATH:" in *":$_rdna4_dir:"*) ;; *) PATH="$_rdna4_dir:$PATH" ;; esac']
    out += ["export PATH", "unset _rdna4_dir",
            "# The venv: its activate sets VIRTUAL_ENV and puts venv/bin first on PATH. Its",
            "# prompt code would export PS1, so the prompt is done here instead.",
            "VIRTUAL_ENV_DISABLE_PROMPT=1",
            ". " + q(act.venv / "bin" / "activate"),
            'if [ "$_RDNA4_HAD_VIRTUAL_ENV_DISABLE_PROMPT" = 1 ]; then '
            "VIRTUAL_ENV_DISABLE_PROMPT=$_RDNA4_OLD_VIRTUAL_ENV_DISABLE_PROMPT; "
            "else unset VIRTUAL_ENV_DISABLE_PROMPT; fi",
            'if [ -z "${VIRTUAL_ENV_DISABLE_PROMPT:-}" ] && [ "$_RDNA4_HAD_PS1" = 1 ]; then '
            'PS1="(rdna4) $PS1"; fi',
            ""]
    out += _setting_lines(act, q, "export {name}={value}", "unset {name}")
    if act.memory_note is not None:
        note = q(act.memory_note)
        out += [*MEMORY_NOTE_WHY,
                f"if [ -f {note} ]; then",
                "    _rdna4_same=1",
                '    while read -r _rdna4_then _rdna4_file && [ -n "$_rdna4_then" ]; do',
                '        [ "$(cat "$_rdna4_file" 2>/dev/null)" = "$_rdna4_then" ] || _rdna4_same=0',
                f"    done < {note}",
                f"    if [ \"$_rdna4_same\" = 1 ]; then grep '^rdna4: ' {note} >&2; "
                f"else echo {q(unifiedmem.STALE)} >&2; fi",
                "    unset _rdna4_same _rdna4_then _rdna4_file",
                "fi"]
    out += ["", "hash -r 2>/dev/null || true", ""]
    return "\n".join(out)


def render_fish(act: Activation) -> str:
    q = _fish
    sh_cmd, fish_cmd = _source_commands(act)
    out = _header("#!/usr/bin/env fish", "fish", fish_cmd) + [
        "",
        "# Only a sourced file can change the calling shell: refuse to run as a program.",
        "if not status stack-trace | string match -q -- '*from sourcing file*'",
        "    echo 'this file changes the current shell, so source it instead of running it:' >&2",
        "    echo " + q("    " + fish_cmd + "   (fish)") + " >&2",
        "    echo " + q("    " + sh_cmd + "        (bash, zsh, sh)") + " >&2",
        "    exit 1",
        "end",
        "",
        "# Sourcing again starts from a clean shell, so nothing is added twice.",
        "functions -q rdna4_deactivate; and rdna4_deactivate",
        "if not test -f " + q(act.venv / "bin" / "activate.fish"),
        "    echo " + q(_no_venv_message(act)) + " >&2",
        "    return 1",
        "end",
        "# Another venv is replaced the way its own activate script would, before saving.",
        "if set -q VIRTUAL_ENV; and functions -q deactivate",
        '    echo "rdna4: deactivating the venv at $VIRTUAL_ENV first" >&2',
        "    deactivate",
        "end",
        "",
        "# Remember every variable this file may change (set or not) for rdna4_deactivate.",
    ]
    for name in act.saved:  # fish has no PS1; the venv wraps and restores fish_prompt
        out.append(f"if set -q {name}; set -g _rdna4_old_{name} ${name}; set -g _rdna4_had_{name} 1; "
                   f"else; set -g _rdna4_had_{name} 0; end")
    out += ["", "function rdna4_deactivate --description 'undo the rdna4-install activation'",
            "    if test \"$VIRTUAL_ENV\" = " + q(act.venv) + "; and functions -q deactivate",
            "        deactivate",
            "    end"]
    for name in act.saved:
        out += [f"    if test \"$_rdna4_had_{name}\" = 1; set -gx {name} $_rdna4_old_{name}; "
                f"else; set -e {name}; end",
                f"    set -e _rdna4_old_{name}; set -e _rdna4_had_{name}"]
    out += ["    functions -e rdna4_deactivate",
            "end", "",
            ""]
    out.append("# the toolchain's bin (amd-smi, rocminfo) and lib/llvm/bin (clang) on PATH, behind the venv")
    for d in reversed(act.path_dirs):
        out.append(f"contains -- {q(d)} $PATH; or set -gx PATH {q(d)} $PATH")
    out += ["# The venv: its activate sets VIRTUAL_ENV and puts venv/bin first on PATH.",
            "source " + q(act.venv / "bin" / "activate.fish"),
            ""]
    out += _setting_lines(act, q, "set -gx {name} {value}", "set -e {name}")
    if act.memory_note is not None:
        note = q(act.memory_note)
        out += [*MEMORY_NOTE_WHY,
                f"if test -f {note}",
                "    set -l _rdna4_same 1",
                "    while read -l _rdna4_then _rdna4_file; and test -n \"$_rdna4_then\"",
                "        set -l _rdna4_now (cat $_rdna4_file 2>/dev/null)",
                "        test \"$_rdna4_now\" = \"$_rdna4_then\"; or set _rdna4_same 0",
                f"    end < {note}",
                "    if test $_rdna4_same = 1",
                f"        grep '^rdna4: ' {note} >&2",
                "    else",
                f"        echo {q(unifiedmem.STALE)} >&2",
                "    end",
                "end"]
    # `set -e` of an unset variable leaves status 4 behind; sourcing must report
    # success, or `source .../activate.fish; and cmd` never runs cmd
    out += ["true", ""]
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o755)  # executable only so running it prints how to source it
    os.replace(tmp, path)


def write(act: Activation) -> list[Path]:
    act.prefix.mkdir(parents=True, exist_ok=True)
    paths = [act.prefix / SH_FILE, act.prefix / FISH_FILE]
    _write(paths[0], render_sh(act))
    _write(paths[1], render_fish(act))
    return paths


def _pick(key: str, kw: Mapping[str, Any], options: Mapping[str, Any], fallback: Any) -> Any:
    for source in (kw, options):
        if source.get(key) not in (None, ""):
            return source[key]
    return fallback


def write_step(ctx: Any, **kw: Any) -> None:
    """Action `write-activation`: write PREFIX/activate and PREFIX/activate.fish."""
    known = {"visible_devices", "flash_attention_backend", "gpu_count", "peer_access", "ray"}
    unknown = set(kw) - known
    if unknown:
        raise InstallerError(f"write-activation: unknown argument {sorted(unknown)[0]!r}",
                             hint=f"known: {', '.join(sorted(known))}")
    options = ctx.options or {}
    vars_ = ctx.vars or {}
    gpus = {"gpu_count": str(_count(_pick("gpu_count", kw, options, 0))),
            "peer_access": str(_pick("peer_access", kw, options, ""))}
    act = plan(
        Path(ctx.prefix), archs=tuple(ctx.archs),
        venv=Path(vars_["venv"]) if vars_.get("venv") else None,
        rocm=Path(vars_["rocm"]) if vars_.get("rocm") else None,
        visible_devices=str(_pick("visible_devices", kw, options, "")),
        flash_attention_backend=str(_pick("flash_attention_backend", kw, options,
                                          vars_.get("flash-attention.backend", "none"))),
        gpu_count=int(gpus["gpu_count"]), peer_access=gpus["peer_access"],
        ray=str(_pick("ray", kw, options, vars_.get("ray.enabled", "false"))).lower() == "true",
    )
    paths = write(act)
    ctx.facts["activate"] = {"files": [str(p) for p in paths],
                             "settings": {s.name: s.value for s in act.settings},
                             # what multigpu.recorded gives back to reruns without detection
                             "multigpu": gpus}
    if getattr(ctx, "ui", None) is not None:
        ctx.ui.detail(f"wrote {paths[0]} and {paths[1].name}")
