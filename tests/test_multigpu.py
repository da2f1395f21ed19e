"""Several GPUs: target count and P2P read from fake KFD trees, the RCCL/Ray settings they
lead to, and the round trip through the activate step's facts and the receipt."""

from __future__ import annotations

from pathlib import Path

import pytest
from detect_fixtures import R9700_UUIDS, dual_r9700_host, f1_host, gpuless_host

from installer import activate, detect, multigpu
from installer.actions import StepContext
from installer.errors import InstallerError


def _facts(root: Path) -> tuple[detect.Detection, dict[str, str]]:
    found = detect.detect(sysfs_root=root, rocminfo="/nonexistent/rocminfo", env={})
    return found, multigpu.facts(found, root)


def _names(**kw) -> dict[str, str | None]:
    return {s.name: s.value for s in activate.plan(Path("/p"), archs=("gfx1201",), **kw).settings}


def test_two_cards_with_p2p_and_an_igpu(tmp_path):
    found, facts = _facts(dual_r9700_host(tmp_path / "sys", p2p=True))
    assert facts == {"gpu_count": "2", "peer_access": "yes"}
    # the iGPU stays hidden: only the two cards, by UUID
    assert found.visible_devices == ",".join(R9700_UUIDS)


def test_two_cards_without_p2p(tmp_path):
    _, facts = _facts(dual_r9700_host(tmp_path / "sys", p2p=False))
    assert facts == {"gpu_count": "2", "peer_access": "no"}


def test_a_link_in_one_direction_only_is_no_p2p(tmp_path):
    root = dual_r9700_host(tmp_path / "sys", p2p=True)
    # card 2 lists no link back to card 1 (the kernel checks each direction on its own)
    link = root / "sys/class/kfd/kfd/topology/nodes/2/p2p_links"
    for entry in link.iterdir():
        if "node_to 1\n" in (entry / "properties").read_text():
            (entry / "properties").unlink()
            entry.rmdir()
    assert _facts(root)[1]["peer_access"] == "no"


def test_four_cards_all_linked(tmp_path):
    _, facts = _facts(dual_r9700_host(tmp_path / "sys", p2p=True, igpu=False, cards=4))
    assert facts == {"gpu_count": "4", "peer_access": "yes"}


@pytest.mark.parametrize("host, count", [(f1_host, "1"), (gpuless_host, "0")])
def test_one_or_no_card_has_no_p2p_question(tmp_path, host, count):
    _, facts = _facts(host(tmp_path / "sys"))
    assert facts == {"gpu_count": count, "peer_access": ""}


def test_rccl_settings_follow_count_and_p2p():
    one = _names(gpu_count=1, peer_access="")
    assert "NCCL_PROTO" not in one and "NCCL_P2P_DISABLE" not in one
    two = _names(gpu_count=2, peer_access="yes")
    assert two["NCCL_PROTO"] == "Simple" and "NCCL_P2P_DISABLE" not in two
    no_p2p = _names(gpu_count=2, peer_access="no")
    assert no_p2p["NCCL_PROTO"] == "Simple" and no_p2p["NCCL_P2P_DISABLE"] == "1"
    # without Ray nothing touches the variables Ray and vLLM argue about
    assert not {"HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"} & set(no_p2p)


def test_ray_settings():
    ray2 = _names(gpu_count=2, peer_access="yes", ray=True, visible_devices=",".join(R9700_UUIDS))
    assert ray2["HIP_VISIBLE_DEVICES"] == "0,1"        # counted after ROCR_VISIBLE_DEVICES
    assert ray2["ROCR_VISIBLE_DEVICES"] == ",".join(R9700_UUIDS)
    assert ray2["CUDA_VISIBLE_DEVICES"] is None        # unset while active
    assert ray2["VLLM_ROCM_USE_AITER"] == "0"
    assert ray2["RAY_USAGE_STATS_ENABLED"] == "0"
    # a GPU-less head node: Ray must not be told about GPUs it does not have
    head = _names(gpu_count=0, ray=True)
    assert "HIP_VISIBLE_DEVICES" not in head and head["CUDA_VISIBLE_DEVICES"] is None


def test_every_multigpu_setting_names_its_evidence():
    for s in multigpu.settings(2, "no", True):
        assert "#" in s.why or ".py" in s.why, s


def test_facts_survive_the_receipt_for_reruns_without_detection(tmp_path):
    root = dual_r9700_host(tmp_path / "sys", p2p=False)
    found, facts = _facts(root)
    prefix = tmp_path / "prefix"
    ctx = StepContext(name="activate", prefix=prefix, cache_dir=tmp_path / "c", work_dir=tmp_path / "w",
                      log=tmp_path / "log", env={}, vars={"flash-attention.backend": "none",
                                                          "ray.enabled": "false"},
                      archs=("gfx1201",), jobs=1,
                      options={"visible_devices": found.visible_devices, **facts})
    activate.write_step(ctx)
    text = (prefix / "activate").read_text()
    assert "export NCCL_PROTO=Simple\n" in text and "export NCCL_P2P_DISABLE=1\n" in text
    receipt = {"archs": ["gfx1201"], "components": {"activate": {"facts": ctx.facts}},
               "pins": {"ray": {"enabled": "false"}}}
    assert multigpu.recorded(receipt) == facts
    again = activate.from_receipt(prefix, visible_devices=found.visible_devices, receipt=receipt)
    assert {s.name: s.value for s in again.settings}["NCCL_P2P_DISABLE"] == "1"


def test_a_gpu_count_that_is_not_a_number_is_refused(tmp_path):
    ctx = StepContext(name="activate", prefix=tmp_path, cache_dir=tmp_path, work_dir=tmp_path,
                      log=tmp_path / "log", env={}, vars={}, archs=("gfx1201",), jobs=1,
                      options={"gpu_count": "two"})
    with pytest.raises(InstallerError, match="gpu_count must be a whole number"):
        activate.write_step(ctx)
    assert not (tmp_path / "activate").exists()
