"""A loopback PEP 503 index with small real wheels, for tests that install with uv.

`build_wheel` writes a valid wheel by hand (zipfile + METADATA/WHEEL/RECORD),
`serve_index` serves a directory of wheels as a simple index from a thread, and
`serve_index` also answers PyPI's JSON simple API (PEP 691) when asked with
`Accept: application/vnd.pypi.simple.v1+json`, with each file's sha256, and
serves a wheel's METADATA at `<file>.metadata` (PEP 658) when `pep658` is set;
files honour `Range: bytes=...`. `build_torch_stack` fills a directory with a fake TheRock stack (rocm, rocm-sdk-*,
torch with a +rocm local version, device packages, triton, torchvision,
torchaudio) whose modules and `rocm-sdk` script behave enough like the real
ones for the installer's checks to run against them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

_LOGS: dict[str, list[str]] = {}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel(dir: Path, name: str, version: str, files: dict[str, str | bytes] | None = None,
                requires: list[str] | None = None, extras: dict[str, list[str]] | None = None,
                tag: str = "py3-none-any", scripts: dict[str, str] | None = None) -> Path:
    """Write `<name>-<version>-<tag>.whl` into `dir` and return its path.

    `files` maps paths inside the wheel to contents, `requires` are plain
    Requires-Dist lines, `extras` maps an extra to its requirements, `scripts`
    maps a console script name to "module:function".
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires or []]
    for extra, reqs in (extras or {}).items():
        meta.append(f"Provides-Extra: {extra}")
        meta += [f'Requires-Dist: {r} ; extra == "{extra}"' for r in reqs]
    content: dict[str, bytes] = {
        path: data.encode() if isinstance(data, str) else data for path, data in (files or {}).items()
    }
    content[f"{info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    content[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: rdna4-tests\n"
                                f"Root-Is-Purelib: true\nTag: {tag}\n").encode()
    if scripts:
        lines = ["[console_scripts]"] + [f"{k} = {v}" for k, v in scripts.items()]
        content[f"{info}/entry_points.txt"] = ("\n".join(lines) + "\n").encode()
    record = [f"{p},{_record_hash(d)},{len(d)}" for p, d in content.items()]
    record.append(f"{info}/RECORD,,")
    content[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dir / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in content.items():
            zf.writestr(p, d)
    return path


def _project_of(filename: str) -> str:
    if filename.endswith(".whl"):
        return normalize(filename.split("-", 1)[0])
    return normalize(re.sub(r"-[0-9][^-]*\.(tar\.gz|zip)$", "", filename))


JSON_API = "application/vnd.pypi.simple.v1+json"


def _wheel_metadata(path: Path) -> bytes | None:
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA"):
                return zf.read(name)
    return None


def _version_of(filename: str) -> str:
    from packaging.utils import parse_sdist_filename, parse_wheel_filename

    if filename.endswith(".whl"):
        return str(parse_wheel_filename(filename)[1])
    return str(parse_sdist_filename(filename)[1])


def serve_index(wheels_dir: Path, *, yanked: tuple[str, ...] = (), pep658: bool = False) -> str:
    """Serve `wheels_dir` as a PEP 503 index on 127.0.0.1; return the index URL.

    The directory is listed on every request, so wheels added later show up.
    The server runs in a daemon thread until the test process exits;
    `request_log(url)` lists the paths it was asked for ("GET /path [bytes=...]" for a Range read).
    """
    root = Path(wheels_dir)
    log: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802 (uv probes for range support)
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = unquote(self.path.split("?", 1)[0])
            # a Range read (e.g. of a wheel's zip directory) is logged as such
            rng = self.headers.get("Range")
            log.append(f"{self.command} {path}" + (f" [{rng}]" if rng else ""))
            files = sorted(p.name for p in root.iterdir() if p.is_file())
            parts = [p for p in path.split("/") if p]
            if parts == ["simple"]:
                names = sorted({_project_of(f) for f in files})
                links = "".join(f'<a href="{n}/">{n}</a>\n' for n in names)
                return self._send(f"<html><body>{links}</body></html>".encode(), "text/html")
            if len(parts) == 2 and parts[0] == "simple":
                mine = [f for f in files if _project_of(f) == normalize(parts[1])]
                if mine and JSON_API in (self.headers.get("Accept") or ""):
                    entries = [{"filename": f, "url": f"../../files/{quote(f)}",
                                "hashes": {"sha256": hashlib.sha256((root / f).read_bytes()).hexdigest()},
                                "yanked": f in yanked} for f in mine]
                    body = {"meta": {"api-version": "1.1"}, "name": normalize(parts[1]), "files": entries,
                            "versions": sorted({_version_of(f) for f in mine})}
                    return self._send(json.dumps(body).encode(), JSON_API)
                if mine:  # with the #sha256= fragment PyPI and TheRock's index give
                    links = "".join(f'<a href="../../files/{quote(f)}#sha256='
                                    f'{hashlib.sha256((root / f).read_bytes()).hexdigest()}">{html.escape(f)}</a>\n'
                                    for f in mine)
                    return self._send(f"<html><body>{links}</body></html>".encode(), "text/html")
            if len(parts) == 2 and parts[0] == "files" and pep658 and parts[1].endswith(".whl.metadata") \
                    and (root / parts[1][:-9]).is_file():
                return self._send(_wheel_metadata(root / parts[1][:-9]) or b"", "text/plain")
            if len(parts) == 2 and parts[0] == "files" and (root / parts[1]).is_file():
                data = (root / parts[1]).read_bytes()
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
                if m and data:
                    start = int(m[1]) if m[1] else max(0, len(data) - int(m[2]))
                    end = min(int(m[2]), len(data) - 1) if m[1] and m[2] else len(data) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                    self.send_header("Content-Length", str(end - start + 1))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data[start:end + 1])
                    return
                return self._send(data, "application/octet-stream")
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    _LOGS[url] = log
    return url


def request_log(url: str) -> list[str]:
    return _LOGS[url]


def cp_tag(python: tuple[int, int] = sys.version_info[:2]) -> str:
    cp = f"cp{python[0]}{python[1]}"
    return f"{cp}-{cp}-linux_x86_64"


ROCM_SDK_INIT = '''\
__version__ = "{rocm}"


def preload_libraries(*shortnames, rtld_global: bool = True):
    return rtld_global


def initialize_process(preload_shortnames=(), check_version=None):
    if check_version is not None and check_version != __version__:
        raise RuntimeError(f"rocm_sdk {{__version__}} but torch wants {{check_version}}")
'''

ROCM_SDK_MAIN = '''\
import shutil
import sys
from pathlib import Path

from rocm_sdk import __version__


def main():
    args = sys.argv[1:]
    if args[:1] == ["version"]:
        print(__version__)
    elif args[:1] == ["init"]:
        # the real init expands the devel tree; a copy of the HIP runtime stands in for it
        site = Path(__file__).resolve().parent.parent
        lib = site / "_rocm_sdk_devel" / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / "_rocm_sdk_core" / "lib" / "libamdhip64.so.7", lib / "libamdhip64.so.7")
        print("expanded", lib)
    else:
        print("usage: rocm-sdk version|init", file=sys.stderr)
        sys.exit(2)
'''

TORCH_INIT = '''\
from . import cuda, version
from rocm_sdk import initialize_process

initialize_process(check_version="{rocm}")
__version__ = version.__version__
'''


def build_torch_stack(dir: Path, *, rocm: str = "10.1.0", torch: str = "2.13.0",
                      torchvision: str = "0.28.0", torchaudio: str = "2.11.0.3",
                      triton: str = "3.8.0+git669b31ac", archs: tuple[str, ...] = ("gfx1201",),
                      hip: str = "7.16.26385",
                      python: tuple[int, int] = sys.version_info[:2]) -> dict[str, str]:
    """Write a fake TheRock stack for ROCm `rocm` into `dir`; return its exact pins.

    Versions without a local segment get `+rocm<rocm>`; triton gets `.rocm<rocm>`
    appended to its local segment, as TheRock's wheels do.
    """
    tag = cp_tag(python)
    pins = {
        "rocm": rocm,
        "torch": f"{torch}+rocm{rocm}",
        "torchvision": f"{torchvision}+rocm{rocm}",
        "torchaudio": f"{torchaudio}+rocm{rocm}",
        "triton": f"{triton}.rocm{rocm}" if "+" in triton else f"{triton}+rocm{rocm}",
    }
    device = {f"device-{a}": [f"rocm-sdk-device-{a}=={rocm}"] for a in archs}
    build_wheel(dir, "rocm", rocm, files={
        "rocm_sdk/__init__.py": ROCM_SDK_INIT.format(rocm=rocm),
        "rocm_sdk/__main__.py": ROCM_SDK_MAIN,
    }, requires=[f"rocm-sdk-core=={rocm}"], extras={
        "libraries": [f"rocm-sdk-libraries=={rocm}"], "devel": [f"rocm-sdk-devel=={rocm}"], **device,
    }, scripts={"rocm-sdk": "rocm_sdk.__main__:main"})
    build_wheel(dir, "rocm-sdk-core", rocm, files={
        "_rocm_sdk_core/__init__.py": "",
        "_rocm_sdk_core/lib/libamdhip64.so.7": b"\x7fELF fake hip runtime",
        "_rocm_sdk_core/lib/librocm_smi64.so.1": b"\x7fELF fake rocm_smi",
        "_rocm_sdk_core/share/amd_smi/pyproject.toml": "[project]\nname = 'amdsmi'\n",
        "_rocm_sdk_core/share/amd_smi/amdsmi/__init__.py": f'__version__ = "{rocm}"\n',
    })
    build_wheel(dir, "rocm-sdk-libraries", rocm, files={"_rocm_sdk_libraries/__init__.py": ""})
    build_wheel(dir, "rocm-sdk-devel", rocm, files={"rocm_sdk_devel/__init__.py": ""})
    for a in archs:
        build_wheel(dir, f"rocm-sdk-device-{a}", rocm, files={f"_rocm_sdk_device_{a}/__init__.py": ""})
        build_wheel(dir, f"amd-torch-device-{a}", pins["torch"], tag=tag,
                    files={f"_amd_torch_device_{a}/__init__.py": ""})
    build_wheel(dir, "torch", pins["torch"], tag=tag, files={
        "torch/__init__.py": TORCH_INIT.format(rocm=rocm),
        # what a ROCm torch says on a host without a GPU
        "torch/cuda.py": "def is_available():\n    return False\n\ndef device_count():\n    return 0\n",
        "torch/version.py": (f'__version__ = "{pins["torch"]}"\nhip = "{hip}"\ncuda = None\n'),
    }, requires=[f"rocm[libraries]=={rocm}", f"triton=={pins['triton']}"],
        extras={f"device-{a}": [f"amd-torch-device-{a}=={pins['torch']}"] for a in archs})
    build_wheel(dir, "triton", pins["triton"], tag=tag, files={"triton/__init__.py": ""})
    build_wheel(dir, "torchvision", pins["torchvision"], tag=tag,
                files={"torchvision/__init__.py": f'__version__ = "{pins["torchvision"]}"\n'},
                requires=[f"torch=={pins['torch']}"], extras={f"device-{a}": [] for a in archs})
    build_wheel(dir, "torchaudio", pins["torchaudio"], tag=tag,
                files={"torchaudio/__init__.py": ""}, requires=[f"torch=={pins['torch']}"])
    return pins


def build_decoy_pypi(dir: Path) -> None:
    """What PyPI offers under the same names: CUDA-style builds with higher plain versions."""
    build_wheel(dir, "torch", "99.0.0", files={
        "torch/__init__.py": "from . import version\n__version__ = version.__version__\n",
        "torch/version.py": '__version__ = "99.0.0"\nhip = None\ncuda = "12.8"\n',
    })
    build_wheel(dir, "triton", "99.0.0", files={"triton/__init__.py": ""})
    build_wheel(dir, "tiny-dep", "1.0.0", files={"tiny_dep/__init__.py": ""})


def build_nightly_gap(dir: Path) -> None:
    """Nightly stacks for 10.2.0a20260927 and 10.2.0a20260930, and two days between
    with rocm wheels but no torch (TheRock's nightlies have such days)."""
    for day in ("10.2.0a20260927", "10.2.0a20260930"):
        build_torch_stack(dir, rocm=day, torch="2.15.0a0", torchvision="0.30.0a0")
    for day in ("10.2.0a20260928", "10.2.0a20260929"):  # tarballs/SDK but no torch that day
        build_wheel(dir, "rocm", day)


def build_sdist(dir: Path, name: str, version: str, *, says: str | None = None,
                files: dict[str, str] | None = None) -> Path:
    """`<name>-<version>.tar.gz` with a top dir and a PKG-INFO whose Version is `says`
    (default: `version`), like a PyPI release sdist."""
    import io
    import tarfile

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    top = f"{name}-{version}"
    content = {"PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {says or version}\n\nbody\n",
               **(files or {})}
    path = dir / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in content.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size, info.mtime = len(data), 1_780_000_000
            tf.addfile(info, io.BytesIO(data))
    return path
