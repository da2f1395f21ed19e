"""Resumable, verified, content-addressed downloads shared by every prefix.

Files land in CACHE/downloads/<sha256>/<filename>; CACHE/downloads/urls.json
maps each URL to the sha256 it had the first time, so an unpinned file is found
again (and held to that hash) on the next run. Half-finished downloads wait in
CACHE/downloads/partial/ and are resumed with an HTTP Range request.

`sink` (optional) receives every byte of the file in order, from the cache,
from a resumed partial file or from the network, so a caller can unpack while
downloading; it is told nothing until the server has agreed to the resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import unquote, urljoin, urlsplit

from .errors import InstallerError, Refused, UsageError

CHUNK = 1 << 20
# connect (a silent proxy's CONNECT also ends here), read (seconds without a byte)
TIMEOUT = (10, 60)
RETRIES = 4                 # more tries after a timeout, reset, refused connection or 429/5xx
BACKOFF = 1.0               # sleeps 1, 2, 4 ... seconds between tries
RETRY_BUDGET = 30.0         # no retry starts that could end more than this after the first try
RETRY_STATUS = (429, 500, 502, 503, 504)
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
              "NO_PROXY", "no_proxy")
RESUMES = 3                 # Range resumes after the body broke off mid-way
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

Sink = Callable[[bytes], None]
Accept = Callable[[Path], Any]


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int
    from_cache: bool


class DownloadError(InstallerError):
    """An HTTP failure; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_path(url: str) -> Path | None:
    """The file a local path or file:// URL names, or None for http(s)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if not parts.scheme:
        return Path(url).expanduser()
    return None


def check_url(url: str) -> None:
    """https for remote hosts; http only to loopback; local paths and file://."""
    if local_path(url) is not None:
        return
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    raise UsageError(f"refusing to download {url}",
                     hint="use an https:// URL (plain http only to 127.0.0.1), a local path or file://")


def filename_of(url: str) -> str:
    name = unquote(urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"{url} does not name a file")
    return name


# --- the cache -------------------------------------------------------------

def _downloads(cache_dir: Path) -> Path:
    return Path(cache_dir) / "downloads"


def _index_path(cache_dir: Path) -> Path:
    return _downloads(cache_dir) / "urls.json"


def _read_index(cache_dir: Path) -> dict[str, str]:
    try:
        data = json.loads(_index_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    # several prefixes share one cache; two installers must not write one file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _update_index(cache_dir: Path, url: str, digest: str | None) -> None:
    """Set (or with None, drop) the recorded sha256 of `url`."""
    index = _index_path(cache_dir)
    with locked(index.with_suffix(".lock")):
        data = _read_index(cache_dir)
        if digest:
            data[url] = digest
        elif data.pop(url, None) is None:
            return
        tmp = index.with_suffix(f".tmp{os.getpid()}")
        # the layout is equivalent: any JSON of the mapping reads back the same
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")  # pragma: no mutate
        os.replace(tmp, index)


def sweep(cache_dir: Path) -> None:
    """Remove urls.json temps of killed runs (only written under the index lock)."""
    index = _index_path(cache_dir)
    if not index.parent.is_dir():
        return
    with locked(index.with_suffix(".lock")):
        for tmp in index.parent.glob("urls.tmp*"):
            tmp.unlink(missing_ok=True)  # pragma: no mutate (equivalent: we hold the lock)


def recorded_sha256(url: str, cache_dir: Path) -> str | None:
    return _read_index(cache_dir).get(url)


def cached_urls(cache_dir: Path) -> dict[str, str]:
    """url -> sha256 for every URL whose file is still in the cache."""
    return {u: d for u, d in _read_index(cache_dir).items() if _cached_file(cache_dir, d)}


def _cached_file(cache_dir: Path, digest: str, name: str | None = None) -> Path | None:
    folder = _downloads(cache_dir) / digest.lower()
    if name and (folder / name).is_file():
        return folder / name
    # a pinned hash matches whatever name a mirror gave the same bytes
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    return files[0] if files else None


def forget(url: str, *, cache_dir: Path, sha256: str | None = None) -> None:
    """Drop the cached file for `url` and its recorded hash (e.g. it is corrupt)."""
    digest = sha256 or recorded_sha256(url, cache_dir)
    if digest:
        shutil.rmtree(_downloads(cache_dir) / digest.lower(), ignore_errors=True)  # pragma: no mutate (cleanup)
    _update_index(cache_dir, url, None)


# --- fetching --------------------------------------------------------------

def fetch(url: str, *, cache_dir: Path, sha256: str | None = None, offline: bool = False,
          ui: Any = None, what: str | None = None, sink: Sink | None = None,
          accept: Accept | None = None, trusted: str | None = None,
          ignore_recorded: bool = False) -> Fetched:
    """Return the verified file for `url`, downloading it only when not cached.

    The expected sha256 is the pin, else `trusted` (what the caller's prefix
    recorded for this URL), else what the cache recorded on the first download
    (unless `ignore_recorded`: the user accepted a changed file).
    `accept(path)` runs once the bytes match it and before they are kept: a
    Refused from it (or from `sink`) drops the file from the cache and its URL
    from the index, so a refused file is never found or trusted again.
    """
    check_url(url)
    cache_dir = Path(cache_dir)
    name = filename_of(url)
    what = what or name
    pinned = _digest(sha256, what, "pin")
    trusted = _digest(trusted, what, "recorded hash")
    recorded = None if ignore_recorded else recorded_sha256(url, cache_dir)
    expect = pinned or trusted or recorded

    hit = _cached_file(cache_dir, expect, name) if expect else None
    if hit is None and not offline:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        with locked(_downloads(cache_dir) / "partial" / f"{key}.lock"):
            # another installer may have finished it while we waited
            recorded = None if ignore_recorded else recorded_sha256(url, cache_dir)
            expect = pinned or trusted or recorded
            hit = _cached_file(cache_dir, expect, name) if expect else None
            if hit is None:
                return _download(url, cache_dir, name, key, what, pinned or trusted, recorded,
                                 ui, sink, accept, "pinned" if pinned else "recorded in this prefix")
    if hit is None:
        raise InstallerError(f"offline, and {what} is not in the cache ({url})",
                             hint=f"run once without --offline, or download {url} elsewhere and run: "
                                  f"{add_command(url, cache_dir)}")
    size = hit.stat().st_size
    try:
        if sink is not None:
            with open(hit, "rb") as f, _progress(ui, size, f"{what} (cached)") as bar:
                _pump(_chunks(f), None, None, sink, bar)
        if accept is not None:
            accept(hit)
    except Refused:
        forget(url, cache_dir=cache_dir, sha256=expect)
        raise
    return Fetched(hit, expect, size, True)


def add_command(url: str, cache_dir: Path) -> str:
    """The `cache add` command that puts a file downloaded by hand where fetch() finds it."""
    import shlex

    return (f"rdna4-install cache add {shlex.quote(filename_of(url))} --url {shlex.quote(url)} "
            f"--cache-dir {shlex.quote(str(cache_dir))}")


def add_file(src: Path, url: str, *, cache_dir: Path, sha256: str | None = None, ui: Any = None) -> Fetched:
    """Put `src` (downloaded by hand) into the cache as the file of `url`.

    It must match `sha256` (the pin) or else the hash recorded for `url`; with
    neither, its hash is recorded, as a first download's would be.
    """
    check_url(url)
    cache_dir = Path(cache_dir)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    pinned = sha256.strip().lower() if sha256 else None
    with locked(_downloads(cache_dir) / "partial" / f"{key}.lock"):
        return _download(url, cache_dir, filename_of(url), key, str(src), pinned,
                         recorded_sha256(url, cache_dir), ui, None, src=Path(src))
def _digest(value: str | None, what: str, kind: str) -> str | None:
    digest = value.strip().lower() if value else None
    if digest and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UsageError(f"sha256 {kind} for {what} is not 64 hex digits: {value!r}")
    return digest


class HashMismatch(Refused):
    """The bytes are not the ones expected; `got` is their sha256, `which` says
    where the expected one came from (pinned / recorded in this prefix / the cache)."""

    def __init__(self, message: str, hint: str, *, got: str, which: str):
        super().__init__(message, hint)
        self.got, self.which = got, which


@contextlib.contextmanager
def _progress(ui: Any, total: int | None, desc: str):
    if ui is None:
        yield _NoBar()
    else:
        with ui.progress(total, desc) as bar:
            yield bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


_SESSION = None


def session():
    """One requests Session (connection reuse); get() does the retrying itself."""
    global _SESSION
    if _SESSION is None:
        import requests

        class Session(requests.Session):
            def get_redirect_target(self, resp):
                # every hop obeys the https rule before it is followed: a loopback
                # mirror must not send us on to plain http elsewhere
                target = super().get_redirect_target(resp)
                if target:
                    check_url(urljoin(resp.url, target))
                return target

        s = Session()
        s.headers["User-Agent"] = "rdna4-install"
        s.verify = ca_bundle()
        _SESSION = s
    return _SESSION


def ca_bundle() -> str | bool:
    """The CA certificates to trust: requests' own variables, else OpenSSL's.

    requests reads only REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE and otherwise trusts
    certifi's list, so behind a TLS-inspecting proxy whose CA is given, as curl,
    git and uv take it, in SSL_CERT_FILE / SSL_CERT_DIR, every download would fail.
    """
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        value = os.environ.get(var)
        if value and os.path.exists(value):
            return value
    return True


def _proxies(url: str) -> dict | None:
    # never send loopback traffic (tests, local mirrors) through a proxy. "" rather
    # than None: requests drops None entries, and a redirect's hop then takes the
    # proxy from the environment; an empty proxy means a direct connection. The
    # scheme's entry wins over ALL_PROXY's, and only http(s) gets here (check_url).
    return dict.fromkeys(("http", "https"), "") if is_loopback(urlsplit(url).hostname) else None


def _proxy_for(url: str) -> str | None:
    """The proxy requests will use for `url` (from the environment), if any."""
    import requests.utils

    if _proxies(url) is not None:
        return None
    return requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))


def get(url: str, *, method: str = "GET", ui: Any = None, timeout: tuple[float, float] = TIMEOUT,
        budget: float = RETRY_BUDGET, **kw):
    """GET (or `method`, e.g. HEAD) through the shared session with the https policy, timeouts and retries.

    A name that does not resolve or a TLS failure is not retried (it will not
    fix itself); timeouts, resets and 429/5xx are, while the retries fit in
    `budget` seconds. Each retry is a ui.note (screen on a TTY or at -v, and
    the recipe log); the final error names the host, the proxy and the ways
    around the network.
    """
    import requests

    check_url(url)
    # Session.request follows redirects for every method, HEAD too (only requests.head() does not)
    started = time.monotonic()
    tries = 0
    while True:
        tries += 1
        wait = BACKOFF * 2 ** (tries - 1)
        try:
            resp = session().request(method, url, timeout=timeout, proxies=_proxies(url), **kw)
        except requests.RequestException as exc:
            reason, final = _classify(exc)
            if final or not _may_retry(tries, started, wait, timeout[0], budget):
                raise network_error(url, reason, tries) from None
            _note(ui, f"{urlsplit(url).hostname}: {reason}; retry {tries} of {RETRIES} in {wait:.0f} s")
            time.sleep(wait)
            continue
        after = resp.headers.get("Retry-After", "")
        wait = min(float(after), budget / 2) if after.isdigit() else wait
        if resp.status_code in RETRY_STATUS and _may_retry(tries, started, wait, timeout[0], budget):
            resp.close()
            _note(ui, f"{urlsplit(url).hostname}: HTTP {resp.status_code}; retry {tries} of {RETRIES} "
                      f"in {wait:.0f} s")
            time.sleep(wait)
            continue
        check_url(resp.url)  # a redirect must obey the same rules
        return resp


def _may_retry(tries: int, started: float, wait: float, connect: float, budget: float) -> bool:
    """Another try is allowed, and even if it waits the whole connect timeout it ends within budget."""
    return tries <= RETRIES and time.monotonic() - started + wait + connect <= budget


def _note(ui: Any, msg: str) -> None:
    if ui is not None:
        ui.note(msg)


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(short cause, whether retrying is pointless) for a requests exception."""
    import socket

    import requests
    import urllib3

    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:  # requests wraps urllib3's MaxRetryError, which holds the real reason
        e = todo.pop()
        if isinstance(e, BaseException) and e not in seen:
            seen.append(e)
            todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
    if any(isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for e in seen):
        return "host name not found", True
    if any(isinstance(e, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)) for e in seen):
        reason = _reason(exc)
        return (reason if "TLS" in reason else f"TLS failed ({reason})"), True
    return _reason(exc), False


def network_error(url: str, reason: str, tries: int) -> DownloadError:
    """A download that the network stopped: what happened, and every way around it."""
    host = urlsplit(url).hostname or url
    proxy = _proxy_for(url)
    via = f" through proxy {proxy}" if proxy else ""
    after = f" (after {tries} tries)" if tries > 1 else ""
    proxy_vars = [f"{k}={os.environ[k]}" for k in PROXY_VARS if os.environ.get(k)]
    return DownloadError(
        f"cannot download {url}{via}: {reason}{after}",
        hint=f"host {host}; proxy variables: {', '.join(proxy_vars) or 'none set'}. Fix the network or "
             f"proxy and rerun; or download the file elsewhere and add it with "
             f"`rdna4-install cache add FILE --url {url}`, or point the pin at a mirror or a local "
             f"directory (--set RECIPE.KEY=https://mirror/... or file:///dir/...); then --offline "
             f"uses only the cache")


def _reason(exc: BaseException) -> str:
    """A short cause: requests nests urllib3's whole retry story in its message."""
    text = str(exc.__context__ or exc) if not str(exc) else str(exc)
    for pattern, say in ((r"Errno 111|Connection refused", "connection refused"),
                         (r"Name or service not known|nodename nor servname|Errno -[23]|Failed to resolve",
                          "host name not found"),
                         (r"timed out|Timeout", "no answer (timed out)"),
                         (r"CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted"),
                         (r"SSLError|SSL", "TLS handshake failed"),
                         (r"Connection reset|RemoteDisconnected|Connection aborted",
                          "connection reset by the server")):
        if re.search(pattern, text):
            return say
    return text.splitlines()[0][:200] if text else type(exc).__name__


def status_error(url: str, status: int, what: str) -> DownloadError:
    hint = {403: "the file is not public or no longer exists; pick another version",
            404: "the file does not exist; check the version"}.get(
        status, "the server failed; rerun later (the download resumes)")
    return DownloadError(f"{what}: HTTP {status} for {url}", hint=hint, status=status)


def _no_space(where: Path, what: str, need: int | None) -> InstallerError:
    if not need:
        amount = "more space"
    elif need >= 10**9:
        amount = f"{need / 1e9:.1f} GB"
    else:
        amount = f"{-(-need // 10**6)} MB"      # rounded up: never "0 MB"
    return InstallerError(f"disk full while downloading {what} into {where}",
                          hint=f"free {amount} there (or set RDNA4_CACHE_DIR to a bigger disk) and rerun")


def _download(url: str, cache_dir: Path, name: str, key: str, what: str,
              pinned: str | None, recorded: str | None, ui: Any, sink: Sink | None,
              accept: Accept | None = None, expected_from: str = "pinned",
              src: Path | None = None) -> Fetched:
    """Get `url` (or copy `src`, a file that stands for it), check it, then publish it."""
    partial = _downloads(cache_dir) / "partial"     # made by the caller's lock
    part = partial / f"{key}-{name}.part"
    meta = partial / f"{key}-{name}.json"
    from .mirror import rewrite

    source = rewrite(url)  # where the bytes come from; `url` stays the cache's key
    src = src or local_path(source)
    try:
        if src is not None:
            digest, size = _copy_local(src, part, what, ui, sink)
        else:
            digest, size = _get_resumable(source, part, meta, what, ui, sink)
        expect = pinned or recorded
        if expect and digest != expect:
            which = expected_from if pinned else "recorded on the first download"
            raise HashMismatch(f"sha256 mismatch for {what}: expected {expect} ({which}), got {digest}",
                               hint="the file changed upstream or was corrupted; the download was "
                                    "deleted. If the change is expected, update the pin",
                               got=digest, which=which)
        if accept is not None:
            accept(part)
    except Refused:
        # a refused file is not kept for a resume either: the rerun starts afresh
        _unlink(part, meta)
        raise
    except OSError as exc:
        if exc.errno in NO_SPACE:
            _unlink(part, meta)
            raise _no_space(partial, what, None) from None
        raise
    dest = _downloads(cache_dir) / digest / name
    dest.parent.mkdir(exist_ok=True)
    os.replace(part, dest)
    _unlink(meta)
    if recorded != digest:      # first download, or a new pin replaced the recorded hash
        _update_index(cache_dir, url, digest)
    if expect is None and ui is not None:
        ui.info(f"recorded sha256 {digest} for {what}; later runs require the same file")
    return Fetched(dest, digest, size, False)


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _copy_local(src: Path, part: Path, what: str, ui: Any, sink: Sink | None) -> tuple[str, int]:
    if not src.is_file():
        raise InstallerError(f"{what}: no such file {src}", hint="check the mirror path")
    h = hashlib.sha256()
    with open(src, "rb") as f, open(part, "wb") as out, \
            _progress(ui, src.stat().st_size, what) as bar:
        size = _pump(_chunks(f), out, h, sink, bar)
    return h.hexdigest(), size


def _chunks(f: Any) -> Iterator[bytes]:
    return iter(lambda: f.read(CHUNK), b"")  # pragma: no mutate (equivalent: a block size)


def sha256_file(path: Path) -> str:
    """The sha256 of a file on disk, read in chunks (bundles, tuned configs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in _chunks(f):
            h.update(block)
    return h.hexdigest()


def _pump(blocks: Iterable[bytes], out: Any, h: Any, sink: Sink | None, bar: Any) -> int:
    """Pass blocks to the partial file (`out`), the hash and the sink, each if given."""
    n = 0
    for block in blocks:
        if out is not None:
            out.write(block)
        if h is not None:
            h.update(block)
        if sink is not None:
            sink(block)
        n += len(block)
        bar.update(len(block))
    return n


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    # "bytes 100-199/1000" -> (100, 1000); "bytes 100-199/*" -> (100, None)
    if not value or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    start = span.split("-", 1)[0]
    if not start.isdigit():
        return None
    return int(start), (int(total) if total.isdigit() else None)


def _body(resp) -> Iterator[bytes]:
    # read1 hands over what has arrived, so a connection that breaks off
    # loses nothing already received (iter_content would drop a partial chunk)
    raw = resp.raw
    while True:
        block = raw.read1(CHUNK, decode_content=False)
        if not block:
            return
        yield block


def _get_resumable(url: str, part: Path, meta: Path, what: str, ui: Any,
                   sink: Sink | None) -> tuple[str, int]:
    import requests
    import urllib3

    h = hashlib.sha256()
    have = part.stat().st_size if part.exists() else 0
    validator = _read_meta(meta) if have else None
    done = 0            # bytes hashed and handed to sink so far
    total: int | None = None
    resumes = 0
    bar: Any = None
    with contextlib.ExitStack() as stack:
        while True:
            headers = {"Accept-Encoding": "identity"}
            if have:
                headers["Range"] = f"bytes={have}-"
                if validator:
                    headers["If-Range"] = validator
            resp = get(url, headers=headers, stream=True, ui=ui)
            with resp:
                if resp.status_code == 416 and have and not done:
                    # the partial file is not a prefix of this file: start over
                    _unlink(part, meta)
                    have = 0
                    continue
                if resp.status_code not in (200, 206):
                    raise status_error(url, resp.status_code, what)
                rng = _content_range(resp.headers.get("Content-Range"))
                if resp.status_code == 206 and not (rng and rng[0] == have):
                    raise DownloadError(f"{what}: the server answered a resume with the wrong range "
                                        f"({resp.headers.get('Content-Range')})",
                                        hint=f"delete {part} and rerun")
                if resp.status_code == 206:
                    total = rng[1]
                    if not done and have:
                        if ui is not None:
                            ui.info(f"resuming {what} at {have / 1e6:.0f} MB")
                        # hash (and hand to the sink) what an earlier run saved
                        with open(part, "rb") as saved:
                            done = _pump(_chunks(saved), None, h, sink, _NoBar())
                    mode = "ab"
                else:
                    if done:
                        # we already handed bytes to the sink and cannot take them back
                        _unlink(part, meta)
                        raise DownloadError(f"{what} changed on the server during the download",
                                            hint="rerun to download it again")
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    have = 0
                    mode = "wb"
                    tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                    validator = tag if tag and not tag.startswith("W/") else None
                    if validator:
                        meta.write_text(json.dumps({"url": url, "validator": validator}))
                    else:
                        _unlink(meta)
                if total is not None:
                    free = shutil.disk_usage(part.parent).free
                    if free < total - have:
                        raise _no_space(part.parent, what, total - have)
                if bar is None:
                    bar = stack.enter_context(_progress(ui, total, what))
                    bar.update(have)
                try:
                    with open(part, mode) as out:
                        # counted as it goes: a broken body must still say how far it got
                        for block in _body(resp):
                            have += _pump((block,), out, h, sink, bar)
                        done = have
                except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError) as exc:
                    done = have
                    if resumes >= RESUMES:
                        raise DownloadError(f"{what}: download broke off at {have / 1e6:.0f} MB "
                                            f"({_reason(exc)})",
                                            hint="rerun to resume where it stopped") from None
                    resumes += 1
                    continue
            if total is not None and have != total:
                if have < total and resumes < RESUMES:
                    resumes += 1
                    continue
                raise DownloadError(f"{what}: got {have} bytes, the server announced {total}",
                                    hint="rerun to resume; if it persists the mirror is broken")
            return h.hexdigest(), have


def _read_meta(meta: Path) -> str | None:
    try:
        return json.loads(meta.read_text()).get("validator")
    except (OSError, ValueError, AttributeError):
        return None
