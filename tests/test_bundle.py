"""The bundle container: both compressions round-trip, and the verifier's rules (fast, no install)."""

from __future__ import annotations

import hashlib
import json

import pytest

from installer import bundle
from installer.errors import InstallerError


def _stage(tmp_path, files: dict[str, bytes], archs=("gfx1201",)):
    stage = tmp_path / "stage"
    for name, data in files.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(data)
    members = {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}
    return stage, {"format": bundle.FORMAT, "archs": list(archs), "members": members}


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_bundle_round_trips_through_either_compression(tmp_path, monkeypatch, kind):
    if kind == "gzip":
        monkeypatch.setattr(bundle, "zstd_module", lambda: None)
    elif bundle.zstd_module() is None:
        pytest.skip("no zstd in this Python (compression.zstd needs 3.14; or install zstandard)")
    stage, manifest = _stage(tmp_path, {"mirror/files/x/a.tar.gz": b"tarball", "wheels/vllm/k/v.whl": b"PK"})
    out = tmp_path / "b.bundle"
    bundle._write(stage, manifest, str(out))
    magic = out.read_bytes()[:4]
    assert magic == bundle.ZSTD_MAGIC if kind == "zstd" else magic.startswith(bundle.GZIP_MAGIC)
    got = bundle.unpack(str(out), cache_dir=tmp_path / "cache", prefix=tmp_path / "q", archs=("gfx1201",),
                        ui=None)
    assert (got / "wheels/vllm/k/v.whl").read_bytes() == b"PK"
    assert json.loads((got / bundle.MANIFEST).read_text())["members"] == manifest["members"]


def test_a_member_that_does_not_match_is_refused_and_nothing_stays(tmp_path):
    stage, manifest = _stage(tmp_path, {"a": b"one", "b": b"two"})
    manifest["members"]["b"]["sha256"] = "0" * 64
    out = tmp_path / "b.bundle"
    bundle._write(stage, manifest, str(out))
    with pytest.raises(InstallerError, match="member b does not match") as err:
        bundle.unpack(str(out), cache_dir=tmp_path / "cache", prefix=tmp_path / "q", archs=("gfx1201",), ui=None)
    assert "nothing was installed" in err.value.message and err.value.hint
    assert list((tmp_path / "cache" / "bundles").iterdir()) == []


def test_not_a_bundle(tmp_path):
    out = tmp_path / "b.bundle"
    out.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(InstallerError, match="not an rdna4-install bundle"):
        bundle.unpack(str(out), cache_dir=tmp_path / "cache", prefix=tmp_path / "q", archs=("gfx1201",), ui=None)


def test_a_bundle_of_another_target_profile_is_refused_naming_it(tmp_path):
    stage, manifest = _stage(tmp_path, {"a": b"one"}, archs=("gfx1151",))
    manifest["target"] = "strix-halo"
    out = tmp_path / "b.bundle"
    bundle._write(stage, manifest, str(out))
    with pytest.raises(InstallerError) as err:
        bundle.unpack(str(out), cache_dir=tmp_path / "cache", prefix=tmp_path / "q", archs=("gfx1201",), ui=None)
    assert err.value.message == (f"bundle {out} was built for target strix-halo (gfx1151), but this install "
                                 "targets gfx1201; nothing was installed")
    assert "--gpu-arch gfx1151" in err.value.hint
    assert not (tmp_path / "q").exists()
