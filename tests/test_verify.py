"""verify: a fake venv python reports chosen probe results; real ELF files carry bundles."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from codeobject_fixtures import bundle, ccob, ids_for, make_so, needs_elf, padded, undecodable_zstd_ccob

from installer import codeobjects, state, verify
from installer.errors import InstallerError

ALL_PASS = [{"name": n, "status": "pass", "detail": f"{n} ok"} for n in verify.SCRIPT_PROBES]


def _line(name, status, detail=""):
    return json.dumps({"name": name, "status": status, "detail": detail or f"{name} {status}"})


def fake_prefix(root: Path, lines: list[str], *, exit_code: int = 0, crash: bool = False,
                sleep: float = 0, archs=("gfx1201",), flash_attention="ck", noise: bool = True) -> Path:
    """A prefix whose venv python prints `lines` (and records how it was called)."""
    bindir = root / "venv" / "bin"
    bindir.mkdir(parents=True)
    (root / "venv" / "lib" / "python3.12" / "site-packages" / "vllm").mkdir(parents=True)
    body = "\n".join(f"printf '%s\\n' {shq(line)}" for line in lines)
    script = f"""#!/bin/sh
printf '%s\\n' "$@" > "{root}/argv"
env > "{root}/env"
{"echo 'WARNING: a library talks on stdout'" if noise else ""}
{body}
{f"sleep {sleep}" if sleep else ""}
{"kill -SEGV $$" if crash else ""}
echo 'Traceback (most recent call last): boom' >&2
exit {exit_code}
"""
    py = bindir / "python"
    py.write_text(script)
    py.chmod(0o755)
    components = {"flash-attention": {"status": "done"}} if flash_attention != "none" else {}
    state.write_json_atomic(root / state.RECEIPT, {
        "archs": list(archs), "components": components,
        "pins": {"torch": {"torch": "2.13.0+rocm10.0.0", "rocm": "10.0.0"},
                 "flash-attention": {"backend": flash_attention if flash_attention != "none" else "ck"}}})
    return root


def shq(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


# --- the probe table ---------------------------------------------------------------------

@needs_elf
def test_all_pass_gives_a_pass_table_and_no_failure(tmp_path):
    prefix = fake_prefix(tmp_path / "p", [json.dumps(d) for d in ALL_PASS])
    sp = prefix / "venv" / "lib" / "python3.12" / "site-packages"
    rocm_c = padded(bundle(ids_for("gfx1201")), ccob(bundle(ids_for("gfx1201"))))
    make_so(sp / "vllm" / "_rocm_C.abi3.so", rocm_c, tmp_path)
    make_so(sp / "vllm" / "cumem_allocator.abi3.so", None, tmp_path)
    make_so(sp / "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so", bundle(ids_for("gfx1201")), tmp_path)

    probes = verify.run(prefix)
    assert [p.name for p in probes] == list(verify.SCRIPT_PROBES) + ["vllm.code-objects",
                                                                    "flash_attn.code-objects"]
    assert {p.status for p in probes} == {"pass"}, verify.format_table(probes)
    assert not verify.failed(probes)
    table = verify.format_table(probes)
    assert table.splitlines()[0].split() == ["probe", "result", "detail"]
    assert f"{len(probes)} passed, 0 failed, 0 skipped" in table
    assert "_rocm_C.abi3.so" in probes[-2].detail

    # it ran the probe script from the venv, with the pins and the activation's environment
    argv = (prefix / "argv").read_text().splitlines()
    assert argv[0] == str(verify.PROBES_SCRIPT)
    assert json.loads(argv[1]) == {"archs": ["gfx1201"], "torch": "2.13.0+rocm10.0.0",
                                   "rocm": "10.0.0", "flash_attn": "ck"}
    env = dict(line.split("=", 1) for line in (prefix / "env").read_text().splitlines() if "=" in line)
    assert env["VIRTUAL_ENV"] == str(prefix / "venv")
    assert env["PATH"].startswith(str(prefix / "venv" / "bin") + ":")
    assert env["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == "FALSE"
    assert env["ROCM_PATH"] == str(prefix / "rocm")


def test_a_failing_probe_fails_the_run(tmp_path):
    lines = [_line("torch.import", "pass"), _line("torch.version", "fail", "torch 2.12.0 != pin 2.13.0"),
             *[_line(n, "skip", "no GPU") for n in verify.SCRIPT_PROBES[2:]]]
    probes = verify.run(fake_prefix(tmp_path / "p", lines, flash_attention="none"))
    assert verify.failed(probes)
    row = next(line for line in verify.format_table(probes).splitlines() if line.startswith("torch.version"))
    assert row.split()[1] == "fail" and "!= pin 2.13.0" in row


def test_skips_alone_do_not_fail(tmp_path):
    # a host without the GPU: hardware probes skip, and nothing was built with code objects yet
    lines = [_line("torch.import", "pass"), _line("torch.version", "pass"),
             *[_line(n, "skip", "no GPU visible to torch on this host") for n in verify.SCRIPT_PROBES[2:]]]
    prefix = fake_prefix(tmp_path / "p", lines, flash_attention="triton")
    probes = verify.run(prefix, archs=("gfx1200",))
    by = {p.name: p for p in probes}
    assert by["vllm.code-objects"].status == "fail"   # vLLM must be there
    assert by["flash_attn.code-objects"].status == "skip"  # Triton has no prebuilt code
    assert json.loads((prefix / "argv").read_text().splitlines()[1])["archs"] == ["gfx1200"]
    assert [p for p in probes if p.status == "fail"] == [by["vllm.code-objects"]]


def test_a_crash_marks_the_rest_as_failed(tmp_path):
    lines = [_line("torch.import", "pass"), _line("torch.version", "pass")]
    probes = verify.run(fake_prefix(tmp_path / "p", lines, crash=True))
    by = {p.name: p for p in probes}
    assert by["torch.version"].status == "pass"
    assert by["probes"].status == "fail" and "exited with code -11" in by["probes"].detail
    for name in verify.SCRIPT_PROBES[2:]:
        assert by[name].status == "fail" and "not reached" in by[name].detail
    assert verify.failed(probes)


def test_an_error_exit_is_reported_with_its_last_stderr_line(tmp_path):
    probes = verify.run(fake_prefix(tmp_path / "p", [], exit_code=1))
    crash = next(p for p in probes if p.name == "probes")
    assert "exited with code 1: Traceback (most recent call last): boom" in crash.detail


def test_a_hung_probe_process_times_out(tmp_path):
    probes = verify.run(fake_prefix(tmp_path / "p", [_line("torch.import", "pass")], sleep=30),
                        timeout=1)
    assert "timed out after 1s" in next(p for p in probes if p.name == "probes").detail


def test_json_output_shape(tmp_path):
    probes = [verify.Probe("a", "pass", "x"), verify.Probe("b", "skip", "y")]
    assert json.loads(verify.to_json(probes)) == {"probes": [
        {"name": "a", "status": "pass", "detail": "x"}, {"name": "b", "status": "skip", "detail": "y"}]}


def test_no_venv_is_a_user_error(tmp_path):
    with pytest.raises(InstallerError) as err:
        verify.run(tmp_path / "empty")
    assert "no venv at" in err.value.message and "rdna4-install install --prefix" in err.value.hint


def test_unknown_target_is_a_user_error(tmp_path):
    prefix = fake_prefix(tmp_path / "p", [], archs=())
    with pytest.raises(InstallerError, match="no target arch"):
        verify.run(prefix)


def test_the_real_probe_script_reports_every_probe_without_torch(tmp_path):
    # this interpreter has no torch: the script must still report each probe, in order
    expect = {"archs": ["gfx1201"], "torch": "2.13.0", "rocm": "10.0.0", "flash_attn": "ck"}
    probes = verify.run_script_probes(Path(sys.executable), expect, {"PATH": "/usr/bin:/bin"})
    assert [p.name for p in probes] == list(verify.SCRIPT_PROBES)
    by = {p.name: p for p in probes}
    assert by["torch.import"].status == "fail" and "torch" in by["torch.import"].detail
    assert by["torch.fp8-scaled-mm"].status == "skip"
    assert by["vllm.import"].status == "fail"


# --- code objects --------------------------------------------------------------------------

@needs_elf
def test_an_extension_without_the_target_fails(tmp_path):
    good = make_so(tmp_path / "a.so", bundle(ids_for("gfx1201")), tmp_path)
    bad = make_so(tmp_path / "b.so", ccob(bundle(ids_for("gfx942", "gfx950"))), tmp_path)
    probe = verify.code_object_probe("vllm.code-objects", [good, bad], ("gfx1201",), "fail")
    assert probe.status == "fail"
    assert probe.detail == "b.so has code for gfx942,gfx950, not gfx1201"


@needs_elf
def test_host_only_libraries_are_not_enough(tmp_path):
    plain = make_so(tmp_path / "cumem_allocator.so", None, tmp_path)
    probe = verify.code_object_probe("vllm.code-objects", [plain], ("gfx1201",), "fail")
    assert probe.status == "fail" and "no HIP code objects" in probe.detail


def test_a_non_elf_file_is_reported_not_raised(tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an elf file at all" * 4)
    probe = verify.code_object_probe("vllm.code-objects", [junk], ("gfx1201",), "fail")
    assert probe.status == "fail" and "not a 64-bit little-endian ELF" in probe.detail


@needs_elf
def test_code_objects_this_host_cannot_decode_skip_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(codeobjects, "ZSTD_DECODERS", (lambda data, size: None,))
    so = make_so(tmp_path / "_rocm_C.so", undecodable_zstd_ccob(), tmp_path)
    probe = verify.code_object_probe("vllm.code-objects", [so], ("gfx1201",), "fail")
    assert probe.status == "skip"
    assert "no zstd decoder" in probe.detail and "install zstd" in probe.detail


# a torch stand-in with one visible gfx1201 that can leave a thread spinning after the
# first GPU op, as torch >= 2.12 does on ROCm 10.0.0's runtime (ROCm/ROCm#6406)
SPIN_TORCH = '''
import os, threading
class _Props:
    gcnArchName = "gfx1201:sramecc-:xnack-"
class cuda:
    @staticmethod
    def is_available(): return True
    @staticmethod
    def device_count(): return 1
    @staticmethod
    def get_device_properties(i): return _Props()
    @staticmethod
    def synchronize(dev=None): pass
class _T:
    def __mul__(self, o): return self
    def sum(self): return self
    def item(self):
        if os.environ.get("SPIN") == "1":
            def spin():
                while True: pass
            threading.Thread(target=spin, daemon=True).start()
        return 0.0
def ones(*a, **k): return _T()
'''


@pytest.mark.parametrize("spin, status", [("0", "pass"), ("1", "fail")])
def test_idle_cpu_probe_catches_a_spinning_runtime(tmp_path, spin, status):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(SPIN_TORCH)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "SPIN": spin}
    expect = {"archs": ["gfx1201"], "torch": "", "rocm": "", "flash_attn": "none"}
    probes = {p.name: p for p in verify.run_script_probes(Path(sys.executable), expect, env)}
    assert probes["torch.idle-cpu"].status == status, probes["torch.idle-cpu"].detail
    assert "of a core used while idle" in probes["torch.idle-cpu"].detail


# --- torch.tp2 -------------------------------------------------------------------------------

# A torch stand-in with FAKE_GPUS gfx1201 cards whose "RCCL" all-reduce meets the other
# ranks through files (the real worker code runs unchanged on top of it). FAKE_RCCL picks
# the behaviour: ok, wrong (off by one), hang (the gfx1201 LL deadlock), crash (rank 1).
TP2_TORCH = '''
import os
float32 = "float32"
class _Props:
    gcnArchName = "gfx1201:sramecc-:xnack-"
class cuda:
    @staticmethod
    def is_available(): return int(os.environ["FAKE_GPUS"]) > 0
    @staticmethod
    def device_count(): return int(os.environ["FAKE_GPUS"])
    @staticmethod
    def get_device_properties(i): return _Props()
    @staticmethod
    def set_device(i): pass
    @staticmethod
    def synchronize(dev=None): pass
class _Scalar:
    def __init__(self, v): self.v = v
    def item(self): return self.v
class Tensor:
    def __init__(self, v): self.v = v
    def min(self): return _Scalar(self.v)
    def max(self): return _Scalar(self.v)
def full(shape, value, dtype=None, device=None): return Tensor(value)
'''
TP2_DIST = '''
import os, pathlib, time
_s = {}
def init_process_group(backend, init_method, rank, world_size, timeout):
    _s.update(rank=rank, world=world_size, port=init_method.rsplit(":", 1)[1], n=0)
def all_reduce(t):
    mode, rank, base = os.environ["FAKE_RCCL"], _s["rank"], pathlib.Path(os.environ["FAKE_DIR"])
    if mode == "hang":
        (base / f"pid-{rank}").write_text(str(os.getpid()))
        time.sleep(3600)
    if mode == "crash" and rank == 1:
        raise RuntimeError("NCCL error: unhandled cuda error")
    meet = base / _s["port"] / str(_s["n"])
    meet.mkdir(parents=True, exist_ok=True)
    (meet / f".{rank}").write_text(repr(t.v))
    (meet / f".{rank}").rename(meet / str(rank))
    while len([p for p in meet.iterdir() if not p.name.startswith(".")]) < _s["world"]:
        time.sleep(0.01)
    t.v = sum(float((meet / str(r)).read_text()) for r in range(_s["world"])) + (mode == "wrong")
    _s["n"] += 1
def destroy_process_group(): pass
'''


def _tp2(tmp_path, gpus=2, mode="ok", timeout=60):
    pkg = tmp_path / "fake" / "torch"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(TP2_TORCH)
    (pkg / "distributed.py").write_text(TP2_DIST)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkg.parent), "FAKE_GPUS": str(gpus),
           "FAKE_RCCL": mode, "FAKE_DIR": str(tmp_path)}
    expect = {"archs": ["gfx1201"], "torch": "", "rocm": "", "flash_attn": "none", "tp2_timeout": timeout}
    probes = {p.name: p for p in verify.run_script_probes(Path(sys.executable), expect, env)}
    return probes["torch.tp2"]


def test_tp2_passes_when_every_rank_reads_the_sum(tmp_path):
    probe = _tp2(tmp_path)
    assert probe.status == "pass", probe.detail
    assert "across 2 processes" in probe.detail and "sums right" in probe.detail


def test_tp2_fails_on_a_wrong_sum(tmp_path):
    probe = _tp2(tmp_path, mode="wrong")
    assert probe.status == "fail" and "gave 4.0..4.0, not 3.0" in probe.detail


def test_tp2_turns_a_deadlock_into_a_failure_and_kills_the_ranks(tmp_path):
    probe = _tp2(tmp_path, mode="hang", timeout=4)
    assert probe.status == "fail"
    assert "did not finish in 4s: a deadlock" in probe.detail and "NCCL_PROTO=Simple" in probe.detail
    for rank in (0, 1):
        pid = int((tmp_path / f"pid-{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tp2_reports_a_crashed_rank_without_waiting_for_the_timeout(tmp_path):
    started = time.monotonic()
    probe = _tp2(tmp_path, mode="crash", timeout=120)
    assert probe.status == "fail"
    assert probe.detail.startswith("rank 1 exited with code 1: RuntimeError: NCCL error")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("gpus, reason", [(1, "needs 2 target GPUs, 1 visible (gfx1201)"),
                                          (0, "no GPU visible to torch on this host")])
def test_tp2_skips_with_the_reason_below_two_gpus(tmp_path, gpus, reason):
    probe = _tp2(tmp_path, gpus=gpus)
    assert probe.status == "skip" and reason in probe.detail


def test_tp2_skips_on_this_gpu_less_host_without_torch(tmp_path):
    expect = {"archs": ["gfx1201"], "torch": "", "rocm": "", "flash_attn": "none"}
    probes = {p.name: p for p in verify.run_script_probes(Path(sys.executable), expect,
                                                           {"PATH": "/usr/bin:/bin"})}
    assert probes["torch.tp2"].status == "skip" and "needs torch" in probes["torch.tp2"].detail
@needs_elf
def test_verify_fails_when_an_extension_lacks_one_of_two_targets(tmp_path):
    """A gfx1200+gfx1201 prefix: an extension with only gfx1201 fails (every
    target must be there, not any)."""
    prefix = fake_prefix(tmp_path / "p", [json.dumps(d) for d in ALL_PASS], archs=("gfx1200", "gfx1201"))
    sp = prefix / "venv" / "lib" / "python3.12" / "site-packages"
    make_so(sp / "vllm" / "_rocm_C.abi3.so", bundle(ids_for("gfx1200", "gfx1201")), tmp_path)
    make_so(sp / "vllm" / "_C.abi3.so", bundle(ids_for("gfx1201")), tmp_path)
    make_so(sp / "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so", bundle(ids_for("gfx1200", "gfx1201")),
            tmp_path)
    probes = verify.run(prefix)
    assert verify.failed(probes)
    vllm = next(p for p in probes if p.name == "vllm.code-objects")
    assert vllm.status == "fail" and vllm.detail == "_C.abi3.so has code for gfx1201, not gfx1200,gfx1201"
    assert next(p for p in probes if p.name == "flash_attn.code-objects").status == "pass"
