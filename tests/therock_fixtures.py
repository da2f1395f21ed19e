"""Test helpers: a loopback HTTP server with Range support, and fake TheRock tarballs.

`serve(root)` serves a directory on 127.0.0.1 like AMD's servers do: files
with Content-Length, ETag, Range/If-Range (206/416) and HEAD; a directory URL
answers with a listing in TheRock's index.html format (a `const files` JSON
array), as S3 ListBucketResult XML (optionally paged), or as plain links.
Faults are queued per path: an HTTP status, or a body cut off after N bytes;
`redirects` maps a path to a 302's Location; `validator` picks what a file
carries for If-Range (a strong or weak ETag, Last-Modified, or nothing).
Every request is logged in `server.log`, with its headers as sent.

`make_toolchain_tarball(path, version)` writes a .tar.gz shaped like a TheRock
dist tarball (members "./bin/...", no top-level dir, the llvm -> lib/llvm and
amdgcn -> lib/llvm/amdgcn links, share/therock/therock_manifest.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import re
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, listing: str = "json", page_size: int = 0, rate: int = 0,
                 validator: str = "etag"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.listing = listing          # "json" | "s3" | "html"
        self.page_size = page_size      # S3 keys per page (0 = all)
        self.rate = rate                # bytes/second, 0 = unthrottled
        self.validator = validator      # a file's: "etag" | "weak" (W/ ETag) | "last-modified" | "none"
        self.log: list[dict] = []
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.redirects: dict[str, str] = {}     # path -> Location of a 302
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def fail(self, path: str, *faults: tuple[str, int]) -> None:
        """Queue faults for `path`: ("status", 503), ("cut", nbytes), ("whole", 0): a Range
        request answered with the whole file (a server without ranges), ("shift", n): a
        resume answered from n bytes later than asked, ("gzip", 0): the file sent as is
        but labelled Content-Encoding: gzip (as servers do for .gz files), ("busy", n):
        503 with Retry-After: n, ("cap", n): a 206 of only the first n bytes asked for (a
        server that caps its ranges), or ("badlength", 0): a Content-Length that is not a
        number, the body ending when the connection closes."""
        self.faults.setdefault(path.lstrip("/"), []).extend(faults)

    def next_fault(self, path: str) -> tuple[str, int] | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    def downloads(self, name: str) -> list[dict]:
        return [r for r in self.log if r["path"].endswith(name) and r["method"] == "GET"]


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        parts = urlsplit(self.path)
        rel = unquote(parts.path).lstrip("/")
        self.server.log.append({"method": self.command, "path": rel,
                                "range": self.headers.get("Range"),
                                "if_range": self.headers.get("If-Range"), "query": parts.query,
                                "headers": dict(self.headers.items())})   # names as sent
        if rel in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[rel])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        fault = self.server.next_fault(rel)
        if fault and fault[0] == "status":
            return self._reply(fault[1], b"fault\n", head)
        if fault and fault[0] == "busy":
            return self._reply(503, b"busy\n", head, retry_after=fault[1])
        target = (self.server.root / rel).resolve()
        if not str(target).startswith(str(self.server.root.resolve())):
            return self._reply(403, b"forbidden\n", head)
        if target.is_dir():
            return self._listing(target, parts.query, head)
        if not target.is_file():
            return self._reply(404, b"not found\n", head)
        kind = fault[0] if fault else ""
        self._file(target, head, cut=fault[1] if kind == "cut" else None, whole=kind == "whole",
                   shift=fault[1] if kind == "shift" else 0, gzip=kind == "gzip",
                   cap=fault[1] if kind == "cap" else 0, badlength=kind == "badlength")

    def _reply(self, code: int, body: bytes, head: bool, ctype: str = "text/plain",
               retry_after: int | None = None) -> None:
        self.send_response(code)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _file(self, path: Path, head: bool, cut: int | None, whole: bool = False, shift: int = 0,
              gzip: bool = False, cap: int = 0, badlength: bool = False) -> None:
        st = path.stat()
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        validator = {"etag": ("ETag", etag), "weak": ("ETag", "W/" + etag), "none": None,
                     "last-modified": ("Last-Modified", self.date_time_string(int(st.st_mtime)))}[
                         self.server.validator]
        start, end, code = 0, size - 1, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m and not whole and (if_range is None or (validator and if_range == validator[1])):
            if m.group(1):
                start = int(m.group(1)) + shift
                end = int(m.group(2)) if m.group(2) else size - 1
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(end, size - 1)
            code = 206
        if cap:
            end, code = min(start + cap, size) - 1, 206
        self.send_response(code)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", "unknown" if badlength else str(end - start + 1))
        if badlength:
            self.close_connection = True
        if validator:
            self.send_header(*validator)
        self.send_header("Accept-Ranges", "bytes")
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        left = end - start + 1 if cut is None else min(cut, end - start + 1)
        block = 1 << 16 if not self.server.rate else max(1024, self.server.rate // 20)
        with open(path, "rb") as f:
            f.seek(start)
            try:
                while left > 0:
                    data = f.read(min(block, left))
                    if not data:
                        break
                    self.wfile.write(data)
                    left -= len(data)
                    if self.server.rate:
                        time.sleep(len(data) / self.server.rate)
            except (BrokenPipeError, ConnectionResetError):
                return
        if cut is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)

    def _listing(self, folder: Path, query: str, head: bool) -> None:
        files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
        kind = self.server.listing
        if kind == "json":
            items = json.dumps([{"name": p.name, "mtime": int(p.stat().st_mtime)} for p in files])
            body = ("<!DOCTYPE html><html><head><title>index</title></head><body>"
                    "<ul id='list'></ul><script>\n"
                    f"            const files = {items};\n"
                    "            function render() {}\n</script></body></html>")
        elif kind == "s3":
            start = int((parse_qs(query).get("continuation-token") or ["0"])[0])
            size = self.server.page_size or len(files)
            page = files[start:start + size]
            more = start + size < len(files)
            keys = "".join(f"<Contents><Key>v5/rocm/core/tarball/{html.escape(p.name)}</Key>"
                           f"<Size>{p.stat().st_size}</Size></Contents>" for p in page)
            token = f"<NextContinuationToken>{start + size}</NextContinuationToken>" if more else ""
            body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                    '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"<Name>bucket</Name><IsTruncated>{'true' if more else 'false'}</IsTruncated>"
                    f"{token}{keys}</ListBucketResult>")
        else:
            body = "<html><body>" + "".join(
                f'<a href="{quote(p.name)}">{html.escape(p.name)}</a><br>' for p in files) + "</body></html>"
        self._reply(200, body.encode(), head, "application/xml" if kind == "s3" else "text/html")


@contextlib.contextmanager
def serve(root: Path, **kw) -> Iterator[FileServer]:
    server = FileServer(Path(root), **kw)
    # a short poll: shutdown() waits up to one poll, and every test stops a server
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --- fake TheRock trees ----------------------------------------------------

_SCRIPT = "#!/bin/sh\necho '{text}'\n"

EVIL = ("traversal", "absolute_name", "absolute_link", "escape_link", "chain_escape",
        "dotdot_dir", "late_escape", "device", "fifo", "hardlink_escape")


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", *, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_780_000_000
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def toolchain_members(version: str, *, manifest: bool = True) -> list[tuple]:
    """(name, data, mode, type, link) rows of a minimal TheRock tree."""
    reg, sym = tarfile.REGTYPE, tarfile.SYMTYPE
    d = tarfile.DIRTYPE
    rows = [(n, b"", 0o755, d, "") for n in (
        ".", "./bin", "./lib", "./lib/llvm", "./lib/llvm/bin", "./lib/llvm/amdgcn",
        "./lib/llvm/amdgcn/bitcode", "./share", "./share/amd_smi", "./share/therock", "./.info",
        "./include", "./libexec")]
    rows += [
        ("./bin/rocminfo", _SCRIPT.format(text="ROCk module is NOT loaded").encode(), 0o755, reg, ""),
        ("./bin/amd-smi", _SCRIPT.format(text="amd-smi fake").encode(), 0o755, reg, ""),
        ("./lib/llvm/bin/clang", _SCRIPT.format(text=f"AMD clang version 22.0.0 (ROCm {version})").encode(),
         0o755, reg, ""),
        ("./lib/llvm/bin/clang++", _SCRIPT.format(text=f"AMD clang version 22.0.0 (ROCm {version})").encode(),
         0o755, reg, ""),
        # the deprecated pair the flash-attention build calls (TheRock hipcc_deprecation.md)
        ("./bin/hipcc", _SCRIPT.format(text="hipcc shim").encode(), 0o755, reg, ""),
        ("./bin/hipconfig", _SCRIPT.format(text=version).encode(), 0o755, reg, ""),
        ("./lib/llvm/bin/rocm.cfg", b"--rocm-path='<CFGDIR>/../../..'\n", 0o644, reg, ""),
        ("./lib/llvm/amdgcn/bitcode/ocml.bc", b"BC\xc0\xde" + b"\0" * 64, 0o644, reg, ""),
        ("./share/amd_smi/__init__.py", b"", 0o644, reg, ""),
        ("./.info/version", f"{version.split('a')[0].split('rc')[0]}-0\n".encode(), 0o644, reg, ""),
        ("./share/therock/dist_info.json", b'{"dist_amdgpu_targets": "gfx1200;gfx1201"}', 0o644, reg, ""),
        ("./llvm", b"", 0o777, sym, "lib/llvm"),
        ("./amdgcn", b"", 0o777, sym, "lib/llvm/amdgcn"),
        ("./bin/amdclang", b"", 0o777, sym, "../lib/llvm/bin/clang"),
        ("./lib/libamdhip64.so.7", b"\x7fELF fake", 0o755, reg, ""),
        ("./lib/libamdhip64.so", b"", 0o644, tarfile.LNKTYPE, "./lib/libamdhip64.so.7"),
    ]
    if manifest:
        data = json.dumps({"the_rock_commit": "89553ce37" + "0" * 31,
                           "rocm_package_version": version,
                           "rocm_version": re.match(r"\d+\.\d+\.\d+", version).group(0),
                           "submodules": []}).encode()
        rows.append(("./share/therock/therock_manifest.json", data, 0o644, reg, ""))
    return rows


def _evil_rows(kind: str) -> list[tuple]:
    reg, sym = tarfile.REGTYPE, tarfile.SYMTYPE
    return {
        "traversal": [("./../outside.txt", b"pwned", 0o644, reg, "")],
        "absolute_name": [("/tmp/rdna4-absolute-member.txt", b"pwned", 0o644, reg, "")],
        "absolute_link": [("./bin/passwd", b"", 0o777, sym, "/etc/passwd")],
        "escape_link": [("./lib/up", b"", 0o777, sym, "../../outside")],
        # each link stays inside on paper; together "out" is the tree's parent
        "chain_escape": [("./here", b"", 0o777, sym, "."), ("./bin/dot", b"", 0o777, sym, "../here"),
                         ("./out", b"", 0o777, sym, "bin/dot/..")],
        # a directory named "..": without the '..' rule its mode lands on the tree's parent
        "dotdot_dir": [("..", b"", 0o777, tarfile.DIRTYPE, "")],
        # "a" is inside when made; "l" made later turns it outward: only the final recheck sees it
        "late_escape": [("./a", b"", 0o777, sym, "l/.."), ("./l", b"", 0o777, sym, ".")],
        "device": [("./dev-null", b"", 0o666, tarfile.CHRTYPE, "")],
        "fifo": [("./pipe", b"", 0o666, tarfile.FIFOTYPE, "")],
        "hardlink_escape": [("./lib/hard", b"", 0o644, tarfile.LNKTYPE, "../etc/passwd")],
    }[kind]


def make_toolchain_tarball(path: Path, version: str, *, evil: str | None = None,
                           pad_bytes: int = 0, truncate: bool = False, manifest: bool = True,
                           compresslevel: int = 1, seed: int = 0, drop: tuple[str, ...] = (),
                           add: tuple[tuple, ...] = ()) -> Path:
    """Write a fake TheRock dist .tar.gz; `evil` adds one unsafe member (see EVIL).

    `drop` leaves out members by name ("./bin/hipcc"); `add` appends member rows.

    pad_bytes adds lib/librocblas-pad.so of half random, half repetitive data
    (about 2:1 like real ROCm libraries), so tests can make big downloads.
    `truncate` cuts the finished .tar.gz in the middle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in toolchain_members(version, manifest=manifest) if r[0] not in drop] + list(add)
    if evil:
        rows += _evil_rows(evil)
    with tarfile.open(path, "w:gz", compresslevel=compresslevel, format=tarfile.PAX_FORMAT) as tf:
        for name, data, mode, kind, link in rows:
            _add(tf, name, data, mode=mode, kind=kind, link=link)
        if pad_bytes:
            info = tarfile.TarInfo("./lib/librocblas-pad.so")
            info.size = pad_bytes
            info.mode = 0o644
            info.mtime = 1_780_000_000
            tf.addfile(info, _PadReader(pad_bytes, seed))
    if truncate:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    return path


class _PadReader(io.RawIOBase):
    """Deterministic bytes: 64 KiB random, then 64 KiB of a repeated word, and so on."""

    def __init__(self, size: int, seed: int):
        import random

        self.left = size
        self.n = 0
        self.rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            self.n += 1
            block = (hashlib.sha256(str(self.n).encode()).digest() * 2048 if self.n % 2
                     else self.rng.randbytes(1 << 16))
            out += block
        self.left -= n
        return bytes(out[:n])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
