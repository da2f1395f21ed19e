"""A local stand-in for every upstream the installer talks to, for end-to-end runs.

`build_world(root)` makes, on disk and on loopback servers:
- a TheRock directory (JSON listing) with a generated gfx120X-all toolchain tarball
  whose clang/clang++/hipcc are scripts that compile with the host compiler and
  stamp amdgcn-amd-amdhsa--<arch> ids into the objects (build_fixtures.FAKE_CLANG);
- a PEP 503 index with TheRock-shaped rocm/torch/triton wheels, and a decoy
  "PyPI" offering a CUDA-style torch with a higher version;
- local git repos shaped like flash-attention (with CK/aiter submodules) and
  ROCm triton, and a vLLM-shaped release sdist served over HTTP;
- a copy of the real recipes/ with a pins file pointing at all of the above,
  and a vLLM patch that applies to the fake sdist.
Build tools (setuptools, cmake, ninja) come from the real PyPI through uv, as in
a real install, so tests using this are marked `network`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from build_fixtures import ARCH_VARS, FAKE_CLANG, fa_like_repo, git, triton_like_repo, vllm_like_sdist
from detect_fixtures import gpuless_host
from index_fixtures import build_decoy_pypi, build_torch_stack, serve_index
from therock_fixtures import _PadReader, _add, serve, sha256_of, toolchain_members

from installer.recipes import PINS_FILE, load_pins

REPO = Path(__file__).resolve().parent.parent
ROCM = "10.1.0"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
VLLM_VERSION = "0.33.0"
# where PyPI would serve the fake sdist (vllm.sdist_url is derived upstream, so the mirror
# world names a file URL of the same shape; only the mirror knows where it really is)
UPSTREAM_SDIST = f"https://files.pythonhosted.org/packages/00/00/vllm-{VLLM_VERSION}.tar.gz"
VLLM_NEXT = "0.33.1"      # only on World.vllm_index
# what the fake sdist's build needs from PyPI, like vLLM's requirements/build/rocm.txt
VLLM_BUILD_REQS = "cmake>=3.26.1,<4\nninja\nsetuptools>=78.1.1,<80.0.0\nwheel\n"

VLLM_PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: rdna4-install tests <tests@example.com>
Subject: [PATCH] test patch for the fake vLLM sdist

Why: exercises the patch step end to end. Upstream: none (test only).
Drop when: never; it only exists in the test world.
---
 csrc/a.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

--- a/csrc/a.c
+++ b/csrc/a.c
@@ -1 +1 @@
-int tiny_a(int x) {{ return x + 0; }}
+int tiny_a(int x) {{ return x + {value}; }}
"""


def toolchain_tarball(path: Path, version: str = ROCM, pad_bytes: int = 0) -> Path:
    """A TheRock-shaped tarball whose compilers really compile (see build_fixtures).

    pad_bytes adds lib/librocblas-pad.so (therock_fixtures._PadReader data), so a
    test can make the download and the unpack take measurable time.
    """
    clang = FAKE_CLANG.format(python=sys.executable, watch=ARCH_VARS).encode()
    fakes = ("./lib/llvm/bin/clang", "./lib/llvm/bin/clang++", "./bin/hipcc")
    rows = [r for r in toolchain_members(version) if r[0] not in fakes]
    rows += [("./lib/llvm/bin/clang", clang, 0o755, tarfile.REGTYPE, ""),
             ("./lib/llvm/bin/clang++", clang, 0o755, tarfile.REGTYPE, ""),
             ("./bin/hipcc", clang, 0o755, tarfile.REGTYPE, "")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tf:
        for name, data, mode, kind, link in rows:
            _add(tf, name, data, mode=mode, kind=kind, link=link)
        if pad_bytes:
            info = tarfile.TarInfo("./lib/librocblas-pad.so")
            info.size, info.mode, info.mtime = pad_bytes, 0o644, 1_780_000_000
            tf.addfile(info, _PadReader(pad_bytes, 0))
    return path


def _vllm_release(root: Path, version: str) -> tuple[Path, Path]:
    """(archive, tree) of a vLLM-shaped release sdist with the build requirements added."""
    archive = vllm_like_sdist(root, version)
    tree = root / "sdist-tree" / f"vllm-{version}"
    req = tree / "requirements" / "build" / "rocm.txt"
    req.write_text(req.read_text() + VLLM_BUILD_REQS)
    archive.unlink()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return archive, tree


def _vllm_sdist(root: Path) -> Path:
    archive, tree = _vllm_release(root, VLLM_VERSION)
    # the same tree as a git repository with the release tag, for vllm.source = "git"
    repo = root.parent / "git" / "vllm"
    shutil.move(str(tree), str(repo))
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", f"vLLM {VLLM_VERSION}", cwd=repo)
    git("tag", f"v{VLLM_VERSION}", cwd=repo)
    shutil.rmtree(root / "sdist-tree")
    return archive


@dataclass
class World:
    root: Path
    http: object                     # therock_fixtures.FileServer
    index_url: str
    pypi_url: str
    recipes: Path                    # a copy of recipes/ (patches/ beside it)
    vllm_git: Path = Path()          # the fake vLLM as a git repo tagged v<version>
    pins: dict[str, dict[str, str]] = field(default_factory=dict)
    # the same world seen through one mirror file: pins keep recipes/pins.toml's
    # upstream URLs (only versions, commits and hashes differ), `rewrite` maps them
    upstream_pins: dict[str, dict[str, str]] = field(default_factory=dict)
    rewrite: dict[str, str] = field(default_factory=dict)
    # a PEP 691 (PyPI JSON) index with vLLM releases VLLM_VERSION and VLLM_NEXT
    vllm_index: str = ""

    @property
    def derive_vllm(self) -> list[str]:
        """--set options that make the vllm resolver derive the sdist from vllm_index."""
        return ["--set", "vllm.sdist_url=", "--set", "vllm.sdist_sha256=",
                "--set", f"vllm.index_url={self.vllm_index}"]

    @property
    def pins_file(self) -> Path:
        return self.root / "world-pins.toml"

    def mirror_env(self, home: Path) -> dict[str, str]:
        """env(home) with no URL in the pins and RDNA4_MIRROR pointing at the stand-ins."""
        pins = self.root / "world-upstream-pins.toml"
        pins.write_text("".join(f"[{t}]\n" + "".join(f'{k} = "{v}"\n' for k, v in values.items())
                                for t, values in self.upstream_pins.items()))
        mirror = self.root / "world-mirror.toml"
        mirror.write_text("[rewrite]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in self.rewrite.items()))
        env = self.env(home)
        env.update(RDNA4_PINS=str(pins), RDNA4_MIRROR=str(mirror))
        return env

    @property
    def vllm_patch(self) -> Path:
        return self.recipes.parent / "patches" / "vllm" / "0001-test.patch"

    def write_pins(self, **overrides: dict[str, str]) -> Path:
        pins = {t: dict(v) for t, v in self.pins.items()}
        for table, values in overrides.items():
            pins[table.replace("_", "-")].update(values)
        lines = []
        for table, values in pins.items():
            lines.append(f"[{table}]")
            lines += [f'{k} = "{v}"' for k, v in values.items()]
        self.pins_file.write_text("\n".join(lines) + "\n")
        return self.pins_file

    def env(self, home: Path) -> dict[str, str]:
        """The environment of an installer run on a GPU-less build host."""
        sysfs = home.parent / "sysfs"
        if not sysfs.exists():
            gpuless_host(sysfs)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RDNA4_", "PIP_", "VIRTUAL_ENV", "PYTHONPATH")) or k.startswith("RDNA4_HINT_")}
        env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
                   XDG_DATA_HOME=str(home / ".local" / "share"), XDG_CONFIG_HOME=str(home / ".config"),
                   RDNA4_SYSFS_ROOT=str(sysfs), RDNA4_CACHE_DIR=str(self.root / "cache"),
                   RDNA4_RECIPES_DIR=str(self.recipes), RDNA4_PINS=str(self.pins_file),
                   RDNA4_NO_MODIFY_PATH="1")
        return env


def build_world(root: Path, *, pad_bytes: int = 0, archs: tuple[str, ...] = ("gfx1201",),
                family: str = "gfx120X-all") -> contextlib.AbstractContextManager[World]:
    """pad_bytes: see toolchain_tarball (0 = the default ~2 KB tarball). archs: the device
    wheels the torch index carries; family: TheRock's group in the tarball's name."""

    @contextlib.contextmanager
    def cm():
        root.mkdir(parents=True, exist_ok=True)
        files = root / "files"
        toolchain_tarball(files / "therock" / f"therock-dist-linux-{family}-{ROCM}.tar.gz",
                          pad_bytes=pad_bytes)
        sdist = _vllm_sdist(files)
        releases = root / "pypi"
        releases.mkdir()
        shutil.copy(sdist, releases / sdist.name)
        nxt, _ = _vllm_release(root / "next", VLLM_NEXT)
        shutil.move(str(nxt), str(releases / nxt.name))
        shutil.rmtree(root / "next")
        wheels, decoy = root / "wheels", root / "decoy"
        wheels.mkdir()
        decoy.mkdir()
        stack = build_torch_stack(wheels, rocm=ROCM, archs=archs)
        build_decoy_pypi(decoy)
        tk_repo, tk_sha = triton_like_repo(root / "git" / "triton")
        fa_repo, fa_sha, _ = fa_like_repo(root / "git" / "fa" / "flash-attention")

        recipes = root / "tree" / "recipes"
        shutil.copytree(REPO / "recipes", recipes)
        (root / "tree" / "patches" / "vllm").mkdir(parents=True)
        (root / "tree" / "patches" / "vllm" / "0001-test.patch").write_text(VLLM_PATCH.format(value=1))

        with serve(files) as http:
            world = World(root=root, http=http, index_url=serve_index(wheels),
                          pypi_url=serve_index(decoy), recipes=recipes, vllm_git=root / "git" / "vllm",
                          vllm_index=serve_index(releases))
            world.pins = {
                "therock": {"version": ROCM, "index_url": http.url + "therock/"},
                "torch": {"python": PY, "index_url": world.index_url, "pypi_url": world.pypi_url,
                          **{k: stack[k] for k in ("rocm", "torch", "torchvision", "torchaudio", "triton")}},
                "triton-kernels": {"git_url": str(tk_repo), "commit": tk_sha},
                "flash-attention": {"git_url": str(fa_repo), "commit": fa_sha},
                "vllm": {"sdist_url": http.url + sdist.name, "sdist_sha256": sha256_of(sdist)},
            }
            world.write_pins()
            stack_pins = {k: stack[k] for k in ("rocm", "torch", "torchvision", "torchaudio", "triton")}
            world.upstream_pins = {
                "therock": {"version": ROCM}, "torch": {"python": PY, **stack_pins},
                "triton-kernels": {"commit": tk_sha}, "flash-attention": {"commit": fa_sha},
                "vllm": {"sdist_url": UPSTREAM_SDIST, "sdist_sha256": sha256_of(sdist)},
            }
            # served under other paths than upstream's: the mirror, not the layout, finds them
            upstream = load_pins(recipes / PINS_FILE)
            world.rewrite = {
                "https://stable.repo.amd.com/rocm/core/tarball/": http.url + "therock/",
                upstream["torch"]["index_url"]: world.index_url,
                upstream["triton-kernels"]["git_url"]: str(tk_repo),
                upstream["flash-attention"]["git_url"]: str(fa_repo),
                # its submodules: ../composable_kernel etc. resolve under the same owner
                upstream["flash-attention"]["git_url"].rsplit("/", 1)[0] + "/": str(fa_repo.parent) + "/",
                UPSTREAM_SDIST: http.url + sdist.name,
            }
            yield world
    return cm()


def slow_compiles(world: World, seconds: str) -> None:
    """Every fake device compile sleeps `seconds`: a build takes time, as a real one does.

    The fake clang reads FAKE_COMPILE_SECONDS; a recipe's [env] is the only way a
    variable reaches a build (proc.base_env allow-lists).
    """
    line = f'FAKE_COMPILE_SECONDS = "{seconds}"\n'
    fa = world.recipes / "flash-attention.toml"
    fa.write_text(fa.read_text() + "\n[env]\n" + line)
    vllm = world.recipes / "vllm.toml"
    vllm.write_text(vllm.read_text().replace('VLLM_TARGET_DEVICE = "rocm"\n',
                                             'VLLM_TARGET_DEVICE = "rocm"\n' + line))


def run_cli(world: World, home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m installer ARGS` from this checkout, as a user would run it."""
    env = world.env(home)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "installer", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=home)


def recipe_statuses(world: World, home: Path, prefix: Path) -> dict[str, str]:
    """What `status --json` says of each recipe."""
    out = run_cli(world, home, "status", "--json", "--prefix", str(prefix))
    rows = {r["recipe"]: r["status"] for r in json.loads(out.stdout)["recipes"]}
    # status fails (exit 1) exactly when a recipe failed
    assert out.returncode == (1 if "failed" in rows.values() else 0), out.stderr
    return rows


def _without_cache_facts(facts: dict) -> dict:
    # whether something came from a cache (at any depth) says how, not what, was installed
    return {k: _without_cache_facts(v) if isinstance(v, dict) else v for k, v in facts.items()
            if k not in ("wheel_cache", "from_cache", "max_jobs")}


def receipt_core(prefix: Path) -> dict:
    """The receipt without timestamps and tool versions: what must match across reruns."""
    data = json.loads((prefix / "rdna4-manifest.json").read_text())
    comps = {}
    for name, comp in data["components"].items():
        facts = _without_cache_facts(comp.get("facts") or {})
        comps[name] = {"status": comp["status"], "fingerprint": comp["fingerprint"],
                       "version": comp["version"], "facts": facts, "patches": comp["patches"]}
    return {"archs": data["archs"], "pins": data["pins"], "components": comps}


def leftovers(*roots: Path) -> list[str]:
    """Temp trees or partial files an interrupted run must not leave behind."""
    bad = []
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            name = path.name
            if any(tag in name for tag in (".tmp", ".partial", ".part", "-tmp-", ".unpack-")) \
                    and "site-packages" not in path.parts:
                bad.append(str(path))
    return bad


def git_head(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1, result.stderr
    for word in words:
        assert word in errors[0] + hints[0], (word, errors[0], hints[0])


def snapshot(*roots: Path, ignore: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every path under `roots` (except under `ignore`) with its mode, size and mtime:
    two snapshots differ when a run touched something outside the prefix and cache."""
    skip = {str(p) for p in ignore}
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
            out.update({os.path.join(dirpath, d): ("dir",) for d in dirs})
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def hint_command(result: subprocess.CompletedProcess) -> list[str]:
    """The command in the `hint:` line of a failed run, as argv (without `rdna4-install`),
    noted as run for the hint audit (tests/hintcheck.py)."""
    import hintcheck

    hint = next(line for line in result.stderr.splitlines() if line.startswith("hint: "))
    return hintcheck.hint_argv(hint)
