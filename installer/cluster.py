"""`rdna4-install cluster head|join|status|stop`: Ray's own commands, run from the prefix.

No cluster manager of our own: each verb is one `ray` command from PREFIX/venv/bin
(`ray start --head`, `ray start --address`, `ray status`, `ray stop`) with the
activation's environment, so every Ray process (and so every vLLM worker Ray
starts) gets the same RCCL, GPU visibility and AITER settings as an activated
shell. Extra arguments go to `ray` unchanged.

`ray stop` stops every Ray process of this user on the machine, whoever started
it. So `stop` first looks for a Ray node (raylet, gcs_server) running from
another install and refuses then, unless told `--all`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from . import activate, proc, state
from .errors import InstallerError, UsageError

VERBS = {"head": ["start", "--head"], "join": ["start", "--address"], "status": ["status"],
         "stop": ["stop"]}
# the processes that make a Ray node; both are binaries inside the ray package
# (ray/core/src/ray/raylet/raylet, ray/core/src/ray/gcs/gcs_server)
NODE_PROCESSES = ("raylet", "gcs_server")


def ray_executable(prefix: Path) -> Path:
    ray = Path(prefix) / "venv" / "bin" / "ray"
    if not ray.exists():
        # activate too: its files gain the Ray variables
        raise InstallerError(f"Ray is not installed in {prefix}",
                             hint=f"rdna4-install run ray activate --with ray --prefix '{prefix}'")
    return ray


def environment(prefix: Path) -> dict[str, str]:
    """This shell after sourcing PREFIX/activate, with the GPU visibility the install recorded.

    The caller's whole environment stays: what Ray's workers need from the user
    (NCCL_SOCKET_IFNAME, VLLM_HOST_IP, HF_HOME, HF_TOKEN) reaches them only this way.
    """
    receipt = state.read_receipt(prefix) or {}
    act = activate.from_receipt(prefix, visible_devices=str(receipt.get("visible_devices", "")),
                                receipt=receipt)
    return activate.environment(act, inherit=True)


def foreign_nodes(venv: Path, proc_root: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, executable) of this user's Ray node processes that run from outside `venv`."""
    found = []
    mine = str(Path(venv).resolve()) + os.sep
    try:
        pids = [p for p in proc_root.iterdir() if p.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            if pid.stat().st_uid != os.getuid():
                continue
            name = (pid / "comm").read_text().strip()
            if name not in NODE_PROCESSES:
                continue
            exe = os.readlink(pid / "exe")
        except OSError:
            continue   # gone, or not ours to read
        if not exe.startswith(mine):
            found.append((int(pid.name), exe))
    return found


def argv(prefix: Path, verb: str, address: str | None = None,
         ray_args: Sequence[str] = ()) -> list[str]:
    if verb not in VERBS:
        raise UsageError(f"unknown cluster command {verb!r}", hint=f"use one of: {', '.join(VERBS)}")
    if (verb == "join") != bool(address):
        raise UsageError("join needs the head's ADDRESS (host:port)" if verb == "join"
                         else f"{verb} takes no ADDRESS",
                         hint=f"rdna4-install cluster join HEAD_IP:6379 --prefix '{prefix}'")
    return [str(ray_executable(prefix)), *VERBS[verb], *([address] if address else []), *ray_args]


def run(prefix: Path, verb: str, *, address: str | None = None, ray_args: Sequence[str] = (),
        stop_all: bool = False, on_line: Callable[[str], None] | None = None) -> None:
    """Run the verb's `ray` command; its output goes to `on_line` and PREFIX/.rdna4/logs/cluster.log."""
    prefix = Path(prefix)
    command = argv(prefix, verb, address, ray_args)
    if verb == "stop" and not stop_all:
        others = foreign_nodes(prefix / "venv")
        if others:
            pid, exe = others[0]
            raise InstallerError(
                f"a Ray node from another install runs here (pid {pid}: {exe}); `ray stop` "
                "would stop it too", hint=f"rdna4-install cluster stop --all --prefix '{prefix}'")
    log = state.logs_dir(prefix) / "cluster.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc.run(command, env=environment(prefix), cwd=prefix, log=log, on_line=on_line,
             what=f"ray {' '.join(VERBS[verb])}")
