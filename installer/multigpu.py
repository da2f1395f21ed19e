"""More than one GPU: what detection says about them, and what RCCL and Ray need then.

One seam for the capability: `facts` turns a detection into the install options
the activate recipe receives (`{gpu_count}`, `{peer_access}`); `settings` turns
those options (and the `ray.enabled` pin) into activation variables, each with
the upstream evidence it rests on; `recorded` reads them back from a receipt so
a rerun without detection (`run`, `plan`, verify) keeps them.

P2P is read from the KFD topology only: rocminfo prints no peer information.
KFD lists GPU B under GPU A's `p2p_links` only when amdgpu finds B's VRAM
reachable over PCIe from A (linux drivers/gpu/drm/amd/amdkfd/kfd_topology.c,
kfd_add_peer_prop: CONFIG_HSA_AMD_P2P and amdgpu_device_is_peer_accessible,
which needs a large BAR and a pci_p2pdma path). That is the same test
hipDeviceCanAccessPeer answers from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .detect import KFD_NODES, parse_properties, resolve_root, under

if TYPE_CHECKING:
    from .activate import Setting
    from .detect import Detection

YES, NO = "yes", "no"


def peer_links(root: Path, node: int) -> set[int]:
    """KFD nodes that `node` reports a P2P link to (empty when the kernel lists none)."""
    links: set[int] = set()
    base = under(root, KFD_NODES) / str(node) / "p2p_links"
    try:
        entries = list(base.iterdir())
    except OSError:
        return links
    for entry in entries:
        try:
            props = parse_properties((entry / "properties").read_text())
        except OSError:
            continue
        if "node_to" in props:
            links.add(props["node_to"])
    return links


def facts(detection: Detection, sysfs_root: Path | str | None = None) -> dict[str, str]:
    """Install options from detection: how many target GPUs the runtime sees, and P2P.

    gpu_count counts the discrete RDNA4 GPUs KFD knows (the ones ROCR_VISIBLE_DEVICES
    keeps); peer_access is "yes" when every ordered pair links, "no" when any pair
    does not, "" with fewer than two.
    """
    nodes = [g.node for g in detection.gpus if g.targeted and g.node is not None]
    peer = ""
    if len(nodes) >= 2:
        root = resolve_root(sysfs_root)
        links = {n: peer_links(root, n) for n in nodes}
        peer = YES if all(b in links[a] for a in nodes for b in nodes if a != b) else NO
    return {"gpu_count": str(len(nodes)), "peer_access": peer}


def recorded(receipt: Mapping[str, Any]) -> dict[str, str]:
    """The options the last activation was written with (empty when none were)."""
    act = (((receipt.get("components") or {}).get("activate") or {}).get("facts") or {}).get("activate") or {}
    found = act.get("multigpu") or {}
    return {k: str(found[k]) for k in ("gpu_count", "peer_access") if k in found}


def settings(gpu_count: int, peer_access: str, ray: bool) -> list[Setting]:
    """Activation variables for several GPUs and for Ray, each with its reason."""
    from .activate import Setting

    out: list[Setting] = []
    if gpu_count >= 2:
        out.append(Setting(
            "NCCL_PROTO", "Simple",
            "RCCL's auto-picked LL protocol deadlocks TP=2 on gfx1201 (vllm-project/vllm#40980, "
            "ROCm/rocm-systems#5480); its fix (rocm-systems#11035, 2026-09-09) postdates TheRock "
            "10.1's RCCL branch therock-10.1-20260825 (rocm-systems#10873); UNCONFIRMED: no cherry-pick seen"))
        if peer_access == NO:
            out.append(Setting(
                "NCCL_P2P_DISABLE", "1",
                "these GPUs report no PCIe P2P to each other (KFD p2p_links); RCCL and vLLM TP "
                "hang without it there (ROCm/vllm#390, ROCm/rocm-systems#11348)"))
    if ray and gpu_count >= 1:
        out.append(Setting(
            "HIP_VISIBLE_DEVICES", ",".join(str(i) for i in range(gpu_count)),
            "Ray schedules AMD GPUs by HIP_VISIBLE_DEVICES and refuses ROCR_VISIBLE_DEVICES alone "
            "(ray 2.56.1 _private/accelerators/amd_gpu.py); vLLM copies it to CUDA_VISIBLE_DEVICES "
            "(vllm 0.33.0 platforms/rocm.py); indexes count after ROCR_VISIBLE_DEVICES"))
    if ray:
        out += [
            Setting("CUDA_VISIBLE_DEVICES", None,
                    "a value that differs from HIP_VISIBLE_DEVICES stops both Ray and vLLM "
                    "('Inconsistent ...', ray amd_gpu.py, vllm platforms/rocm.py)"),
            Setting("RAY_USAGE_STATS_ENABLED", "0",
                    "no usage reports from `ray start`; vLLM turns them off for its own Ray "
                    "calls too (vllm 0.33.0 v1/executor/ray_utils.py)"),
        ]
    return out
