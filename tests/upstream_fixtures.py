"""Every upstream the pins resolve against, on loopback, for `lock`, `pins check/update`
and the preflight (no builds: the artifacts only have to exist and be listed).

- TheRock: a JSON-listed directory with stable gfx120X-all tarballs 10.0.0, 10.1.0,
  10.2.0 and 10.3.0 (10.1.0 is a real TheRock-shaped tree, the others small stand-ins);
- AMD's wheel index: torch 2.13.0 and 2.14.0 for ROCm 10.1.0 (each with its own
  triton/vision/audio), torch 2.15.0 for 10.2.0, rocm wheels but no torch for 10.3.0;
- a PyPI-style JSON simple API with vLLM sdists 0.32.0, 0.33.0, 0.34.0 and 0.35.0,
  whose docker/Dockerfile.rocm_base names torch 2.12, 2.13, 2.15 and 2.16;
- local git repos for triton-kernels and flash-attention.
`pins` is a --pins file pointing the real recipes at all of them.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from build_fixtures import git_repo
from index_fixtures import build_sdist, build_torch_stack, build_wheel, serve_index
from therock_fixtures import make_toolchain_tarball, serve

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
VLLM_TORCH = {"0.32.0": "2.12.0", "0.33.0": "2.13.0", "0.34.0": "2.15.0", "0.35.0": "2.16.0"}
DOCKERFILE = "ARG BASE_IMAGE=rocm/dev-ubuntu-24.04\nARG TORCH_VERSION={torch}+rocm10.0.0\n" \
             "ARG PYTHON_VERSION=3.12\n"
# the file the test patches touch (a stand-in for vllm/platforms/rocm.py)
ROCM_PY = "def on_gfx12():\n    return False\n\n\ndef wave32():\n    return {wave}\n\n# end\n"


@dataclass
class Upstreams:
    root: Path
    http: object           # therock_fixtures.FileServer (TheRock listing + tarballs)
    therock_url: str
    index_url: str         # AMD-style PEP 503 index
    pypi_url: str          # PEP 691 JSON simple API
    tk_repo: Path
    tk_commit: str
    fa_repo: Path
    fa_commit: str

    def pins_text(self, **tables: dict[str, str]) -> str:
        pins = {
            "therock": {"version": "10.1.0", "index_url": self.therock_url},
            "torch": {"python": PY, "index_url": self.index_url},
            "triton-kernels": {"git_url": str(self.tk_repo), "commit": self.tk_commit},
            "flash-attention": {"git_url": str(self.fa_repo), "commit": self.fa_commit},
            "vllm": {"index_url": self.pypi_url},
        }
        for table, values in tables.items():
            pins.setdefault(table.replace("_", "-"), {}).update(values)
        lines = []
        for table, values in pins.items():
            lines.append(f"[{table}]")
            lines += [f'{k} = "{v}"' for k, v in values.items()]
        return "\n".join(lines) + "\n"

    def write_pins(self, path: Path | None = None, **tables: dict[str, str]) -> Path:
        path = path or self.root / "pins.toml"
        path.write_text(self.pins_text(**tables))
        return path


def vllm_sdists(folder: Path) -> None:
    for version, torch in VLLM_TORCH.items():
        wave = "32" if version >= "0.34.0" else "64"   # 0.34.0 ships our wave32 fix
        build_sdist(folder, "vllm", version, files={
            "docker/Dockerfile.rocm_base": DOCKERFILE.format(torch=torch),
            "vllm/platforms/rocm.py": ROCM_PY.format(wave=wave),
        })


@contextlib.contextmanager
def upstreams(root: Path) -> Iterator[Upstreams]:
    root.mkdir(parents=True, exist_ok=True)
    tarballs = root / "files" / "therock"
    for version in ("10.0.0", "10.1.0", "10.2.0", "10.3.0"):
        make_toolchain_tarball(tarballs / f"therock-dist-linux-gfx120X-all-{version}.tar.gz", version)
    wheels = root / "wheels"
    build_torch_stack(wheels, rocm="10.1.0", torch="2.14.0", torchvision="0.29.0", torchaudio="2.12.0",
                      triton="3.9.0+gitabcdef12")
    build_torch_stack(wheels, rocm="10.1.0")
    build_torch_stack(wheels, rocm="10.2.0", torch="2.15.0", torchvision="0.30.0", torchaudio="2.13.0",
                      triton="3.10.0+git12345678")
    build_wheel(wheels, "rocm", "10.3.0")             # a release without torch: never coherent
    sdists = root / "pypi"
    vllm_sdists(sdists)
    tk_commit = git_repo(root / "git" / "triton", {"python/triton_kernels/triton_kernels/__init__.py": ""})
    fa_commit = git_repo(root / "git" / "flash-attention", {"setup.py": "# fa\n"})
    with serve(root / "files") as http:
        yield Upstreams(root=root, http=http, therock_url=http.url + "therock/",
                        index_url=serve_index(wheels), pypi_url=serve_index(sdists),
                        tk_repo=root / "git" / "triton", tk_commit=tk_commit,
                        fa_repo=root / "git" / "flash-attention", fa_commit=fa_commit)
