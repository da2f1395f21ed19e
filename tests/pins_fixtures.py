"""Exact values for every pin the resolvers would otherwise derive from AMD's wheel index
or PyPI, so a test can plan the real recipes with no network (a user does the same with
`--pins FILE` or a lock). The derivation itself is tested against loopback stand-ins in
test_torchpins.py, test_pypi.py and test_pincheck.py."""

from __future__ import annotations

from pathlib import Path

import pytest

EXACT_PINS = """\
[torch]
torchvision = "0.28.0"
torchaudio = "2.11.0.3"
triton = "3.8.0+git669b31ac.rocm10.1.0"
[vllm]
sdist_url = "https://files.pythonhosted.org/packages/f7/25/aa5684e9c59d6fc75f78926b7f15e8d9adc7de2d9e6e7575b80776ad8169/vllm-0.33.0.tar.gz"
sdist_sha256 = "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112"
"""


def write_exact_pins(folder: Path) -> Path:
    path = folder / "exact-pins.toml"
    path.write_text(EXACT_PINS)
    return path


@pytest.fixture
def exact_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RDNA4_PINS points at EXACT_PINS for this test (CLI runs and child installers alike)."""
    path = write_exact_pins(tmp_path)
    monkeypatch.setenv("RDNA4_PINS", str(path))
    return path
