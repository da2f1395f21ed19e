"""installer.download on the wire: the headers it sends, the validators it keeps
for a resume, ranges a server caps or garbles, the free-space check, proxies for
loopback, and the causes it names. Against the loopback server of therock_fixtures."""

from __future__ import annotations

import email.utils
import json
import shutil
from collections import namedtuple

import pytest

from installer import download
from test_download import (NAME, Recorder, _part, _partial, behind_silent_proxy,  # noqa: F401 (fixtures)
                           dead_proxies, https_server, silent_proxy, tarball)
from therock_fixtures import serve, sha256_of


def test_a_download_asks_for_the_bytes_as_stored_and_a_resume_for_the_rest_of_the_same_file(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("cut", 700_000))
        download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache")
        first, resume = (r["headers"] for r in srv.downloads(NAME))
        etag = srv.downloads(NAME)[1]["if_range"]
    assert first["Accept-Encoding"] == "identity" and "Range" not in first and "If-Range" not in first
    assert resume["Accept-Encoding"] == "identity"
    assert resume["Range"] == f"bytes={int(resume['Range'][6:-1])}-" and int(resume["Range"][6:-1]) >= 600_000
    assert resume["If-Range"] == etag and etag.startswith('"')


@pytest.mark.parametrize("kind, header", [("etag", "ETag"), ("last-modified", "Last-Modified"),
                                          ("weak", None), ("none", None)])
def test_a_later_run_resumes_only_with_a_strong_validator(tmp_path, tarball, kind, header):
    """A weak ETag may name other bytes, so without a strong one a resume must not be conditional
    on it: no If-Range is sent and no validator is kept."""
    cache = tmp_path / "cache"
    with serve(tarball.parent, validator=kind) as srv:
        url = srv.url + NAME
        srv.fail(NAME, *[("cut", 200_000)] * (download.RESUMES + 1))
        with pytest.raises(download.DownloadError, match="broke off"):
            download.fetch(url, cache_dir=cache)
        sent = srv.downloads(NAME)[0]
        meta = _part(cache, url).with_suffix(".json")
        kept = json.loads(meta.read_text()) if meta.exists() else None
        got = download.fetch(url, cache_dir=cache)
        rerun = srv.downloads(NAME)[download.RESUMES + 1]["headers"]
    assert got.sha256 == sha256_of(tarball)
    assert rerun["Range"] == "bytes=800000-"
    if header:
        st = tarball.stat()
        served = {"ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"',
                  "Last-Modified": email.utils.formatdate(int(st.st_mtime), usegmt=True)}[header]
        assert kept == {"url": url, "validator": served}
        assert rerun["If-Range"] == served
    else:
        assert kept is None and "If-Range" not in rerun
    assert "Range" not in sent["headers"]


def test_a_capped_range_is_followed_by_another_until_the_file_is_whole(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("cap", 500_000), ("cap", 500_000))
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache")
        ranges = [r["range"] for r in srv.downloads(NAME)]
    assert got.sha256 == sha256_of(tarball)
    assert ranges == [None, "bytes=500000-", "bytes=1000000-"]


def test_a_server_that_always_caps_is_named_after_the_last_resume(tmp_path, tarball):
    size = tarball.stat().st_size
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cap", 100_000)] * (download.RESUMES + 1))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", what="TheRock")
        assert len(srv.downloads(NAME)) == download.RESUMES + 1
    got = (download.RESUMES + 1) * 100_000
    assert err.value.message == f"TheRock: got {got} bytes, the server announced {size}"
    assert err.value.hint == "rerun to resume; if it persists the mirror is broken"
    assert _part(tmp_path / "cache", srv.url + NAME).stat().st_size == got    # kept for the rerun


def test_a_length_that_is_not_a_number_is_ignored(tmp_path, tarball):
    ui = Recorder()
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("badlength", 0))
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", ui=ui)
    assert got.sha256 == sha256_of(tarball) and ui.total_seen == [None]


@pytest.mark.parametrize("value, parsed", [
    ("bytes 100-199/1000", (100, 1000)), ("bytes 100-199/*", (100, None)), ("bytes 0-0/1", (0, 1)),
    (None, None), ("", None), ("items 1-2/3", None), ("bytes */1000", None), ("bytes x-1/2", None),
    ("bytes 5-9/10/20", (5, None)), ("bytes 5-6-7/10", (5, 10)), ("bytes -5-9/10", None),
])
def test_content_range(value, parsed):
    assert download._content_range(value) == parsed


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("short", [0, 1])
def test_a_resume_needs_room_for_the_rest_only(tmp_path, tarball, monkeypatch, short):
    cache, data = tmp_path / "cache", tarball.read_bytes()
    real = shutil.disk_usage
    rest = len(data) - 1_000_000
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: Usage(1 << 40, 0, rest - short) if "partial" in str(p) else real(p))
    with serve(tarball.parent) as srv:
        url = srv.url + NAME
        _partial(cache, url, data[:1_000_000])
        if not short:
            assert download.fetch(url, cache_dir=cache).sha256 == sha256_of(tarball)
            return
        with pytest.raises(download.InstallerError) as err:
            download.fetch(url, cache_dir=cache, what="TheRock")
    assert err.value.message == f"disk full while downloading TheRock into {_part(cache, url).parent}"
    assert err.value.hint == (f"free {-(-rest // 10**6)} MB there (or set RDNA4_CACHE_DIR to a bigger disk) "
                              "and rerun")


def test_progress_is_labelled_with_what_is_downloaded_or_read_from_the_cache(tmp_path, tarball):
    ui = Recorder()
    with serve(tarball.parent) as srv:
        download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", ui=ui, what="TheRock")
        got = download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", ui=ui, what="TheRock",
                             sink=lambda b: None)
    assert ui.descs == ["TheRock", "TheRock (cached)"]
    assert ui.total_seen == [got.size, got.size] and got.size == tarball.stat().st_size


@pytest.mark.parametrize("status", [403, 404])
def test_a_failed_status_names_what_and_the_url(tmp_path, tarball, status):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("status", status))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", what="TheRock")
    assert err.value.message == f"TheRock: HTTP {status} for {srv.url + NAME}" and err.value.status == status


def test_a_broken_off_body_names_the_cause(tmp_path, tarball):
    with serve(tarball.parent) as srv:
        srv.fail(NAME, *[("cut", 300_000)] * (download.RESUMES + 1))
        with pytest.raises(download.DownloadError) as err:
            download.fetch(srv.url + NAME, cache_dir=tmp_path / "cache", what="TheRock")
    assert err.value.message.startswith("TheRock: download broke off at 1 MB (")
    assert "None" not in err.value.message and "IncompleteRead" in err.value.message


def test_a_file_that_changed_on_the_server_leaves_nothing_behind(tmp_path, tarball):
    cache = tmp_path / "cache"
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("cut", 500_000), ("whole", 0))
        with pytest.raises(download.DownloadError, match="changed on the server"):
            download.fetch(srv.url + NAME, cache_dir=cache, sink=lambda b: None)
    assert sorted(p.name for p in _part(cache, srv.url + NAME).parent.iterdir()) == [
        f"{_part(cache, srv.url + NAME).name[:16]}.lock"]


def test_a_loopback_mirror_that_redirects_skips_a_dead_proxy_on_every_hop(tmp_path, tarball, dead_proxies):
    with serve(tarball.parent) as srv:
        srv.redirects["old/" + NAME] = srv.url + NAME
        got = download.fetch(srv.url + "old/" + NAME, cache_dir=tmp_path / "cache")
    assert got.sha256 == sha256_of(tarball)


def test_a_loopback_https_mirror_skips_a_dead_proxy(https_server, tmp_path, monkeypatch, dead_proxies):
    url, cert = https_server
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setattr(download, "_SESSION", None)
    assert download.fetch(url, cache_dir=tmp_path / "cache").size == 4096


@pytest.mark.parametrize("url, name", [("https://h.example/a/file.tar.gz/", "file.tar.gz"),
                                       ("https://h.example/a/b%20c.whl", "b c.whl")])
def test_filename_of(url, name):
    assert download.filename_of(url) == name


def test_the_cause_is_found_however_deep_requests_wraps_it():
    import socket

    import requests
    import urllib3

    unresolved = urllib3.exceptions.NameResolutionError("h.example", None, socket.gaierror(-2, "x"))
    # urllib3's MaxRetryError holds the cause in .reason only
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", reason=unresolved))
    assert download._classify(wrapped) == ("host name not found", True)
    # one branch of the chain does not hide another
    assert download._classify(requests.exceptions.ConnectionError(socket.gaierror(-2, "x"), OSError("y"))) == (
        "host name not found", True)
    assert download._classify(requests.exceptions.ConnectionError(OSError("[Errno 111] Connection refused"))) == (
        "connection refused", False)


@pytest.mark.parametrize("text, reason", [("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
                                          ("record layer failure", "TLS failed (record layer failure)")])
def test_a_tls_failure_is_final_and_says_tls(text, reason):
    import requests

    assert download._classify(requests.exceptions.SSLError(text)) == (reason, True)


def test_a_retry_that_could_not_end_within_the_budget_is_not_started(behind_silent_proxy):
    # first try ends at ~0.9 s; a retry would wait 1 s and could take 0.9 s more: past 2.5 s
    ui = Recorder()
    with pytest.raises(download.DownloadError) as err:
        download.get("https://downloads.example.com/x", ui=ui, timeout=(0.9, 0.9), budget=2.5)
    assert ui.notes == [] and "(after" not in err.value.message


def test_the_proxy_named_is_the_one_requests_uses(monkeypatch):
    for var in download.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://proxy.example:3128")
    assert download._proxy_for("https://h.example/x") == "http://proxy.example:3128"
    assert download._proxy_for("http://127.0.0.1:9/x") is None          # loopback goes direct
    err = download.network_error("https://h.example/x", "connection refused", 1)
    assert err.message == "cannot download https://h.example/x through proxy http://proxy.example:3128: connection refused"
    assert err.hint.startswith("host h.example; proxy variables: HTTPS_PROXY=http://proxy.example:3128, "
                               "https_proxy=http://proxy.example:3128, HTTP_PROXY=http://proxy.example:3128. "
                               "Fix the network")
    assert download.network_error("http://127.0.0.1:9/x", "connection refused", 3).message == (
        "cannot download http://127.0.0.1:9/x: connection refused (after 3 tries)")


def test_a_file_added_by_hand_is_held_to_the_recorded_hash_and_records_its_own(tmp_path, tarball):
    cache = tmp_path / "cache"
    url = "https://mirror.example/" + NAME
    ui = Recorder()
    got = download.add_file(tarball, url, cache_dir=cache, ui=ui)        # no pin: its hash is recorded
    assert download.recorded_sha256(url, cache) == got.sha256 == sha256_of(tarball)
    assert ui.infos == [f"recorded sha256 {got.sha256} for {tarball}; later runs require the same file"]
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"not the same file")
    with pytest.raises(download.HashMismatch, match=r"\(recorded on the first download\)"):
        download.add_file(other, url, cache_dir=cache)


def test_a_file_added_by_hand_waits_for_a_download_of_the_same_url(tmp_path, tarball):
    import threading
    import time

    cache = tmp_path / "cache"
    url = "https://mirror.example/" + NAME
    key = download.hashlib.sha256(url.encode()).hexdigest()[:16]
    with download.locked(cache / "downloads" / "partial" / f"{key}.lock"):
        adder = threading.Thread(target=download.add_file, args=(tarball, url), kwargs={"cache_dir": cache})
        adder.start()
        time.sleep(0.3)
        assert adder.is_alive() and download.recorded_sha256(url, cache) is None
    adder.join(30)
    assert download.recorded_sha256(url, cache) == sha256_of(tarball)


def test_a_long_retry_after_is_cut_to_half_the_budget(tmp_path, tarball):
    ui = Recorder()
    with serve(tarball.parent) as srv:
        srv.fail(NAME, ("busy", 5))
        with download.get(srv.url + NAME, ui=ui, timeout=(0.2, 5), budget=4) as resp:
            assert resp.status_code == 200
    assert ui.notes == ["127.0.0.1: HTTP 503; retry 1 of 4 in 2 s"]
