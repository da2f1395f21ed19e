"""recipes/pins.toml explains itself, and the shipped vLLM patches apply to the pinned sdist.

The fast tests read only files in the repo. The network tests resolve real vLLM sdists
through the installer's vllm resolver (URL + sha256 from PyPI's JSON simple API), download
the pinned version's sdist (sha256 checked) and run
`git apply --check` and then `git apply` for each patch in order, the way the installer
does. Later patches therefore see the earlier ones.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project supports 3.10 through tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "recipes" / "pins.toml"
VLLM_PATCHES = ROOT / "patches" / "vllm"
FA_PATCHES = ROOT / "patches" / "flash-attention"

# The names other modules code against (docs/design.md, "Pin keys").
REQUIRED_KEYS = {
    "therock": {"channel", "version", "family", "sha256"},
    "torch": {"python", "index_url", "rocm", "torch", "torchvision", "torchaudio", "triton"},
    "triton-kernels": {"git_url", "commit"},
    "flash-attention": {"git_url", "commit", "backend"},
    "vllm": {"version", "index_url", "sdist_url", "sdist_sha256"},
}

TABLE = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")
KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def load_pins() -> dict:
    with open(PINS, "rb") as fh:
        return tomllib.load(fh)


def pin_lines(path: Path = PINS) -> list[tuple[str, str, int, str]]:
    """(table, key, line number, line directly above) for every `key = value` line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, table = [], None
    for i, line in enumerate(lines):
        if m := TABLE.match(line):
            table = m.group(1).strip()
        elif (m := KEY.match(line)) and not line.lstrip().startswith("#"):
            found.append((table, m.group(1), i + 1, lines[i - 1] if i else ""))
    return found


def uncommented(found: list[tuple[str, str, int, str]]) -> list[str]:
    return [f"line {n}: [{t}] {k}" for t, k, n, above in found
            if not above.lstrip().startswith("#") or not above.lstrip("# ").strip()]


def shipped_patches(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.patch")) if folder.is_dir() else []


# ---------------------------------------------------------------- pins.toml, fast


def test_pins_have_the_keys_other_modules_use():
    pins = load_pins()
    for table, keys in REQUIRED_KEYS.items():
        assert table in pins, f"[{table}] missing from {PINS}"
        missing = keys - set(pins[table])
        assert not missing, f"[{table}] lacks {sorted(missing)}"
        for key, value in pins[table].items():
            assert isinstance(value, str), f"{table}.{key} must be a string"


def test_every_pin_has_a_comment_directly_above():
    found = pin_lines()
    # the line scan must see exactly the keys TOML sees, or it could miss a pin
    scanned = {(t, k) for t, k, _, _ in found}
    parsed = {(t, k) for t, table in load_pins().items() for k in table}
    assert scanned == parsed
    bare = uncommented(found)
    assert not bare, "pins without a comment right above them:\n" + "\n".join(bare)


def test_comment_check_catches_a_bare_pin(tmp_path: Path):
    pins = tmp_path / "pins.toml"
    pins.write_text('[a]\n# from somewhere\nx = "1"\n\ny = "2"\n[b]\n#\nz = "3"\n')
    assert uncommented(pin_lines(pins)) == ["line 5: [a] y", "line 8: [b] z"]


def test_pins_agree_with_each_other():
    pins = load_pins()
    # derived from therock.version and torch's own metadata, never typed in (installer/torchpins.py)
    assert pins["torch"]["rocm"] == ""
    assert "+" not in pins["torch"]["torch"]
    for name in ("torchvision", "torchaudio", "triton"):
        assert pins["torch"][name] == "auto", name
    assert HEX40.match(pins["triton-kernels"]["commit"])
    assert HEX40.match(pins["flash-attention"]["commit"])
    assert pins["flash-attention"]["backend"] in ("ck", "triton", "none")
    assert pins["therock"]["channel"] in ("stable", "nightly", "rc")
    assert pins["therock"]["sha256"] == "" or re.fullmatch(r"[0-9a-f]{64}",
                                                           pins["therock"]["sha256"])
    vllm = pins["vllm"]
    # derived from the index for vllm.version, never typed in (see installer/pypi.py)
    assert vllm["sdist_url"] == vllm["sdist_sha256"] == vllm["tag"] == vllm["commit"] == ""
    assert vllm["index_url"].startswith("https://")
    for table in pins.values():
        for key, value in table.items():
            if key.endswith("url"):
                # empty = the default host (therock.index_url picks AMD's directory)
                assert value == "" or value.startswith("https://"), key


# ---------------------------------------------------------------- patch headers, fast


ALL_PATCHES = shipped_patches(VLLM_PATCHES) + shipped_patches(FA_PATCHES)


def test_patch_names_are_numbered_in_order():
    for folder in (VLLM_PATCHES, FA_PATCHES):
        names = [p.name for p in shipped_patches(folder)]
        numbers = [int(n[:4]) for n in names if re.match(r"^\d{4}-[a-z0-9][a-z0-9.-]*\.patch$", n)]
        assert len(numbers) == len(names), f"not NNNN-slug.patch: {names}"
        assert numbers == list(range(1, len(names) + 1)), f"gaps in {folder}: {names}"


@pytest.mark.parametrize("patch", ALL_PATCHES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_patch_header_explains_itself(patch: Path):
    text = patch.read_text(encoding="utf-8")
    assert text.startswith("From "), "not a git format-patch file"
    header, sep, _ = text.partition("\ndiff --git ")
    assert sep, "no diff --git section"
    assert re.search(r"^Subject: \S.*", header, re.M), "no Subject"
    assert re.search(r"^(Drop|Remove) when\b.+", header, re.M | re.I), "no 'Drop when' line"
    assert re.search(r"https://github\.com/\S+/(issues|pull)/\d+", header), "no upstream link"
    if patch.parent == VLLM_PATCHES:
        # the releases it is for (installer/patches.py:for_version reads it) and the upstream thread
        from packaging.specifiers import SpecifierSet

        versions = re.search(r"^Versions: (.+)$", header, re.M)
        assert versions, "no 'Versions:' line"
        assert SpecifierSet(versions.group(1)).contains(load_pins()["vllm"]["version"])
        assert re.search(r"^Upstream: https://github\.com/vllm-project/vllm/(issues|pull)/\d+", header, re.M)
    body = header.split("\n\n", 1)[1] if "\n\n" in header else ""
    assert len(body.split()) >= 20, "the body must say why the patch exists"


# ---------------------------------------------------------------- against the real sdist


@pytest.fixture(scope="module")
def sdist_cache(request, tmp_path_factory) -> Path:
    store = getattr(request.config, "cache", None)   # absent under -p no:cacheprovider
    return Path(store.mkdir("vllm-sdist")) if store else tmp_path_factory.mktemp("vllm-sdist")


def resolve_vllm(version: str, cache: Path) -> dict:
    from installer import pypi

    pins = load_pins()
    pins["vllm"]["version"] = version
    return pypi.resolve(pins, ("gfx1201",), offline=False, cache_dir=cache)


@pytest.mark.network
@pytest.mark.parametrize("version", ["0.32.0", "0.33.0"])
def test_resolver_derives_real_sdists_from_pypi(version: str, sdist_cache: Path):
    got = resolve_vllm(version, sdist_cache)
    assert got["version"] == version and got["tag"] == f"v{version}"
    assert got["sdist_url"].startswith("https://files.pythonhosted.org/packages/")
    assert got["sdist_url"].endswith(f"/vllm-{version}.tar.gz")
    assert re.fullmatch(r"[0-9a-f]{64}", got["sdist_sha256"])
    if version == "0.33.0":   # what we downloaded and hashed ourselves (docs/pins.md)
        assert got["sdist_sha256"] == "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112"


@pytest.fixture(scope="module")
def vllm_sdist(sdist_cache: Path) -> Path:
    """The pinned version's sdist, resolved and downloaded as the installer does (sha256
    checked), cached in pytest's cache dir so a rerun downloads nothing."""
    from installer import download

    got = resolve_vllm(load_pins()["vllm"]["version"], sdist_cache)
    fetched = download.fetch(got["sdist_url"], cache_dir=sdist_cache, sha256=got["sdist_sha256"])
    assert fetched.sha256 == got["sdist_sha256"]
    return fetched.path


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # GIT_CEILING_DIRECTORIES: the unpacked sdist has no .git; git must not find an
    # enclosing repository and apply paths relative to its root
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.network
def test_vllm_patches_apply_to_pinned_sdist(vllm_sdist: Path, tmp_path: Path):
    assert shutil.which("git") and shutil.which("tar")
    version = load_pins()["vllm"]["version"]
    subprocess.run(["tar", "-xzf", str(vllm_sdist), "--no-same-owner", "-C", str(tmp_path)],
                   check=True)
    src = tmp_path / f"vllm-{version}"
    assert (src / "setup.py").is_file(), "unexpected sdist layout"
    patches = shipped_patches(VLLM_PATCHES)
    for patch in patches:
        check = _git(["apply", "--check", str(patch)], src)
        assert check.returncode == 0, f"{patch.name} does not apply:\n{check.stderr}"
        done = _git(["apply", str(patch)], src)
        assert done.returncode == 0, f"{patch.name} failed after its check:\n{done.stderr}"
        # really applied: the reverse check now passes
        assert _git(["apply", "--check", "--reverse", str(patch)], src).returncode == 0
    for patch in patches:
        for path in re.findall(r"^\+\+\+ b/(\S+\.py)$", patch.read_text(), re.M):
            compile((src / path).read_text(encoding="utf-8"), path, "exec")
