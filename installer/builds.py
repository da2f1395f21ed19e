"""Wheel builds for the target arch: build (or reuse), install, and check the code objects.

Actions: "build-wheel", "install-wheel", "check-code-objects". A build runs
with the env from buildenv.build_env, shows ninja's [N/M] lines as a progress
bar with an ETA, sends all output to the recipe's log, and stores its wheel in
the wheel cache; a later prefix with the same build fingerprint installs that
wheel and compiles nothing.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from . import buildenv, codeobjects, proc, wheelcache
from .errors import InstallerError, RecipeError, command
from .pyenv import check_index_url, guarded_install, site_packages

NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
KINDS = ("vllm", "flash-attention")

# Requirements the TheRock torch stack already provides: reinstalling them from a
# requirements file would swap the ROCm builds for PyPI/AMD-index ones (vLLM's
# requirements/build/rocm.txt pins torch 2.12+rocm7.14 and triton 3.7.1).
STACK_PACKAGES = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "amdsmi"}


class NinjaProgress:
    """Turns ninja's "[N/M] ..." lines into a progress bar with an ETA.

    vLLM builds several CMake targets one after the other; each restarts the
    counter, so a smaller N or a new M starts a new phase with a fresh rate.
    """

    def __init__(self, ui: Any, desc: str, every: float = 30.0, clock=time.monotonic):
        self.ui, self.desc, self.every, self.clock = ui, desc, every, clock
        self.bar = None
        self.done = self.total = 0
        self._t0 = self._n0 = 0.0
        self._last_report = 0.0

    def eta(self) -> float | None:
        elapsed = self.clock() - self._t0
        built = self.done - self._n0
        if built <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / built

    def on_line(self, line: str) -> None:
        m = NINJA_STEP.match(line)
        if not m:
            return
        n, total = int(m.group(1)), int(m.group(2))
        if total != self.total or n < self.done:
            self._t0, self._n0 = self.clock(), n - 1
        self.done, self.total = n, total
        if self.ui is None:
            return
        if self.bar is None:
            self.bar = self.ui.progress(total, self.desc, unit="steps")
            self.bar.__enter__()
        self.bar.update_to(n, total)  # tqdm shows the ETA on a terminal
        now = self.clock()
        if not getattr(self.ui, "is_tty", False) and now - self._last_report >= self.every:
            self._last_report = now
            eta = self.eta()
            left = f", about {_duration(eta)} left" if eta is not None else ""
            self.ui.info(f"    {self.desc}: {n}/{total} ({100 * n // max(total, 1)}%){left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


# --- installing into the venv ---------------------------------------------------

def without_stack(req: Path) -> Path:
    """A copy of a requirements file, beside it (so `-r ../x.txt` still resolves), minus the torch stack."""
    keep = []
    for line in req.read_text().splitlines():
        stripped = line.strip()
        name = re.match(r"[A-Za-z0-9._-]+", stripped)
        if stripped.startswith(("--extra-index-url", "--index-url", "-i ")):
            continue  # the stack's indexes are pyenv's business
        if name and canonicalize_name(name.group(0)) in STACK_PACKAGES:
            continue
        keep.append(line)
    out = req.with_name(req.stem + ".rdna4" + req.suffix)
    out.write_text("\n".join(keep) + "\n")
    return out


def prepare_vllm(ctx, env: dict[str, str]) -> None:
    """use_existing_torch --prefix, the build requirements, then requirements/rocm.txt."""
    src, python = ctx.src_dir, ctx.vars["python"]
    # tools/ since vLLM ~0.2x; the top level before that
    tool = next((p for p in (src / "tools" / "use_existing_torch.py", src / "use_existing_torch.py")
                 if p.is_file()), None)
    if tool is None:
        raise InstallerError(f"{ctx.name}: the source has no use_existing_torch.py",
                             hint="is the pinned version older than this installer supports?")
    ctx.run([python, tool, "--prefix"], cwd=src, env=env, what="use_existing_torch.py --prefix")
    build_req = next((p for p in (src / "requirements" / "build" / "rocm.txt",
                                  src / "requirements" / "rocm-build.txt") if p.is_file()), None)
    if build_req is not None:
        guarded_install(ctx, ["-r", str(without_stack(build_req))], env=env)
    runtime = src / "requirements" / "rocm.txt"
    if runtime.is_file():
        guarded_install(ctx, ["-r", str(without_stack(runtime))], env=env)


# --- the build ---------------------------------------------------------------------

def _venv_identity(ctx) -> dict[str, str]:
    code = ("import sys, importlib.metadata as m\n"
            "def v(n):\n    try: return m.version(n)\n    except Exception: return ''\n"
            "print(sys.version.split()[0]); print(v('torch')); print(v('triton'))")
    got = proc.capture([ctx.vars["python"], "-c", code], env=ctx.env, timeout=60)
    if not got.ok:
        raise InstallerError(f"{ctx.name}: the venv python does not run ({ctx.vars['python']})",
                             hint=command(ctx.prefix, "run", "torch", "--force"))
    py, torch, triton = (got.stdout.splitlines() + ["", "", ""])[:3]
    return {"python": py, "torch": torch, "triton": triton}


def _compiler_banner(cxx: str, env: dict[str, str]) -> str:
    """First line of `CXX --version`: a compiler upgrade makes another wheel."""
    got = proc.capture([cxx, "--version"], env=env, timeout=60)
    return (got.stdout.splitlines() or [""])[0].strip() if got.ok else ""


def build_key(ctx, kind: str, backend: str, env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    source = ctx.source.identity() if getattr(ctx, "source", None) is not None else {}
    if not source:
        source = {k: v for k, v in (ctx.facts.get("source") or {}).items() if k != "from_cache"}
    paths = {name: ctx.vars.get(name, "") for name in ("src", "work", "venv", "rocm", "cache", "prefix")}
    pins = {k: v for k, v in ctx.vars.items()
            if "." in k and k.split(".", 1)[0] in (ctx.name, "torch", "therock", "triton-kernels")}
    parts = {
        "recipe": ctx.name, "kind": kind, "backend": backend, "source": source,
        "patches": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ctx.patches},
        "archs": list(ctx.archs), "pins": pins, "venv": _venv_identity(ctx),
        "env": wheelcache.symbolic_env(env, paths),
        "host_compiler": ctx.facts.get("host_compiler", {}),
    }
    return wheelcache.fingerprint(parts), parts


def arch_env(ctx, kind: str, *, rust_frontend: bool = False, triton_kernels: str = "",
             host_compiler: str = "system") -> dict[str, str]:
    jobs = buildenv.max_jobs(kind, override=ctx.jobs or None)
    env = buildenv.build_env(
        ctx.env, ctx.archs, rocm=Path(ctx.vars["rocm"]), kind=kind, jobs=jobs,
        venv=Path(ctx.vars["venv"]), src=ctx.src_dir, version=ctx.vars.get("_version", ""),
        triton_kernels=Path(triton_kernels) if triton_kernels else None,
        rust_frontend=rust_frontend, ccache_dir=Path(ctx.cache_dir) / "ccache",
        host_compiler=host_compiler or "system", shim_dir=Path(ctx.work_dir) / "hipcc-shim")
    ctx.facts["host_compiler"] = {"kind": host_compiler or "system", "cc": env["CC"], "cxx": env["CXX"],
                                  "version": _compiler_banner(env["CXX"], env)}
    return env


def build_wheel(ctx, kind: str = "", backend: str = "ck", triton_kernels: str = "",
                editable: bool | None = None, rust_frontend: bool | None = None,
                host_compiler: str = "system") -> Path | None:
    """Action "build-wheel": reuse the cached wheel for this fingerprint, or build it."""
    kind = kind or ctx.name
    if kind not in KINDS:
        raise RecipeError(f"{ctx.name}: build-wheel kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "vllm" and triton_kernels and not Path(triton_kernels).is_dir():
        raise InstallerError(f"{ctx.name}: TRITON_KERNELS_SRC_DIR {triton_kernels} does not exist",
                             hint=command(ctx.prefix, "run", "triton-kernels", "--force"))
    if isinstance(editable, str):  # from a recipe placeholder: "true" / "false" / ""
        editable = editable.lower() in ("1", "true", "yes") if editable else None
    editable = bool(ctx.options.get("editable") if editable is None else editable) and kind == "vllm"
    rust = bool(ctx.options.get("rust_frontend") if rust_frontend is None else rust_frontend)
    env = arch_env(ctx, kind, rust_frontend=rust, triton_kernels=triton_kernels, host_compiler=host_compiler)
    if kind == "flash-attention" and backend == "triton":
        # the one build that wants the Triton switch: no CK, a pure-Python wheel.
        # Its setup.py runs `python -m pip install third_party/aiter`; uv venvs have no pip.
        env[buildenv.FA_TRITON_SWITCH] = "TRUE"
        if not proc.capture([ctx.vars["python"], "-m", "pip", "--version"], env=env, timeout=60).ok:
            guarded_install(ctx, ["pip"], env=env)
    ctx.facts.update({"backend": backend, "max_jobs": int(env["MAX_JOBS"]), "archs": list(ctx.archs)})

    if editable:
        prepare_vllm(ctx, env)
        guarded_install(ctx, ["--no-build-isolation", "-e", str(ctx.src_dir)], env=env)
        ctx.facts["editable"] = str(ctx.src_dir)
        ctx.keep_work = True  # the editable install points into the source tree
        return None

    key, parts = build_key(ctx, kind, backend, env)
    ctx.facts["build_fingerprint"] = key
    hit = wheelcache.lookup(ctx.cache_dir, ctx.name, key)
    if hit is not None:
        ctx.facts.update({"wheel": str(hit), "wheel_cache": "hit"})
        if ctx.ui is not None:
            ctx.ui.detail(f"reusing the wheel built for this fingerprint: {hit.name}")
        return hit

    if kind == "vllm":
        prepare_vllm(ctx, env)
    dist = ctx.work_dir / "dist"
    progress = NinjaProgress(ctx.ui, f"compiling {ctx.name}")
    uv = ctx.vars.get("uv") or "uv"
    try:
        ctx.run([uv, "build", "--wheel", "--no-build-isolation", "--python", ctx.vars["python"],
                 "--out-dir", str(dist), str(ctx.src_dir)],
                cwd=ctx.src_dir, env=env, on_line=progress.on_line, what=f"{ctx.name} wheel build")
    finally:
        progress.close()
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallerError(f"{ctx.name}: the build produced {len(wheels)} wheels in {dist}, expected 1")
    stored = wheelcache.store(ctx.cache_dir, ctx.name, key, wheels[0], parts)
    ctx.facts.update({"wheel": str(stored), "wheel_cache": "stored"})
    return stored


def install_wheel(ctx) -> None:
    """Action "install-wheel": the wheel build-wheel left in ctx.facts (skipped for --editable)."""
    if ctx.facts.get("editable"):
        return
    wheel = ctx.facts.get("wheel")
    if not wheel or not Path(wheel).is_file():
        raise RecipeError(f"{ctx.name}: install-wheel needs a build-wheel step before it")
    guarded_install(ctx, ["--reinstall-package", _dist_name(Path(wheel)), str(wheel)])


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0]


# --- checking the code objects ----------------------------------------------------

def check_code_objects(ctx, required: Sequence[str] = (), scan: str = "") -> dict[str, list[str]]:
    """Action "check-code-objects": each `required` glob (relative to site-packages)
    matches a .so with code objects for exactly the target archs, and every other
    .so under `scan` that carries code objects has exactly those archs too."""
    # an editable install imports (and so loads extensions) from the source tree
    site = Path(ctx.facts["editable"]) if ctx.facts.get("editable") else site_packages(Path(ctx.vars["venv"]))
    want = set(ctx.archs)
    results: dict[str, list[str]] = {}
    files: list[tuple[Path, bool]] = []
    for pattern in required:
        hits = sorted(site.glob(pattern))
        if not hits:
            hint = ("a Triton-only build has no CK extension: was FLASH_ATTENTION_TRITON_AMD_ENABLE set?"
                    if "flash_attn_2_cuda" in pattern else f"look for compile errors in {ctx.log}")
            raise InstallerError(f"{ctx.name}: no {pattern} in {site}: the compiled extension is missing",
                                 hint=hint)
        files += [(h, True) for h in hits]
    if scan:
        seen = {f for f, _ in files}
        files += [(f, False) for f in sorted((site / scan).rglob("*.so")) if f not in seen]
    for path, must in files:
        rel = str(path.relative_to(site))
        try:
            archs = codeobjects.archs_in(path)
        except OSError as exc:
            raise InstallerError(f"{ctx.name}: cannot read {rel}: {exc.strerror or exc}",
                                 hint=f"check the file's permissions: {path}") from None
        except (codeobjects.Malformed, codeobjects.Unreadable) as exc:
            raise InstallerError(f"{ctx.name}: {exc.message}", hint=exc.hint or
                                 f"a damaged file? reinstall it: {ctx.rerun_command('--force')}") from None
        if not archs and not must:
            continue  # host-only helper library
        if archs != want:
            missing, extra = sorted(want - archs), sorted(archs - want)
            detail = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                           f"unexpected {', '.join(extra)}" if extra else "") if x)
            raise InstallerError(f"{ctx.name}: {rel} has code objects for {', '.join(sorted(archs)) or 'no GPU'} "
                                 f"({detail})",
                                 hint="the arch pin did not reach the compiler; see the env at the top of "
                                      f"{ctx.log}")
        results[rel] = sorted(archs)
    ctx.facts["code_objects"] = results
    return results


def pip_install_step(ctx, packages: str | Sequence[str], index_url: str = "") -> None:
    """Action "pip-install": exact requirements into the venv, under the torch-stack guard.

    `uv venv` makes a venv without setuptools or pip, and --no-build-isolation
    builds use the venv as their build environment, so the build tools must be
    installed first, pinned like everything else. `index_url` names the index
    (a pin, so a mirror can replace it); without it uv's default (PyPI) answers.
    """
    items = packages.split() if isinstance(packages, str) else list(packages)
    loose = [p for p in items if "==" not in p]
    if loose:
        raise RecipeError(f"{ctx.name}: pip-install wants exact pins (name==version), not {loose[0]!r}")
    index = ["--default-index", check_index_url(index_url, f"{ctx.name}.index_url")] if index_url else []
    guarded_install(ctx, index + items)
