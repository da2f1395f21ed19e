"""Pins that must agree on one ROCm version, and resolution against a loopback TheRock index."""

from __future__ import annotations

import platform
import sys

import pytest
from packaging.version import Version

from installer import torchindex
from installer.errors import InstallerError, UsageError
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


HINT = "tarball, rocm wheels and torch must be one ROCm version"


def _pins(**over):
    args = {"rocm": "auto", "torch": "auto", "torchvision": "", "torchaudio": "", "triton": ""}
    return torchindex.coherent_pins("10.1.0", **{**args, **over})


def test_coherent_pins_fill_in_the_local_version_and_keep_what_is_left_to_resolve():
    assert _pins(torch="2.13.0", torchvision="auto", torchaudio="2.11.0.3+rocm10.1.0",
                 triton="3.8.0+git669b31ac.rocm10.1.0") == {
        "rocm": "10.1.0", "torch": "2.13.0+rocm10.1.0", "torchvision": None,
        "torchaudio": "2.11.0.3+rocm10.1.0", "triton": "3.8.0+git669b31ac.rocm10.1.0"}
    assert _pins(rocm="10.1.0", triton="auto") == {"rocm": "10.1.0", "torch": None, "torchvision": "",
                                                    "torchaudio": "", "triton": ""}
    assert _pins(triton="3.8.0+rocm10.1.0")["triton"] == "3.8.0+rocm10.1.0"
    # a nightly torchaudio may be built another day of the same ROCm release
    nightly = torchindex.coherent_pins("10.2.0a20260930", rocm="auto", torch="auto", torchvision="",
                                       torchaudio="2.12.0a0+rocm10.2.0a20260929", triton="")
    assert nightly["torchaudio"] == "2.12.0a0+rocm10.2.0a20260929"


@pytest.mark.parametrize("over, message", [
    ({"rocm": "10.2.0"}, "ROCm version mismatch: the tarball is ROCm 10.1.0 but torch.rocm pins rocm wheels 10.2.0"),
    ({"torch": "2.13.0+rocm10.2.0"},
     "ROCm version mismatch: torch 2.13.0+rocm10.2.0 is not built for the tarball's ROCm 10.1.0"),
    ({"torchvision": "0.28.0+cu128"},
     "ROCm version mismatch: torchvision 0.28.0+cu128 is not built for the tarball's ROCm 10.1.0"),
    # only torchaudio may differ, and only in the build date
    ({"torchvision": "0.28.0+rocm10.1.1"},
     "ROCm version mismatch: torchvision 0.28.0+rocm10.1.1 is not built for the tarball's ROCm 10.1.0"),
    ({"torchaudio": "2.11.0+rocm10.2.0"},
     "ROCm version mismatch: torchaudio 2.11.0+rocm10.2.0 is not built for the tarball's ROCm 10.1.0"),
    ({"torchaudio": "2.11.0+rocmx"},
     "ROCm version mismatch: torchaudio 2.11.0+rocmx is not built for the tarball's ROCm 10.1.0"),
    ({"triton": "3.8.0+git669b31ac.rocm10.2.0"},
     "ROCm version mismatch: triton 3.8.0+git669b31ac.rocm10.2.0 is not TheRock's build for ROCm 10.1.0"),
    ({"triton": "3.8.0"}, "ROCm version mismatch: triton 3.8.0 is not TheRock's build for ROCm 10.1.0")])
def test_coherent_pins_name_the_pin_of_another_rocm(over, message):
    with pytest.raises(InstallerError) as err:
        _pins(**over)
    assert err.value.message == message
    assert err.value.hint == f"pin +rocm10.1.0 builds, or set therock.version to the ROCm they were built for; {HINT}"


@pytest.mark.parametrize("over, message", [
    ({"torch": ""}, "torch.torch is empty"),
    ({"rocm": "ten"}, "torch.rocm is not a valid version: 'ten'"),
    ({"torch": "2.x"}, "torch.torch is not a valid version: '2.x'"),
    ({"torchaudio": "2.x"}, "torch.torchaudio is not a valid version: '2.x'"),
    ({"triton": "3.x"}, "torch.triton is not a valid version: '3.x'")])
def test_coherent_pins_refuse_pins_that_are_not_versions(over, message):
    with pytest.raises(UsageError) as err:
        _pins(**over)
    assert err.value.message == message
    if over == {"torch": ""}:
        assert err.value.hint == 'pin an exact +rocm version or "auto"'


def test_tarball_version_is_the_pin_checked_against_the_prefix(tmp_path):
    assert torchindex.tarball_version(tmp_path, "10.1") == "10.1"
    (tmp_path / "rocm-10.1.0").mkdir()
    (tmp_path / "rocm").symlink_to("rocm-10.1.0")
    assert torchindex.tarball_version(tmp_path, "10.1.0") == "10.1.0"
    with pytest.raises(InstallerError) as err:
        torchindex.tarball_version(tmp_path, "10.2.0")
    assert err.value.message == (f"ROCm version mismatch: {tmp_path / 'rocm'} is ROCm 10.1.0 but "
                                 "therock.version is 10.2.0")
    assert err.value.hint == f"reinstall the therock recipe first; {HINT}"
    (tmp_path / "rocm").unlink()
    (tmp_path / "rocm").symlink_to("somewhere-else")  # not one of ours: nothing to compare
    assert torchindex.tarball_version(tmp_path, "10.2.0") == "10.2.0"


@pytest.mark.parametrize("value", ["auto", "latest", ""])
def test_tarball_version_must_be_resolved(tmp_path, value):
    with pytest.raises(UsageError) as err:
        torchindex.tarball_version(tmp_path, value)
    assert err.value.message == "the TheRock tarball version is not known here"
    assert err.value.hint == "pass the resolved therock version to install-torch-stack"


def test_tarball_version_refuses_a_pin_that_is_not_a_version(tmp_path):
    with pytest.raises(UsageError, match=r"^therock.version is not a valid version: 'ten'$"):
        torchindex.tarball_version(tmp_path, "ten")


def test_same_version_compares_versions_not_strings():
    assert torchindex.same_version("10.1", "10.1.0")
    assert not torchindex.same_version("10.1.0", "10.1.1")
    assert not torchindex.same_version("x", "x")


def test_stack_requirements_with_every_companion():
    pins = _pins(torch="2.13.0", torchvision="0.28.0", torchaudio="2.11.0.3",
                 triton="3.8.0+git669b31ac.rocm10.1.0")
    assert torchindex.stack_requirements(pins, ["gfx1201"]) == [
        "rocm[libraries,devel,device-gfx1201]==10.1.0", "rocm-sdk-core==10.1.0",
        "rocm-sdk-libraries==10.1.0", "rocm-sdk-devel==10.1.0", "rocm-sdk-device-gfx1201==10.1.0",
        "torch[device-gfx1201]==2.13.0+rocm10.1.0", "amd-torch-device-gfx1201==2.13.0+rocm10.1.0",
        "torchvision[device-gfx1201]==0.28.0+rocm10.1.0", "torchaudio==2.11.0.3+rocm10.1.0",
        "triton==3.8.0+git669b31ac.rocm10.1.0"]


@pytest.mark.parametrize("tag, py, machine, fits", [
    ("cp312-cp312-manylinux_2_28_x86_64", (3, 12), "x86_64", True),
    ("cp312-cp312-linux_x86_64", (3, 12), "x86_64", True),
    ("cp312-cp312-manylinux_2_28_x86_64", (3, 11), "x86_64", False),
    ("cp312-cp312-manylinux_2_28_aarch64", (3, 12), "x86_64", False),
    ("cp312-cp312-win_amd64", (3, 12), "amd64", False),
    ("cp312-cp312-macosx_11_0_x86_64", (3, 12), "x86_64", False),
    ("py3-none-any", (3, 12), "x86_64", True),
    ("py312-none-any", (3, 12), "x86_64", True),
    ("py2-none-any", (3, 12), "x86_64", False),
    ("py311-none-any", (3, 12), "x86_64", False),
    ("cp39-abi3-manylinux_2_28_x86_64", (3, 12), "x86_64", True),
    ("cp312-abi3-manylinux_2_28_x86_64", (3, 12), "x86_64", True),
    ("cp312-abi3-manylinux_2_28_x86_64", (3, 11), "x86_64", False),
    ("cp39-cp39-manylinux_2_28_x86_64", (3, 12), "x86_64", False),
    ("pp39-abi3-manylinux_2_28_x86_64", (3, 12), "x86_64", False),
    ("cp3x-abi3-manylinux_2_28_x86_64", (3, 12), "x86_64", False),
    ("cp312-none-any", (3, 12), "x86_64", True),
    ("cp312-cp311-any", (3, 12), "x86_64", False)])
def test_a_wheel_fits_this_python_and_machine(tag, py, machine, fits):
    from packaging.tags import parse_tag

    assert torchindex._fits(parse_tag(tag), py, machine) is fits
    if machine == platform.machine():
        assert torchindex.wheel_fits(f"torch-2.13.0-{tag}.whl", py) is fits


def test_names_that_are_not_wheels_or_sdists_are_skipped():
    names = ["torch-2.13.0-cp312-cp312-linux_x86_64.whl", "torch-2.12.0.tar.gz", "torch.whl", "README",
             "torch-2.11.0-cp312-cp312-linux_x86_64.whl"]
    assert torchindex.all_versions(names) == {Version("2.13.0"), Version("2.12.0"), Version("2.11.0")}
    assert torchindex.wheel_versions(names, (3, 12)) == (
        [Version("2.13.0"), Version("2.11.0")] if platform.machine() == "x86_64" else [])
    assert not torchindex.wheel_fits("torch.whl", (3, 12))


def _index(tmp_path, *names) -> str:
    amd = tmp_path / "amd"
    amd.mkdir(exist_ok=True)
    for name in names:   # the index lists names; resolution reads no wheel
        (amd / name).write_bytes(b"")
    return serve_index(amd)


def _whl(name: str, version: str) -> str:
    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return f"{name}-{version}-{py}-{py}-linux_{platform.machine()}.whl"


def test_resolve_picks_the_torchvision_of_the_torch_it_picked(tmp_path):
    url = _index(tmp_path, "rocm-10.1.0.tar.gz", _whl("torch", "2.13.0+rocm10.1.0"),
                 _whl("torch", "2.12.0+rocm10.1.0"), _whl("torch", "2.14.0+rocm10.2.0"),
                 _whl("torchvision", "0.28.0+rocm10.1.0"), _whl("torchvision", "0.27.0+rocm10.1.0"),
                 _whl("torchvision", "0.29.0+rocm10.1.0"), _whl("torchaudio", "2.11.0+rocm10.1.0"))
    py = sys.version_info[:2]
    assert torchindex.resolve_from_index(url, "10.1.0", ["torch", "torchvision", "torchaudio"], py) == {
        "torch": "2.13.0+rocm10.1.0", "torchvision": "0.28.0+rocm10.1.0", "torchaudio": "2.11.0+rocm10.1.0"}
    # a torch pinned elsewhere: its torchvision; none matches: the newest one
    assert torchindex.resolve_from_index(url, "10.1.0", ["torchvision"], py, torch="2.12.0+rocm10.1.0") == {
        "torchvision": "0.27.0+rocm10.1.0"}
    assert torchindex.resolve_from_index(url, "10.1.0", ["torchvision"], py, torch="2.20.0+rocm10.1.0") == {
        "torchvision": "0.29.0+rocm10.1.0"}


def test_resolve_names_what_the_index_lacks(tmp_path):
    url = _index(tmp_path, "rocm-10.1.0.tar.gz", _whl("torch", "2.13.0+rocm10.1.0"))
    py = sys.version_info[:2]
    with pytest.raises(InstallerError) as err:
        torchindex.resolve_from_index(url, "10.2.0", ["torch"], py)
    assert err.value.message == f"ROCm 10.2.0 has no rocm package on {url}"
    assert "stable and nightly builds live on different hosts" in err.value.hint
    with pytest.raises(InstallerError) as err:
        torchindex.resolve_from_index(url, "10.1.0", ["torch", "torchaudio"], py)
    assert err.value.message == f"no torchaudio wheel for ROCm 10.1.0 and cp{py[0]}{py[1]} on {url}"
    assert err.value.hint == 'pin torch.torchaudio exactly, or set it to "" to skip it'


def test_no_torch_for_a_rocm_says_no_version_has_both(tmp_path):
    url = _index(tmp_path, "rocm-10.1.0.tar.gz", "rocm-10.2.0.tar.gz", _whl("torch", "2.13.0+rocm10.3.0"),
                 _whl("torch", "2.13.0+cu128"), _whl("torch", "2.13.0+rocmx"))
    with pytest.raises(InstallerError) as err:
        torchindex.resolve_from_index(url, "10.1.0", ["torch"], sys.version_info[:2])
    assert err.value.hint == "no ROCm version on this index has both rocm and torch wheels for this Python"


def test_the_nearest_versions_are_one_either_side(tmp_path):
    days = ["10.2.0a20260925", "10.2.0a20260926", "10.2.0a20260928", "10.2.0a20260930", "10.2.0a20261001"]
    url = _index(tmp_path, "rocm-10.2.0a20260927.tar.gz",
                 *[f"rocm-{d}.tar.gz" for d in days], *[_whl("torch", f"2.15.0a0+rocm{d}") for d in days])
    with pytest.raises(InstallerError) as err:
        torchindex.resolve_from_index(url, "10.2.0a20260927", ["torch"], sys.version_info[:2])
    assert err.value.hint == ("nearest ROCm versions with both rocm and torch wheels: 10.2.0a20260926, "
                              "10.2.0a20260928; set therock.version to one of them")
    check = torchindex.torch_check(url, sys.version_info[:2])
    assert check("10.2.0a20260926") and not check("10.2.0a20260927")


def test_index_links_are_absolute_and_without_fragments(tmp_path):
    url = _index(tmp_path, "rocm-10.1.0.tar.gz")
    links = torchindex.index_links(url.rstrip("/") + "//", "ROCm")
    assert links == {"rocm-10.1.0.tar.gz": url.replace("/simple/", "/files/rocm-10.1.0.tar.gz")}
    assert torchindex.index_links(url, "torch") == {}


def test_index_links_through_the_cache_answer_offline_later(tmp_path):
    url = _index(tmp_path, "rocm-10.1.0.tar.gz")
    cache = tmp_path / "cache"
    first = torchindex.index_links(url, "rocm", cache_dir=cache)
    assert first == {"rocm-10.1.0.tar.gz": url.replace("/simple/", "/files/rocm-10.1.0.tar.gz")}
    before = len(request_log(url))
    (tmp_path / "amd" / "rocm-10.2.0.tar.gz").write_bytes(b"")
    assert torchindex.index_links(url, "rocm", cache_dir=cache, offline=True) == first
    assert torchindex.index_links(url, "rocm", cache_dir=cache, fresh=False) == first
    assert len(request_log(url)) == before      # neither asked the index again
    assert torchindex.index_links(url, "torch", cache_dir=cache) == {}
    with pytest.raises(InstallerError, match="offline, and .*/simple/nope/ was never read"):
        torchindex.index_links(url, "nope", cache_dir=cache, offline=True)


def test_an_index_page_that_fails_is_named(tmp_path):
    from therock_fixtures import serve

    (tmp_path / "idx" / "simple" / "torch").mkdir(parents=True)
    with serve(tmp_path / "idx", listing="html") as srv:
        srv.fail("simple/torch/", ("status", 403))
        with pytest.raises(InstallerError) as err:
            torchindex.index_links(srv.url + "simple", "torch")
    assert err.value.message == f"cannot read {srv.url}simple/torch/: HTTP 403"
    assert err.value.hint == "check torch.index_url, or pin exact versions"


def test_an_unreachable_index_says_how_to_do_without_it(tmp_path, monkeypatch):
    import socket

    from installer import download

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(download, "RETRIES", 0)
    with pytest.raises(InstallerError) as err:
        torchindex.index_links(f"http://127.0.0.1:{port}/simple", "torch")
    assert "connection refused" in err.value.message
    assert err.value.hint == "check the network, or pin exact versions in recipes/pins.toml"
