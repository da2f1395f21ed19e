"""The torch resolver: rocm follows therock.version, triton follows torch's own metadata,
torchvision/torchaudio are the newest builds whose metadata accepts torch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from index_fixtures import build_torch_stack, build_wheel, request_log, serve_index
from installer import torchpins
from installer.errors import InstallerError, UsageError

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def amd_index(root: Path) -> Path:
    """ROCm 10.1.0 with torch 2.13.0 and 2.14.0 (each with its own triton, vision, audio),
    and ROCm 10.2.0 with rocm wheels but no torch."""
    build_torch_stack(root, rocm="10.1.0", torch="2.14.0", torchvision="0.29.0", torchaudio="2.12.0",
                      triton="3.9.0+gitabcdef12")
    build_torch_stack(root, rocm="10.1.0")    # 2.13.0, 0.28.0, 2.11.0.3, 3.8.0+git669b31ac
    build_wheel(root, "rocm", "10.2.0")
    return root


@pytest.fixture(params=[False, True], ids=["range-read", "pep658"])
def index(request, tmp_path) -> str:
    url = serve_index(amd_index(tmp_path / "amd"), pep658=request.param)
    PEP658[url] = request.param
    return url


PEP658: dict[str, bool] = {}


def pins(index_url: str, therock: str = "10.1.0", **torch: str) -> dict:
    base = {"python": PY, "index_url": index_url, "rocm": "", "torch": "2.13.0",
            "torchvision": "auto", "torchaudio": "auto", "triton": "auto"}
    return {"therock": {"version": therock}, "torch": {**base, **torch}}


def test_companions_follow_torch(index, tmp_path):
    got = torchpins.resolve(pins(index), ("gfx1201",), offline=False, cache_dir=tmp_path / "c")
    assert got == {"rocm": "10.1.0", "torch": "2.13.0+rocm10.1.0",
                   "triton": "3.8.0+git669b31ac.rocm10.1.0",
                   # 0.29.0 is newer but requires torch 2.14.0: skipped
                   "torchvision": "0.28.0+rocm10.1.0", "torchaudio": "2.11.0.3+rocm10.1.0"}
    log = request_log(index)
    assert any(r.endswith(".whl.metadata") for r in log)   # PEP 658 is asked first
    wheels = [r for r in log if ".whl" in r and not r.endswith(".metadata")]
    # with PEP 658 no wheel is read; without, only the wheels' zip directories are, by Range
    assert bool(wheels) != PEP658[index]
    assert all(r.endswith("]") and "[bytes=" in r for r in wheels)


def test_newest_torch_for_the_rocm_with_its_own_triton(index, tmp_path):
    got = torchpins.resolve(pins(index, torch="auto"), (), offline=False, cache_dir=tmp_path / "c")
    assert got["torch"] == "2.14.0+rocm10.1.0"
    assert got["triton"] == "3.9.0+gitabcdef12.rocm10.1.0"
    assert got["torchvision"] == "0.29.0+rocm10.1.0" and got["torchaudio"] == "2.12.0+rocm10.1.0"


def test_reruns_and_offline_use_the_recorded_answers(index, tmp_path):
    cache = tmp_path / "c"
    first = torchpins.resolve(pins(index), (), offline=False, cache_dir=cache)
    asked = len(request_log(index))
    assert torchpins.resolve(pins(index), (), offline=True, cache_dir=cache) == first
    assert len(request_log(index)) == asked


def test_contradictions_name_both_values(index, tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(UsageError) as exc:
        torchpins.resolve(pins(index, triton="3.9.0+gitabcdef12.rocm10.1.0"), (), offline=False,
                          cache_dir=cache)
    assert "torch.triton is pinned to 3.9.0+gitabcdef12.rocm10.1.0" in exc.value.message
    assert "requires triton==3.8.0+git669b31ac.rocm10.1.0" in exc.value.message
    with pytest.raises(UsageError, match="torch.rocm is pinned to 10.0.0 but therock.version is 10.1.0"):
        torchpins.resolve(pins(index, rocm="10.0.0"), (), offline=False, cache_dir=cache)


def test_missing_builds_say_what_the_index_has(index, tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(InstallerError) as exc:
        torchpins.resolve(pins(index, torch="2.12.0"), (), offline=False, cache_dir=cache)
    assert "torch 2.12.0+rocm10.1.0 is not on" in exc.value.message
    assert "for rocm10.1.0 it has 2.14.0+rocm10.1.0, 2.13.0+rocm10.1.0" in exc.value.message
    with pytest.raises(InstallerError, match="no torch wheel for ROCm 10.2.0"):
        torchpins.resolve(pins(index, "10.2.0", torch="auto"), (), offline=False, cache_dir=cache)


def test_all_exact_pins_need_no_network(tmp_path):
    exact = pins("http://127.0.0.1:9/simple/", torchvision="0.28.0", torchaudio="",
                 triton="3.8.0+git669b31ac.rocm10.1.0")
    got = torchpins.resolve(exact, (), offline=False, cache_dir=tmp_path / "c")
    assert got["torch"] == "2.13.0+rocm10.1.0" and got["torchvision"] == "0.28.0+rocm10.1.0"
    assert got["torchaudio"] == ""


def test_range_reads_of_absolute_upstream_links_go_through_the_mirror(tmp_path):
    from installer import mirror

    root = tmp_path / "amd"
    build_torch_stack(root, rocm="10.1.0")
    url = serve_index(root)
    wheel = next(p.name for p in root.rglob("torch-2.13.0*.whl"))
    upstream = "https://wheels.upstream.invalid/rocm/"
    files = url.rsplit("simple/", 1)[0] + "files/"
    (tmp_path / "m.toml").write_text(f'[rewrite]\n"{upstream}" = "{files}"\n')
    mirror.use(mirror.load(tmp_path / "m.toml"))
    try:
        text = torchpins._metadata_from_zip(upstream + wheel)
    finally:
        mirror.use(None)
    assert "Name: torch" in text and "Version: 2.13.0+rocm10.1.0" in text
    assert any(wheel in r and "[bytes=" in r for r in request_log(url))
