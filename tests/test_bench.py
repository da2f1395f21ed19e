"""bench against a fake `vllm` that serves /health and writes a result file."""

from __future__ import annotations

import io
import json
import socket

import pytest

from bench_fixtures import RESULT, install_fake_vllm, read_state, wait_dead
from installer import bench
from installer.errors import InstallerError, StepFailed, UsageError
from installer.ui import UI


class Recorder(UI):
    """A real UI writing to a buffer; optionally interrupts on the first client line."""

    def __init__(self, interrupt_on_detail: bool = False):
        super().__init__(verbosity=1, stream=io.StringIO())
        self.interrupt = interrupt_on_detail
        self.tails: list[tuple[list[str], str]] = []

    def detail(self, msg: str) -> None:
        if self.interrupt:
            raise KeyboardInterrupt
        super().detail(msg)

    def tail(self, lines, title):
        self.tails.append((list(lines), title))
        super().tail(lines, title)


def _run(prefix, ui=None, **kw):
    kw.setdefault("ready_timeout", 20)
    return bench.run(prefix, ui=ui or Recorder(), **kw)


def test_a_full_run_parses_the_result_and_stops_the_server(tmp_path):
    prefix = tmp_path / "my prefix"
    st = install_fake_vllm(prefix)
    result = _run(prefix, num_prompts=50, request_rate=10, extra_serve_args=["--max-model-len", "4096"])

    assert result.metrics == {
        "output_throughput": 251.37, "max_output_tokens_per_s": 331.0, "mean_tpot_ms": 22.61,
        "mean_ttft_ms": 180012.45, "max_concurrent_requests": 6.0}
    assert result.result_file.parent == prefix / "bench"
    assert json.loads(result.result_file.read_text()) == RESULT
    assert wait_dead(read_state(st, "pids.json")) == []

    serve = read_state(st, "serve.json")
    port = serve["argv"][serve["argv"].index("--port") + 1]
    assert serve["argv"][:6] == ["serve", bench.REFERENCE_MODEL, "--host", "127.0.0.1", "--port", port]
    assert serve["argv"][6:] == ["--max-model-len", "4096"]
    assert serve["env"]["VIRTUAL_ENV"] == str(prefix / "venv")
    assert serve["env"]["ROCM_PATH"] == str(prefix / "rocm")
    client = read_state(st, "client.json")["argv"]
    for flag, value in (("--port", port), ("--model", bench.REFERENCE_MODEL), ("--num-prompts", "50"),
                        ("--request-rate", "10"), ("--dataset-name", "random"),
                        ("--result-dir", str(prefix / "bench")),
                        ("--result-filename", result.result_file.name)):
        assert client[client.index(flag) + 1] == value, flag
    assert "--save-result" in client


def test_comparison_table_puts_the_run_beside_the_reference(tmp_path):
    prefix = tmp_path / "p"
    install_fake_vllm(prefix)
    table = bench.format_comparison(_run(prefix))
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["output throughput"][-3:] == ["251.37", "248.12", "tok/s"]
    assert rows["peak output throughput"][-3:] == ["331.00", "325", "tok/s"]
    assert rows["mean TPOT"][-3:] == ["22.61", "22.94", "ms"]
    assert rows["mean TTFT"][-3:] == ["180,012.45", "187,872.60", "ms"]
    assert rows["max concurrency"][-3:] == ["6", "~5-6", "requests"]
    assert "998 completed, 2 failed" in table
    assert "not comparable" not in table


def test_another_model_is_flagged_as_not_comparable(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix)
    result = _run(prefix, model="Qwen/Qwen3-8B-FP8")
    assert read_state(st, "serve.json")["argv"][1] == "Qwen/Qwen3-8B-FP8"
    assert result.result_file.name.endswith("-Qwen_Qwen3-8B-FP8.json")
    assert "this run used Qwen/Qwen3-8B-FP8, so the figures are not comparable" in \
        bench.format_comparison(result)


def test_missing_metrics_show_as_dashes(tmp_path):
    result = bench.BenchResult(model=bench.REFERENCE_MODEL, result_file=tmp_path / "r.json",
                               server_log=tmp_path / "s.log",
                               metrics={"output_throughput": 100.0}, raw={})
    rows = {line.split("  ")[0]: line.split() for line in bench.format_comparison(result).splitlines()}
    assert rows["mean TPOT"][-3] == "-"


def test_a_server_that_never_gets_ready_times_out_and_is_stopped(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix, "never-ready")
    ui = Recorder()
    with pytest.raises(InstallerError) as err:
        _run(prefix, ui=ui, ready_timeout=2)
    assert "not ready after 2s" in err.value.message and "server log" in err.value.hint
    assert wait_dead(read_state(st, "pids.json")) == []
    lines, title = ui.tails[-1]
    assert title.endswith("-serve.log") and "INFO still loading weights" in lines
    assert not list((prefix / "bench").glob("*.json"))


def test_a_crashing_server_is_reported_with_its_log_tail(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix, "crash")
    ui = Recorder()
    with pytest.raises(InstallerError, match="exited with code 3 before it was ready"):
        _run(prefix, ui=ui)
    assert any("no ROCm-capable device" in line for line in ui.tails[-1][0])
    assert wait_dead(read_state(st, "pids.json")) == []


def test_a_failing_client_still_stops_the_server(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix, "client-fails")
    with pytest.raises(StepFailed) as err:
        _run(prefix)
    assert "client log" in err.value.hint
    assert wait_dead(read_state(st, "pids.json")) == []


def test_ctrl_c_during_the_benchmark_stops_the_server(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix)
    with pytest.raises(KeyboardInterrupt):
        _run(prefix, ui=Recorder(interrupt_on_detail=True))
    assert wait_dead(read_state(st, "pids.json")) == []


def test_an_explicit_port_is_used(tmp_path):
    prefix = tmp_path / "p"
    st = install_fake_vllm(prefix)
    port = bench.free_port()
    _run(prefix, port=port)
    argv = read_state(st, "serve.json")["argv"]
    assert argv[argv.index("--port") + 1] == str(port)


def test_free_port_is_bindable_on_loopback():
    port = bench.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_no_vllm_in_the_prefix_is_a_user_error(tmp_path):
    with pytest.raises(InstallerError) as err:
        bench.run(tmp_path / "nothing", ui=None)
    assert "no vllm in" in err.value.message and "rdna4-install install --prefix" in err.value.hint


def test_bad_workload_numbers_are_usage_errors(tmp_path):
    prefix = tmp_path / "p"
    install_fake_vllm(prefix)
    with pytest.raises(UsageError):
        bench.run(prefix, num_prompts=0)


def test_an_unreadable_result_is_an_error(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(InstallerError, match="not valid JSON"):
        bench.parse_result(bad)
    with pytest.raises(InstallerError, match="wrote no result file"):
        bench.parse_result(tmp_path / "missing.json")
