"""Pins that must agree on one ROCm version, and resolution against a loopback TheRock index."""

from __future__ import annotations

import sys

import pytest

from installer import torchindex
from installer.errors import InstallerError
from tests.index_fixtures import build_nightly_gap, request_log, serve_index


def test_nightly_without_torch_names_nearest_versions(tmp_path):
    amd = tmp_path / "nightly"
    build_nightly_gap(amd)
    url = serve_index(amd)
    py = sys.version_info[:2]
    with pytest.raises(InstallerError) as err:
        torchindex.resolve_from_index(url, "10.2.0a20260928", ["torch"], py)
    assert "no torch wheel for ROCm 10.2.0a20260928" in err.value.message
    assert "10.2.0a20260927, 10.2.0a20260930" in err.value.hint
    # the hint is worked out from the pages already read, not from a second download
    assert sorted(request_log(url)) == ["GET /simple/rocm/", "GET /simple/torch/"]
    assert torchindex.has_torch(url, "10.2.0a20260927", py)
    assert not torchindex.has_torch(url, "10.2.0a20260928", py)
    got = torchindex.resolve_from_index(url, "10.2.0a20260930", ["torch"], py)
    assert got == {"torch": "2.15.0a0+rocm10.2.0a20260930"}


def test_requirements_are_exact_and_name_device_packages():
    pins = torchindex.coherent_pins("10.1.0", rocm="10.1.0", torch="2.13.0", torchvision="",
                                    torchaudio="2.11.0.3+rocm10.1.0", triton="")
    reqs = torchindex.stack_requirements(pins, ("gfx1200", "gfx1201"))
    assert reqs[0] == "rocm[libraries,devel,device-gfx1200,device-gfx1201]==10.1.0"
    assert "torch[device-gfx1200,device-gfx1201]==2.13.0+rocm10.1.0" in reqs
    assert "amd-torch-device-gfx1200==2.13.0+rocm10.1.0" in reqs
    assert "rocm-sdk-device-gfx1201==10.1.0" in reqs
    assert not any(r.startswith(("torchvision", "triton")) for r in reqs)
    assert all("==" in r for r in reqs)
