"""installer.download against a real loopback HTTP server."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from installer import download
from installer.errors import InstallerError, UsageError
from therock_fixtures import make_toolchain_tarball, serve, sha256_of

NAME = "therock-dist-linux-gfx120X-all-10.1.0.tar.gz"
TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture()
def tarball(tmp_path: Path) -> Path:
    return make_toolchain_tarball(tmp_path / "srv" / NAME, "10.1.0", pad_bytes=3 << 20)


class Recorder:
    """A ui with the shape installer.ui.UI has; keeps what it was told."""

    def __init__(self):
        self.infos: list[str] = []
        self.warns: list[str] = []
        self.notes: list[str] = []
        self.total_seen: list[int | None] = []
        self.descs: list[str] = []
        self.updates = 0

    def info(self, msg: str) -> None:
        self.infos.append(msg)

    def warn(self, msg: str) -> None:
        self.warns.append(msg)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def progress(self, total, desc):
        rec = self
        rec.total_seen.append(total)
        rec.descs.append(desc)

        class Bar:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def update(self, n):
                rec.updates += n
        return Bar()


def test_download_verifies_caches_and_a_rerun_downloads_nothing(tmp_path, tarball):
    cache = tmp_path / "cache"
    ui = Recorder()
    with serve(tarball.parent) as srv:
        got = download.fetch(srv.url + NAME, cache_dir=cache, ui=ui, what="TheRock")
        assert not got.from_cache
        assert got.sha256 == sha256_of(tarball)
        assert got.size == tarball.stat().st_size
        assert got.path == cache / "downloads" / got.sha256 / NAME
        assert ui.total_seen == [got.size] and ui.updates == got.size
        assert any("recorded sha256" in m for m in ui.infos)
        again = download.fetch(srv.url + NAME, cache_dir=cache)
        assert again.from_cache and again.path == got.path
        assert len(srv.downloads(NAME)) == 1
    # no server at all: the cache alone answers, offline too
    offline = download.fetch(srv.url + NAME, cache_dir=cache, offline=True)
    assert offline.sha256 == got.sha256
    assert json.loads((cache / "downloads" / "urls.json").read_text()) == {srv.url + NAME: got.sha256}
    assert not list((cache / "downloads" / "partial").glob("*.part"))


def test_pinned_hash_finds_a_mirror_copy_without_a_request(tmp_path, tarball):
    cache = tmp_path / "cache"
    digest = sha256_of(tarball)
    first = download.fetch(str(tarball), cache_dir=cache, sha256=digest)
    with serve(tarball.parent) as srv:
        got = download.fetch(srv.url + NAME, cache_dir=cache, sha256=digest)
        assert got.from_cache and got.path == first.path
        assert srv.log == []


def test_pinned_mismatch_deletes_the_file_and_names_both_hashes(tmp_path, tarball):
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with serve(tarball.parent) as srv, pytest.raises(InstallerError) as err:
        download.fetch(srv.url + NAME, cache_dir=cache, sha256=wrong)
    assert wrong in err.value.message and sha256_of(tarball) in err.value.message
    assert not list(cache.rglob("*.tar.gz*")) and not list(cache.rglob("*.part"))


def test_first_hash_is_enforced_later(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        first = download.fetch(srv.url + NAME, cache_dir=cache)
        # upstream replaces the file and our cached copy is gone
        make_toolchain_tarball(tarball, "10.1.0", pad_bytes=1 << 20, seed=7)
        os.unlink(first.path)
        with pytest.raises(InstallerError, match="recorded on the first download") as err:
            download.fetch(srv.url + NAME, cache_dir=cache)
        assert first.sha256 in err.value.message


def test_resumes_a_partial_file_with_range(tmp_path, tarball):
    cache = tmp_path / "cache"
    data = tarball.read_bytes()
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        key = download.hashlib.sha256(url.encode()).hexdigest()[:16]
        part = cache / "downloads" / "partial" / f"{key}-{NAME}.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[:1_000_000])
        fed = bytearray()
        got = download.fetch(url, cache_dir=cache, sink=fed.extend)
        assert [r["range"] for r in srv.downloads(NAME)] == ["bytes=1000000-"]
    assert got.sha256 == sha256_of(tarball)
    assert bytes(fed) == data   # the sink saw the saved bytes first, then the rest


def test_a_broken_off_body_is_resumed_in_the_same_run(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("cut", 700_000))
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        ranges = [r["range"] for r in srv.downloads(NAME)]
        etag_sent = srv.downloads(NAME)[1]["if_range"]
    assert got.sha256 == sha256_of(tarball)
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 600_000
    assert etag_sent   # If-Range guards against a file that changed meanwhile


def test_a_changed_file_restarts_instead_of_resuming(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cut", 200_000)] * (download.RESUMES + 1))
        with pytest.raises(InstallerError, match="broke off"):
            download.fetch(srv.url + NAME, cache_dir=cache)
        # the file changes upstream before the rerun: If-Range makes the server send it whole
        time.sleep(0.01)
        make_toolchain_tarball(tarball, "10.1.0", pad_bytes=2 << 20, seed=3)
        got = download.fetch(srv.url + NAME, cache_dir=cache)
    assert got.sha256 == sha256_of(tarball)


def test_retries_server_errors_then_succeeds(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("status", 503), ("status", 502))
        ui = Recorder()
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", ui=ui)
        assert len(srv.downloads(NAME)) == 3
    assert got.sha256 == sha256_of(tarball)
    # the waits double
    assert ui.notes == ["127.0.0.1: HTTP 503; retry 1 of 4 in 1 s", "127.0.0.1: HTTP 502; retry 2 of 4 in 2 s"]


def test_each_retry_is_shown_at_v_and_written_to_the_log(tmp_path, tarball):
    import io

    from installer.ui import UI

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = tmp_path / "recipe.log"
    screens = {}
    for verbosity, screen in ((0, io.StringIO()), (1, io.StringIO()), ("tty", Terminal())):
        # not a TTY: retries show only at -v; on a terminal they always do
        ui = UI(0 if verbosity == "tty" else verbosity, stream=screen)
        ui.log = log
        with serve(tarball.parent) as srv:
            srv.fail(NAME, ("status", 503))
            download.fetch(srv.url + NAME, cache_dir=tmp_path / f"cache{verbosity}", ui=ui)
        screens[verbosity] = screen.getvalue()
    retry = "127.0.0.1: HTTP 503; retry 1 of 4 in 1 s"
    assert retry not in screens[0] and retry in screens[1] and retry in screens["tty"]
    assert log.read_text().count(f"# {retry}\n") == 3


def test_an_unresolvable_host_fails_fast_without_retrying(tmp_path, monkeypatch):
    for var in download.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    ui = Recorder()
    started = time.monotonic()
    with pytest.raises(download.DownloadError) as err:
        download.fetch("https://no-such-host.invalid/therock.tar.gz", cache_dir=tmp_path / "c", ui=ui)
    assert time.monotonic() - started < 5
    assert ui.notes == []  # no retry
    assert err.value.message == "cannot download https://no-such-host.invalid/therock.tar.gz: host name not found"
    hint = err.value.hint
    assert "host no-such-host.invalid" in hint and "proxy variables: none set" in hint
    assert "rdna4-install cache add FILE --url https://no-such-host.invalid/therock.tar.gz" in hint
    assert "mirror" in hint and "file:///" in hint and "--offline" in hint


@pytest.fixture
def silent_proxy():
    """A loopback TCP server that accepts connections and never says a word."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


@pytest.fixture
def behind_silent_proxy(monkeypatch, silent_proxy) -> str:
    """HTTPS_PROXY is a silent proxy, and no other proxy variable is set."""
    for var in download.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", silent_proxy)
    return silent_proxy


@pytest.mark.slow
def test_a_silent_proxy_fails_within_the_bound_and_is_named(tmp_path, behind_silent_proxy):
    silent_proxy = behind_silent_proxy
    ui = Recorder()
    url = "https://downloads.example.com/therock.tar.gz"
    started = time.monotonic()
    with pytest.raises(download.DownloadError) as err:
        download.fetch(url, cache_dir=tmp_path / "c", ui=ui)  # the default timeouts and budget
    took = time.monotonic() - started
    assert took < 35
    assert err.value.message.startswith(f"cannot download {url} through proxy {silent_proxy}: "
                                        f"no answer (timed out) (after ")
    assert f"proxy variables: HTTPS_PROXY={silent_proxy}" in err.value.hint
    assert ui.notes and all(n.startswith("downloads.example.com: no answer (timed out); retry ") for n in ui.notes)


def test_a_silent_proxy_is_retried_within_a_short_budget_then_named(behind_silent_proxy):
    # the same story as above with short timeouts: one retry fits in the budget, a second does not
    silent_proxy = behind_silent_proxy
    ui = Recorder()
    url = "https://downloads.example.com/therock.tar.gz"
    started = time.monotonic()
    with pytest.raises(download.DownloadError) as err:
        download.get(url, ui=ui, timeout=(0.3, 0.3), budget=2.5)
    assert time.monotonic() - started < 2.5
    assert err.value.message == (f"cannot download {url} through proxy {silent_proxy}: "
                                 f"no answer (timed out) (after 2 tries)")
    assert err.value.status is None
    assert ui.notes == ["downloads.example.com: no answer (timed out); retry 1 of 4 in 1 s"]


@pytest.mark.parametrize("status", [403, 404])
def test_missing_files_fail_with_status_and_hint(tmp_path, tarball, status):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("status", status))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache")
    assert err.value.status == status and f"HTTP {status}" in err.value.message
    assert err.value.hint and "\n" not in err.value.message


def test_a_short_body_is_an_error_and_kept_for_resume(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cut", 100_000)] * (download.RESUMES + 1))
        with pytest.raises(download.DownloadError, match="rerun to resume|broke off|announced"):
            download.fetch(srv.url + NAME, cache_dir=cache)
        parts = list((cache / "downloads" / "partial").glob("*.part"))
        kept = parts[0].stat().st_size
        assert 0 < kept < tarball.stat().st_size
        # the next run finishes it from where it stopped
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        assert srv.downloads(NAME)[-1]["range"] == f"bytes={kept}-"
    assert got.sha256 == sha256_of(tarball)


@pytest.mark.parametrize("url", ["http://example.com/x.tar.gz", "ftp://127.0.0.1/x.tar.gz",
                                 "https:///x.tar.gz"])
def test_url_policy(tmp_path, url):
    with pytest.raises(UsageError):
        download.fetch(url, cache_dir=tmp_path)


def test_file_urls_and_paths_are_mirrors(tmp_path, tarball):
    a = download.fetch(tarball.as_uri(), cache_dir=tmp_path / "c1")
    b = download.fetch(str(tarball), cache_dir=tmp_path / "c2")
    assert a.sha256 == b.sha256 == sha256_of(tarball) and not a.from_cache


def test_offline_miss_is_clear(tmp_path):
    url = "https://stable.repo.amd.com/rocm/core/tarball/" + NAME
    cache = tmp_path / "my cache"
    with pytest.raises(InstallerError) as err:
        download.fetch(url, cache_dir=cache, offline=True, what="TheRock")
    assert err.value.message == f"offline, and TheRock is not in the cache ({url})"
    assert err.value.hint == (f"run once without --offline, or download {url} elsewhere and run: "
                              f"rdna4-install cache add {NAME} --url {url} --cache-dir '{cache}'")


def test_sha256_file_reads_every_chunk(tmp_path):
    data = os.urandom(download.CHUNK * 2 + 17)
    (tmp_path / "f").write_bytes(data)
    assert download.sha256_file(tmp_path / "f") == download.hashlib.sha256(data).hexdigest()


_CHILD = """
import resource, signal, sys
sys.path[:0] = {paths!r}
from pathlib import Path
from installer import download
from installer.errors import InstallerError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    download.fetch(sys.argv[1], cache_dir=Path(sys.argv[2]))
except InstallerError as exc:
    print("ERROR", exc.message, "|", exc.hint)
    sys.exit(3)
print("DONE")
"""


def _child(*args: str) -> list[str]:
    code = _CHILD.format(paths=[str(ROOT), str(TESTS)])
    return [sys.executable, "-c", code, *args]


def test_disk_full_removes_the_partial_file(tmp_path, tarball):
    cache = tmp_path / "cache"
    cache.mkdir()
    with serve(tarball.parent) as srv:
        # a real write failure: the file size limit makes write() fail with EFBIG
        out = subprocess.run(_child(srv.url + NAME, str(cache), "1000000"),
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "disk full" in out.stdout and "RDNA4_CACHE_DIR" in out.stdout
    assert not list(cache.rglob("*.part"))


def test_sigkill_mid_download_then_rerun_resumes(tmp_path, tarball):
    cache = tmp_path / "cache"
    size = tarball.stat().st_size
    with serve(tarball.parent, rate=2_000_000) as srv:
        child = subprocess.Popen(_child(srv.url + NAME, str(cache)),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        part_size = 0
        while time.monotonic() < deadline:
            parts = list((cache / "downloads" / "partial").glob("*.part"))
            part_size = parts[0].stat().st_size if parts else 0
            if part_size > 300_000:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert 0 < part_size < size
        kept = parts[0].stat().st_size
        srv.rate = 0
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        assert srv.downloads(NAME)[-1]["range"] == f"bytes={kept}-"
    assert got.sha256 == sha256_of(tarball) and not got.from_cache


# --- TLS: the CA a TLS-inspecting proxy (or a mirror) uses must be trusted as curl does ---

@pytest.fixture
def https_server(tmp_path):
    import http.server
    import ssl
    import subprocess
    import threading

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "file.bin").write_bytes(b"x" * 4096)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/file.bin", cert
    server.shutdown()


def test_the_ca_in_ssl_cert_file_is_trusted(https_server, tmp_path, monkeypatch):
    url, cert = https_server
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download, "_SESSION", None)
    ui = Recorder()
    with pytest.raises(InstallerError, match="TLS certificate not trusted"):
        download.fetch(url, cache_dir=tmp_path / "c1", ui=ui)
    assert ui.notes == []  # an untrusted certificate does not get better: no retry
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setattr(download, "_SESSION", None)
    got = download.fetch(url, cache_dir=tmp_path / "c2")
    assert got.size == 4096


def test_a_new_pin_wins_over_the_hash_recorded_unpinned(tmp_path, tarball):
    """Fetched unpinned (its hash recorded), then pinned to another hash: the pin
    decides, so the cached file that matches only the old record is refused."""
    cache = tmp_path / "cache"
    other = "ab" * 32
    with serve(tarball.parent) as srv:
        first = download.fetch(srv.url + NAME, cache_dir=cache)
        with pytest.raises(download.HashMismatch, match="pinned") as err:
            download.fetch(srv.url + NAME, cache_dir=cache, sha256=other)
        assert other in err.value.message and err.value.got == first.sha256
        assert len(srv.downloads(NAME)) == 2      # not served from the cache
    # nor offline: a cached file with the old hash is no answer to the new pin
    with pytest.raises(InstallerError, match="offline"):
        download.fetch(srv.url + NAME, cache_dir=cache, sha256=other, offline=True)


def test_a_prefix_record_wins_over_the_caches_record(tmp_path, tarball):
    """`trusted` (what a prefix installed) holds even when the cache recorded
    another hash for the URL, and is what a fresh cache checks against."""
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        first = download.fetch(srv.url + NAME, cache_dir=cache)
        with pytest.raises(download.HashMismatch, match="recorded in this prefix"):
            download.fetch(srv.url + NAME, cache_dir=tmp_path / "fresh", trusted="cd" * 32)
        assert download.recorded_sha256(srv.url + NAME, tmp_path / "fresh") is None
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "fresh", trusted=first.sha256)
        assert got.sha256 == first.sha256


def test_a_refused_accept_drops_the_file_and_the_record(tmp_path, tarball):
    cache = tmp_path / "cache"

    def refuse(path):
        assert path.is_file()
        raise download.Refused("bad layout")

    with serve(tarball.parent) as srv:
        with pytest.raises(download.Refused):
            download.fetch(srv.url + NAME, cache_dir=cache, accept=refuse)
        assert download.recorded_sha256(srv.url + NAME, cache) is None
        assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".gz", ".part")]
        # the same refusal of a file that was already cached drops it too
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        with pytest.raises(download.Refused):
            download.fetch(srv.url + NAME, cache_dir=cache, accept=refuse)
        assert not got.path.exists() and download.recorded_sha256(srv.url + NAME, cache) is None


def test_a_loopback_redirect_to_plain_http_elsewhere_is_refused(tmp_path, tarball):
    """0.0.0.0 is not loopback by name but reaches this host: without the check
    on each redirect hop the download would succeed."""
    with serve(tarball.parent) as srv:
        port = srv.server_address[1]
        srv.redirects["moved/" + NAME] = f"http://0.0.0.0:{port}/{NAME}"
        with pytest.raises(UsageError, match=f"refusing to download http://0.0.0.0:{port}/"):
            download.fetch(srv.url + "moved/" + NAME, cache_dir=tmp_path / "cache")
        assert srv.downloads(NAME) == [r for r in srv.downloads(NAME) if r["path"].startswith("moved/")]
        # a redirect that stays on loopback is followed
        srv.redirects["ok/" + NAME] = f"http://127.0.0.1:{port}/{NAME}"
        got = download.fetch(srv.url + "ok/" + NAME, cache_dir=tmp_path / "cache")
        assert got.sha256 == sha256_of(tarball)


@pytest.fixture(autouse=True)
def _fresh_session():
    # every test builds the shared session itself, so its settings are what it tests
    download._SESSION = None
    yield
    download._SESSION = None


def test_a_local_mirror_is_copied_whole_and_a_missing_one_is_named(tmp_path, tarball):
    got = download.fetch(str(tarball), cache_dir=tmp_path / "c", ui=Recorder())
    assert got.path.read_bytes() == tarball.read_bytes() and got.size == tarball.stat().st_size
    fed = bytearray()
    download.fetch(str(tarball), cache_dir=tmp_path / "c2", sink=fed.extend)
    assert bytes(fed) == tarball.read_bytes()
    with pytest.raises(InstallerError, match=f"no such file {tmp_path / 'gone.tar.gz'}") as err:
        download.fetch(str(tmp_path / "gone.tar.gz"), cache_dir=tmp_path / "c")
    assert err.value.hint == "check the mirror path"


def test_a_pinned_hash_finds_the_bytes_under_another_name(tmp_path, tarball):
    cache = tmp_path / "cache"
    digest = sha256_of(tarball)
    first = download.fetch(str(tarball), cache_dir=cache, sha256=digest)
    got = download.fetch("https://mirror.example.org/renamed.tar.gz", cache_dir=cache, sha256=digest.upper())
    assert got.from_cache and got.path == first.path and got.sha256 == digest
    assert download.cached_urls(cache) == {str(tarball): digest}


def test_forget_without_a_hash_uses_the_recorded_one(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        other = download.fetch(str(tarball), cache_dir=cache)       # same bytes, another URL
        download.forget(srv.url + NAME, cache_dir=cache)
        assert not got.path.exists() and download.recorded_sha256(srv.url + NAME, cache) is None
        assert download.recorded_sha256(str(tarball), cache) == other.sha256
        download.forget(srv.url + NAME, cache_dir=cache)          # twice is harmless
        assert download.cached_urls(cache) == {}                   # the other URL's file went too
        index = (cache / "downloads" / "urls.json").read_text()
        assert json.loads(index) == {str(tarball): other.sha256}


def test_sweep_removes_index_temps_only(tmp_path, tarball):
    cache = tmp_path / "cache"
    download.sweep(cache)                                  # no cache yet: nothing to do
    download.fetch(str(tarball), cache_dir=cache)
    (cache / "downloads" / "urls.tmp4242").write_text("{")
    download.sweep(cache)
    assert sorted(p.name for p in (cache / "downloads").iterdir() if p.is_file()) == ["urls.json", "urls.lock"]


@pytest.mark.parametrize("exc, say", [
    (ConnectionRefusedError(111, "[Errno 111] Connection refused"), "connection refused"),
    (OSError("Failed to resolve: [Errno -2] Name or service not known"), "host name not found"),
    (TimeoutError("Read timed out. (read timeout=60)"), "no answer (timed out)"),
    (OSError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "TLS certificate not trusted"),
    (ConnectionResetError("Connection reset by peer"), "connection reset by the server"),
    (OSError("something odd\nsecond line"), "something odd"),
    (OSError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"), "TLS handshake failed"),
    (OSError("ConnectTimeoutError(<HTTPSConnection>, 'Connection to x.example')"), "no answer (timed out)"),
    (OSError("x" * 300), "x" * 200),
    (OSError(), "OSError"),
    (OSError("Failed to resolve 'mirror.example'"), "host name not found"),
    (OSError("nodename nor servname provided, or not known"), "host name not found"),
    (OSError("Name or service not known"), "host name not found"),
    (OSError("SSLError(1, 'bad')"), "TLS handshake failed"),
    (OSError("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))"),
     "connection reset by the server"),
])
def test_reason_gives_a_short_cause(exc, say):
    assert download._reason(exc) == say


def test_reason_looks_through_an_empty_wrapper():
    try:
        try:
            raise ConnectionRefusedError("Connection refused")
        except ConnectionRefusedError:
            raise OSError()
    except OSError as wrapper:
        assert download._reason(wrapper) == "connection refused"


def test_a_closed_port_is_a_one_line_download_error(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(download, "RETRIES", 0)        # no backoff sleeps
    with pytest.raises(download.DownloadError, match="connection refused") as err:
        download.fetch(f"http://127.0.0.1:{port}/{NAME}", cache_dir=tmp_path)
    assert "proxy" in err.value.hint and err.value.status is None


@pytest.mark.parametrize("status, words", [(403, "not public"), (404, "does not exist"),
                                           (500, "resumes")])
def test_status_errors_say_what_to_do(status, words):
    err = download.status_error("https://x.example/f", status, "TheRock")
    assert err.message == f"TheRock: HTTP {status} for https://x.example/f" and err.status == status
    assert words in err.hint


@pytest.mark.parametrize("value, parsed", [
    ("bytes 100-199/1000", (100, 1000)), ("bytes 100-199/*", (100, None)), (None, None),
    ("items 1-2/3", None), ("bytes x-1/2", None), ("", None)])
def test_content_range(value, parsed):
    assert download._content_range(value) == parsed


def test_the_ca_variables_in_order(tmp_path, monkeypatch):
    files = {}
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
        files[var] = tmp_path / var
        files[var].write_text("pem")
    assert download.ca_bundle() is True
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "missing"))
    assert download.ca_bundle() is True                   # a path that is not there does not count
    for var in ("SSL_CERT_DIR", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.setenv(var, str(files[var]))
        assert download.ca_bundle() == str(files[var])
    assert download.session().verify == str(files["REQUESTS_CA_BUNDLE"])


def test_disk_full_names_the_place_and_the_size():
    err = download._no_space(Path("/c/partial"), "TheRock", 3_200_000_000)
    assert err.message == "disk full while downloading TheRock into /c/partial"
    assert err.hint.startswith("free 3.2 GB there") and "RDNA4_CACHE_DIR" in err.hint
    assert download._no_space(Path("/c"), "x", None).hint.startswith("free more space there")
    assert download._no_space(Path("/c"), "x", 10**9).hint.startswith("free 1.0 GB there")
    assert download._no_space(Path("/c"), "x", 10**9 - 1).hint.startswith("free 1000 MB there")
    assert download._no_space(Path("/c"), "x", 599_390).hint.startswith("free 1 MB there")


def test_a_hash_mismatch_says_which_hash_and_keeps_its_hint(tmp_path, tarball):
    with pytest.raises(download.HashMismatch) as err:
        download.fetch(str(tarball), cache_dir=tmp_path, sha256="0" * 64)
    assert err.value.which == "pinned" and err.value.got == sha256_of(tarball)
    assert "update the pin" in err.value.hint


@pytest.fixture
def dead_proxies(monkeypatch) -> None:
    """Every proxy variable names a port nothing listens on, and NO_PROXY is unset."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")


def test_loopback_downloads_bypass_a_configured_proxy(tmp_path, tarball, dead_proxies):
    """A dead proxy in the environment: loopback mirrors (and these tests) still work."""
    assert download._proxies("https://repo.amd.com/x") is None       # remote: the proxy applies
    with serve(tarball.parent) as srv:
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache")
    assert got.sha256 == sha256_of(tarball)


def _part(cache: Path, url: str) -> Path:
    key = download.hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache / "downloads" / "partial" / f"{key}-{NAME}.part"


def _partial(cache: Path, url: str, content: bytes) -> Path:
    """The partial file of `url` a killed download leaves, holding `content`."""
    part = _part(cache, url)
    part.parent.mkdir(parents=True)
    part.write_bytes(content)
    return part


def test_a_resume_says_so_and_the_sink_gets_every_byte_once(tmp_path, tarball):
    cache, data, ui = tmp_path / "cache", tarball.read_bytes(), Recorder()
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        part = _partial(cache, url, data[:1_000_000])
        fed = bytearray()
        got = download.fetch(url, cache_dir=cache, sink=fed.extend, ui=ui, what="TheRock")
    assert "resuming TheRock at 1 MB" in ui.infos
    assert bytes(fed) == data and got.size == len(data) and ui.total_seen == [len(data)]
    assert ui.updates == len(data)
    assert not part.exists() and list(part.parent.glob("*.json")) == []


def test_a_server_that_ignores_the_range_is_read_from_the_start(tmp_path, tarball):
    cache, data = tmp_path / "cache", tarball.read_bytes()
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        _partial(cache, url, data[:1_000_000])
        srv.fail(NAME, ("whole", 0))
        fed = bytearray()
        got = download.fetch(url, cache_dir=cache, sink=fed.extend)
        assert [r["range"] for r in srv.downloads(NAME)] == ["bytes=1000000-"]
    assert got.sha256 == sha256_of(tarball) and bytes(fed) == data


def test_a_partial_file_longer_than_the_file_starts_over(tmp_path, tarball):
    cache, data = tmp_path / "cache", tarball.read_bytes()
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        _partial(cache, url, data + b"more")          # the server answers 416
        got = download.fetch(url, cache_dir=cache)
        assert [r["range"] for r in srv.downloads(NAME)] == [f"bytes={len(data) + 4}-", None]
    assert got.sha256 == sha256_of(tarball)


def test_a_resume_answered_with_the_wrong_range_stops(tmp_path, tarball):
    cache, data = tmp_path / "cache", tarball.read_bytes()
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        part = _partial(cache, url, data[:1_000_000])
        srv.fail(NAME, ("shift", 10))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(url, cache_dir=cache, what="TheRock")
    assert err.value.message == (f"TheRock: the server answered a resume with the wrong range "
                                 f"(bytes 1000010-{len(data) - 1}/{len(data)})")
    assert err.value.hint == f"delete {part} and rerun"


def test_a_file_that_changes_during_the_download_is_not_mixed(tmp_path, tarball):
    # bytes already went to the sink: a whole new body cannot be appended to them
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        srv.fail(NAME, ("cut", 500_000), ("whole", 0))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(url, cache_dir=cache, sink=lambda b: None, what="TheRock")
    assert err.value.message == "TheRock changed on the server during the download"
    assert err.value.hint == "rerun to download it again"
    assert not _part(cache, url).exists()


def test_as_many_resumes_as_allowed_then_the_file(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cut", 300_000)] * download.RESUMES)
        got = download.fetch(srv.url + NAME, cache_dir=cache)
        assert len(srv.downloads(NAME)) == download.RESUMES + 1
    assert got.sha256 == sha256_of(tarball)


def test_a_body_that_breaks_off_too_often_names_how_far_it_got(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cut", 300_000)] * (download.RESUMES + 1))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(srv.url + NAME, cache_dir=cache, what="TheRock")
    assert re.fullmatch(r"TheRock: download broke off at 1 MB \(.+\)", err.value.message)
    assert err.value.hint == "rerun to resume where it stopped"
    assert _part(cache, srv.url + NAME).stat().st_size == 1_200_000   # kept for the rerun


@pytest.mark.parametrize("url", ["http://example.com/x.tar.gz", "ftp://127.0.0.1/x.tar.gz", "https:///x.tar.gz",
                                 "http://localhost.example/x.tar.gz", "http://10.0.0.1/x.tar.gz"])
def test_a_refused_url_is_named_with_what_is_allowed(tmp_path, url):
    with pytest.raises(UsageError) as err:
        download.fetch(url, cache_dir=tmp_path)
    assert err.value.message == f"refusing to download {url}"
    assert err.value.hint == "use an https:// URL (plain http only to 127.0.0.1), a local path or file://"


@pytest.mark.parametrize("host, loopback", [("localhost", True), ("127.0.0.1", True), ("127.1.2.3", True),
                                            ("::1", True), ("", False), (None, False), ("10.0.0.1", False),
                                            ("localhost.example", False)])
def test_is_loopback(host, loopback):
    assert download.is_loopback(host) is loopback


@pytest.mark.parametrize("url", ["https://x.example/", "https://x.example/dir/..", "https://x.example/."])
def test_a_url_that_names_no_file_is_refused(tmp_path, url):
    with pytest.raises(UsageError) as err:
        download.fetch(url, cache_dir=tmp_path)
    assert err.value.message == f"{url} does not name a file"


def test_a_pin_that_is_not_a_sha256_is_refused(tmp_path):
    with pytest.raises(UsageError) as err:
        download.fetch("https://x.example/" + NAME, cache_dir=tmp_path, sha256="abc", what="TheRock")
    assert err.value.message == "sha256 pin for TheRock is not 64 hex digits: 'abc'"
    with pytest.raises(UsageError, match="^sha256 recorded hash for TheRock is not 64 hex digits: 'x'$"):
        download.fetch("https://x.example/" + NAME, cache_dir=tmp_path, trusted="x", what="TheRock")


def test_the_offline_miss_says_how_to_add_the_file(tmp_path):
    url = "https://stable.repo.amd.com/rocm/core/tarball/" + NAME
    with pytest.raises(InstallerError) as err:
        download.fetch(url, cache_dir=tmp_path, offline=True, what="TheRock")
    assert err.value.message == f"offline, and TheRock is not in the cache ({url})"
    assert err.value.hint == (f"run once without --offline, or download {url} elsewhere and run: "
                              f"rdna4-install cache add {NAME} --url {url} --cache-dir {tmp_path}")


def test_a_first_download_records_its_hash_and_says_so(tmp_path, tarball):
    cache, ui = tmp_path / "cache", Recorder()
    got = download.fetch(str(tarball), cache_dir=cache, ui=ui, what="TheRock")
    assert ui.infos == [f"recorded sha256 {got.sha256} for TheRock; later runs require the same file"]
    assert download.recorded_sha256(str(tarball), cache) == got.sha256
    assert download.cached_urls(cache) == {str(tarball): got.sha256}
    again = download.fetch(str(tarball), cache_dir=cache, ui=ui, what="TheRock")
    assert again.from_cache and again.path == got.path and len(ui.infos) == 1
    tarball.write_bytes(tarball.read_bytes() + b"x")
    (got.path).unlink()
    with pytest.raises(download.HashMismatch) as err:
        download.fetch(str(tarball), cache_dir=cache, what="TheRock")
    assert err.value.which == "recorded on the first download"
    assert f"expected {got.sha256} (recorded on the first download), got " in err.value.message


def test_disk_full_while_downloading_in_process_removes_the_partial_file(tmp_path, tarball):
    """The file size limit makes write() fail with EFBIG, as a full disk would."""
    import resource

    cache = tmp_path / "cache"
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    with serve(tarball.parent) as srv:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
        try:
            with pytest.raises(InstallerError) as err:
                download.fetch(srv.url + NAME, cache_dir=cache, what="TheRock")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
    partial = cache / "downloads" / "partial"
    assert err.value.message == f"disk full while downloading TheRock into {partial}"
    assert err.value.hint.startswith("free more space there")
    assert [p.name for p in partial.iterdir() if not p.name.endswith(".lock")] == []


def test_a_cached_file_is_fed_to_the_sink_and_accepted(tmp_path, tarball):
    cache, ui = tmp_path / "cache", Recorder()
    first = download.fetch(str(tarball), cache_dir=cache)
    fed, accepted = bytearray(), []
    again = download.fetch(str(tarball), cache_dir=cache, sink=fed.extend, accept=accepted.append, ui=ui)
    assert again.from_cache and bytes(fed) == tarball.read_bytes() and accepted == [first.path]
    assert ui.total_seen == [first.size] and ui.updates == first.size


def test_reason_prefers_the_exceptions_own_message():
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError:
            raise ConnectionRefusedError("Connection refused")
    except OSError as exc:
        assert download._reason(exc) == "connection refused"


@pytest.mark.parametrize("status, hint", [
    (403, "the file is not public or no longer exists; pick another version"),
    (404, "the file does not exist; check the version"),
    (503, "the server failed; rerun later (the download resumes)")])
def test_status_error_hints_in_full(status, hint):
    assert download.status_error("https://x.example/f", status, "TheRock").hint == hint


def test_a_file_labelled_gzip_encoded_is_kept_as_sent(tmp_path, tarball):
    # a .tar.gz is gzip data; a server may say so in Content-Encoding: the bytes are the file
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("gzip", 0))
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache")
    assert got.sha256 == sha256_of(tarball) and got.path.read_bytes() == tarball.read_bytes()


def test_a_local_copy_shows_its_progress_by_name(tmp_path, tarball):
    ui = Recorder()
    got = download.fetch(str(tarball), cache_dir=tmp_path / "cache", ui=ui, what="TheRock")
    assert ui.descs == ["TheRock"] and ui.total_seen == [got.size] and ui.updates == got.size


def test_a_head_request_follows_redirects(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        srv.redirects["old/" + NAME] = srv.url + NAME
        resp = download.get(srv.url + "old/" + NAME, method="HEAD")
        assert resp.status_code == 200 and resp.url == srv.url + NAME
        assert [r["method"] for r in srv.log] == ["HEAD", "HEAD"]


def test_retry_after_is_honoured_and_each_retry_is_noted(tmp_path, tarball):
    # the server asks for no wait: without Retry-After the backoff would sleep 1 + 2 s
    ui = Recorder()
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("busy", 0), ("busy", 0))
        started = time.monotonic()
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", ui=ui)
        took = time.monotonic() - started
    assert got.sha256 == sha256_of(tarball) and took < 2.5
    assert ui.notes == ["127.0.0.1: HTTP 503; retry 1 of 4 in 0 s", "127.0.0.1: HTTP 503; retry 2 of 4 in 0 s"]


def test_a_refused_connection_is_retried_then_named_with_the_tries(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(download, "BACKOFF", 0.01)       # the schedule, shortened
    ui = Recorder()
    url = f"http://127.0.0.1:{port}/{NAME}"
    with pytest.raises(download.DownloadError) as err:
        download.get(url, ui=ui)
    assert err.value.message == f"cannot download {url}: connection refused (after 5 tries)"
    assert ui.notes == [f"127.0.0.1: connection refused; retry {i} of 4 in 0 s" for i in range(1, 5)]


# --- the cache's choices, one by one -------------------------------------------------

def test_a_new_download_is_not_from_the_cache_and_a_cached_one_keeps_its_size(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        first = download.fetch(srv.url + NAME, cache_dir=tmp_path / "a" / "b")
        again = download.fetch(srv.url + NAME, cache_dir=tmp_path / "a" / "b", sha256=first.sha256)
    assert first.from_cache is False and again.from_cache is True
    assert again.size == first.size == tarball.stat().st_size and again.sha256 == first.sha256


def test_a_file_added_by_hand_must_match_the_pin(tmp_path, tarball):
    url = "https://mirror.example/" + NAME
    with pytest.raises(download.HashMismatch) as err:
        download.add_file(tarball, url, cache_dir=tmp_path / "cache", sha256="0" * 64)
    assert err.value.message == (f"sha256 mismatch for {tarball}: expected {'0' * 64} (pinned), "
                                 f"got {sha256_of(tarball)}")
    assert err.value.hint == ("the file changed upstream or was corrupted; the download was deleted. "
                              "If the change is expected, update the pin")
    assert err.value.which == "pinned" and err.value.got == sha256_of(tarball)


def test_a_hash_recorded_in_the_prefix_is_named_as_such(tmp_path, tarball):
    with serve(tarball.parent) as srv, pytest.raises(download.HashMismatch) as err:
        download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", trusted="1" * 64, what="TheRock")
    assert err.value.message == (f"sha256 mismatch for TheRock: expected {'1' * 64} (recorded in this prefix), "
                                 f"got {sha256_of(tarball)}")


def test_ignoring_the_recorded_hash_downloads_the_changed_file_and_records_it(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        first = download.fetch(url, cache_dir=cache)
        make_toolchain_tarball(tarball, "10.1.0", pad_bytes=1 << 20, seed=5)
        got = download.fetch(url, cache_dir=cache, ignore_recorded=True)
        assert len(srv.downloads(NAME)) == 2
    assert got.sha256 == sha256_of(tarball) != first.sha256 and not got.from_cache
    assert download.recorded_sha256(url, cache) == got.sha256


def test_a_refused_cached_file_is_dropped_by_its_pinned_hash(tmp_path, tarball):
    cache = tmp_path / "cache"
    digest = sha256_of(tarball)
    mirror = download.fetch(str(tarball), cache_dir=cache, sha256=digest)   # no record for the URL below

    def refuse(path):
        raise download.Refused("unsafe archive", hint="x")
    with pytest.raises(download.Refused):
        download.fetch("https://mirror.example/" + NAME, cache_dir=cache, sha256=digest, offline=True,
                       accept=refuse)
    assert not mirror.path.exists() and not mirror.path.parent.exists()


def test_the_asked_name_wins_among_copies_of_the_same_bytes(tmp_path, tarball):
    cache = tmp_path / "cache"
    digest = sha256_of(tarball)
    other = tmp_path / "a-first-name.tar.gz"
    shutil.copy(tarball, other)
    download.fetch(str(other), cache_dir=cache, sha256=digest)
    download.add_file(tarball, "https://elsewhere.example/" + NAME, cache_dir=cache, sha256=digest)
    got = download.fetch("https://mirror.example/" + NAME, cache_dir=cache, sha256=digest, offline=True)
    assert got.path.name == NAME and sorted(p.name for p in got.path.parent.iterdir()) == [
        "a-first-name.tar.gz", NAME]


@pytest.mark.parametrize("how", ["pinned", "recorded"])
def test_a_download_another_installer_finished_while_we_waited_is_not_repeated(tmp_path, tarball, how):
    import threading

    cache = tmp_path / "cache"
    digest = sha256_of(tarball)
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        key = download.hashlib.sha256(url.encode()).hexdigest()[:16]
        result = {}
        with download.locked(cache / "downloads" / "partial" / f"{key}.lock"):
            waiter = threading.Thread(target=lambda: result.update(got=download.fetch(
                url, cache_dir=cache, sha256=digest if how == "pinned" else None)))
            waiter.start()
            time.sleep(0.3)                  # it found no file and waits for the lock
            assert waiter.is_alive()
            # the other installer: the file, and for an unpinned URL its recorded hash
            (cache / "downloads" / digest).mkdir()
            shutil.copy(tarball, cache / "downloads" / digest / NAME)
            shutil.copy(tarball, cache / "downloads" / digest / "a-mirror-name.tar.gz")
            if how == "recorded":
                download._update_index(cache, url, digest)
        waiter.join(30)
        assert srv.log == []
    assert result["got"].from_cache and result["got"].sha256 == digest and result["got"].path.name == NAME


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "7", "{", ""])
def test_an_index_that_is_not_a_mapping_records_nothing(tmp_path, content):
    index = tmp_path / "downloads" / "urls.json"
    index.parent.mkdir(parents=True)
    index.write_text(content)
    assert download.recorded_sha256("https://h.example/x.tar.gz", tmp_path) is None
    assert download.cached_urls(tmp_path) == {}
