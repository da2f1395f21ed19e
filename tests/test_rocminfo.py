"""rocminfo parsing and failure naming on captured outputs (tests/data/detect/)."""

from __future__ import annotations

import pytest

from installer.detect import bdf
from installer.rocminfo import classify_rocminfo, parse_rocminfo

from detect_fixtures import EXIT_CODES, add_noise, fixture

ALL_OUTPUTS = ["F1", "F3", "F4"] + [f"E{i}" for i in range(1, 9)]


def gpu_view(parse):
    return [(a.name, a.marketing_name, a.node, a.chip_id, a.bdfid, a.compute_units, a.apu,
             a.coarse_kib, a.uuid) for a in parse.gpus]


def test_f1_parse_matches_the_report():
    parse = parse_rocminfo(fixture("F1"))
    assert [a.device_type for a in parse.agents] == ["CPU", "GPU", "GPU"]
    assert gpu_view(parse) == [
        ("gfx1201", "AMD Radeon RX 9070 XT", 1, 0x7550, 768, 64, False, 16695296,
         "GPU-2b09110b94528d60"),
        ("gfx1036", "AMD Radeon Graphics", 2, 0x13C0, 30208, 2, True, 64686176, "GPU-XX"),
    ]
    assert parse.module_version == "6.14.14"
    assert bdf(0, 768) == "0000:03:00.0" and bdf(0, 30208) == "0000:76:00.0"


def test_f3_parse_rx9060xt():
    parse = parse_rocminfo(fixture("F3"))
    assert len(parse.agents) == 2
    assert gpu_view(parse) == [("gfx1200", "AMD Radeon RX 9060 XT", 1, 0x7590, 1024, 32, False,
                                16695296, "GPU-76d4de1a1944b098")]
    assert parse.module_version == "6.16.13"


def test_f4_strix_halo_ignores_the_npu_and_generic_isa():
    parse = parse_rocminfo(fixture("F4"))
    assert [a.device_type for a in parse.agents] == ["CPU", "GPU", "DSP"]
    [gpu] = parse.gpus
    assert (gpu.name, gpu.apu, gpu.chip_id, gpu.bdfid, gpu.compute_units) == (
        "gfx1151", True, 0x1586, 49408, 40)
    assert parse.module_version is None      # in-tree driver: "ROCk module is loaded"


@pytest.mark.parametrize("name", ALL_OUTPUTS)
@pytest.mark.parametrize("seed", range(4))
def test_noise_does_not_change_the_parse(name, seed):
    text = fixture(name)
    code = EXIT_CODES.get(name, 0)
    want = parse_rocminfo(text)
    want_failure = classify_rocminfo(code, False, text)
    assert add_noise(text, seed) != text
    for noisy in (add_noise(text, seed), add_noise(text, seed, strip=True)):
        got = parse_rocminfo(noisy)
        assert got == want
        assert classify_rocminfo(code, False, noisy) == want_failure


@pytest.mark.parametrize("name, kind", [
    ("E1", "not-loaded"), ("E2", "no-group"), ("E3", "relogin"), ("E4", "no-kfd"),
    ("E5", "refused"), ("E6", "out-of-resources"), ("E7", "out-of-resources"),
    ("E8", "not-live"),
])
def test_failures_are_classified(name, kind):
    text = fixture(name)
    assert parse_rocminfo(text).agents == []
    failure = classify_rocminfo(EXIT_CODES[name], False, text)
    assert failure is not None and failure.kind == kind
    assert "\x1b" not in failure.summary


def test_success_outputs_are_not_failures():
    for name in ("F1", "F3", "F4"):
        assert classify_rocminfo(0, False, fixture(name)) is None
    cpu_only = fixture("F3").split("*******                  \nAgent 2")[0]
    assert classify_rocminfo(0, False, cpu_only).kind == "no-gpu"
    assert classify_rocminfo(-1, True, "").kind == "hang"
