"""Bundles: build once, install on many machines with no network and no compiler.

A bundle is one tar stream (zstd where this Python has it, gzip otherwise):

    manifest.json                 format, target archs, sha256 + size of every other member
    receipt.json                  the source prefix's receipt
    recipes/, patches/            the recipes it was installed with; pins.toml = the receipt's pins
    mirror/                       a mirror directory (mirrorlayout): the toolchain tarball,
                                  sdists, git repos, and every wheel in the venv
    wheels/<recipe>/<key>/        the flash-attention and vLLM wheels built there (wheel cache slots)
    installer/<wheel>             rdna4-install itself

`install --from-bundle` unpacks it beside the cache, checks every member against
the manifest and the target archs before anything is placed, seeds the wheel
cache, and then runs the ordinary install with the bundle's recipes and pins
through the bundle's mirror in local-only mode: a URL the bundle does not hold
is an error, never a download. The same fingerprints give the same receipt, and
the seeded wheel cache means nothing is compiled.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from . import __version__, mirror, mirrorlayout, proc, state
from .errors import InstallerError, UsageError, command
from .download import sha256_file
from .unpack import zstd_module

FORMAT = 1
MANIFEST = "manifest.json"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
DAMAGED_HINT = ("copy the bundle again (compare its sha256 with the source), or rebuild it there "
                "with: rdna4-install bundle --prefix PREFIX -o FILE")


# --- compression ------------------------------------------------------------------

def compression() -> str:
    return "zstd" if zstd_module() is not None else "gzip"


def _compressor(out: BinaryIO):
    z = zstd_module()
    if z is None:
        return gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
    if z.__name__ == "zstandard":
        return z.ZstdCompressor(level=10, threads=-1).stream_writer(out, closefd=False)
    return z.ZstdFile(out, "wb", level=10)


class _Prepend:
    """A read-only stream that first returns `head` (the magic we peeked at)."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self.rest.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out if len(out) == n else out + self.rest.read(n - len(out))
        return self.rest.read(n)


def _decompressor(stream: BinaryIO, name: str):
    head = stream.read(4)
    raw = _Prepend(head, stream)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    if head == ZSTD_MAGIC:
        z = zstd_module()
        if z is None:
            raise UsageError(f"bundle {name} is zstd-compressed and this Python cannot read zstd",
                             hint="install the zstandard module into rdna4-install's environment "
                                  "(uv tool install --with zstandard rdna4-install), or use Python 3.14+")
        if z.__name__ == "zstandard":
            return z.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return z.ZstdFile(raw, "rb")
    raise InstallerError(f"{name} is not an rdna4-install bundle (neither zstd nor gzip)",
                         hint="pass the file `rdna4-install bundle -o FILE` wrote")


def _decode_errors() -> tuple[type[BaseException], ...]:
    import zlib

    errors: list[type[BaseException]] = [gzip.BadGzipFile, zlib.error, EOFError, tarfile.TarError]
    z = zstd_module()
    if z is not None:
        errors.append(getattr(z, "ZstdError", EOFError))
    return tuple(errors)


# --- making a bundle -----------------------------------------------------------------

def _write_pins(pins: dict[str, dict[str, Any]], path: Path) -> None:
    lines = []
    for table in sorted(pins):
        lines.append(f"[{table}]")
        for key, value in sorted(pins[table].items()):
            # JSON strings and numbers are TOML values too
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    path.write_text("\n".join(lines))


def _own_wheel(dest: Path, log: Path) -> Path | None:
    """rdna4-install as a wheel, built from the source tree it runs from (None if it runs
    from an installed wheel, which leaves no source to build)."""
    from .pyenv import find_uv, uv_env

    src = Path(__file__).resolve().parent.parent
    if not (src / "pyproject.toml").is_file():
        return None
    dest.mkdir(parents=True, exist_ok=True)
    proc.run([find_uv(), "build", "--wheel", "--no-config", "--out-dir", str(dest), str(src)],
             env=uv_env(proc.base_env()), log=log, what="uv build (rdna4-install)")
    wheels = sorted(dest.glob("rdna4_install-*.whl"))
    return wheels[-1] if wheels else None


def _check_recipes(stage: Path, prefix: Path, cache_dir: Path, receipt: dict[str, Any]) -> None:
    """The staged recipes and pins must plan nothing for the source prefix: then the
    target computes the same fingerprints, and the receipt comes out the same."""
    from . import multigpu
    from . import recipes as rcp
    from .plan import Settings, make_plan

    recipes_dir = stage / "recipes"
    settings = Settings(prefix=prefix, cache_dir=cache_dir, recipes_dir=recipes_dir,
                        archs=tuple(receipt.get("archs") or ()),
                        pins=rcp.load_pins(recipes_dir / rcp.PINS_FILE),
                        options={"editable": False, "visible_devices": str(receipt.get("visible_devices", "")),
                                 **multigpu.recorded(receipt)})
    todo = make_plan(settings).to_run
    if todo:
        raise InstallerError(f"{prefix} was not installed from these recipes: "
                             f"{', '.join(i.name + ' (' + i.reason + ')' for i in todo)}",
                             hint="pass the --recipes-dir it was installed with (RDNA4_RECIPES_DIR), "
                                  "or finish it first: " + command(prefix, "install"))


def create(prefix: Path, *, cache_dir: Path, recipes_dir: Path, out: str, ui: Any) -> dict[str, Any]:
    """Pack `prefix` into the bundle `out` ("-" = stdout); returns the manifest."""
    receipt = state.read_receipt(prefix)
    if not receipt or not receipt.get("components"):
        raise InstallerError(f"{prefix} has no finished install to bundle",
                             hint="install it first: " + command(prefix, "install"))
    unfinished = [n for n, c in receipt["components"].items() if c.get("status") != state.DONE]
    editable = [n for n, c in receipt["components"].items() if (c.get("facts") or {}).get("editable")]
    if unfinished or editable:
        what = f"{', '.join(unfinished)} not done" if unfinished else f"{', '.join(editable)} is editable"
        raise InstallerError(f"cannot bundle {prefix}: {what}",
                             hint="finish a non-editable install first: " + command(prefix, "install"))
    cache_dir = Path(cache_dir)
    log = mirrorlayout.log_file(cache_dir, "bundle")
    (cache_dir / "bundles").mkdir(parents=True, exist_ok=True)
    for old in (cache_dir / "bundles").glob(".stage-*-*"):
        if not state.pid_alive(int(old.name.split("-")[1])):   # a killed `bundle` left it
            shutil.rmtree(old, ignore_errors=True)
    # under the cache: files are hard-linked from it, not copied
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{os.getpid()}-", dir=cache_dir / "bundles"))
    try:
        with mirrorlayout.show_tail(ui, log):
            manifest = _stage(stage, prefix, receipt, cache_dir=cache_dir, recipes_dir=recipes_dir,
                              ui=ui, log=log)
        _write(stage, manifest, out)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _stage(stage: Path, prefix: Path, receipt: dict[str, Any], *, cache_dir: Path, recipes_dir: Path,
           ui: Any, log: Path) -> dict[str, Any]:
    """Put every member into `stage`; returns the manifest."""
    from . import recipes as rcp

    shutil.copytree(recipes_dir, stage / "recipes")
    if (patches := rcp.patches_dir_for(Path(recipes_dir))).is_dir():
        shutil.copytree(patches, stage / "patches")
    _write_pins(receipt.get("pins") or {}, stage / "recipes" / rcp.PINS_FILE)
    _check_recipes(stage, prefix, cache_dir, receipt)

    arts = mirrorlayout.from_receipt(receipt, prefix)
    if ui is not None:
        ui.info(f"collecting {len(arts.files)} files, {len(arts.git)} git sources and "
                f"{len(arts.wheels)} wheels")
    mirrorlayout.fill(arts, stage / "mirror", cache_dir=cache_dir, ui=ui, log=log)
    for name, comp in receipt["components"].items():
        facts = comp.get("facts") or {}
        key, wheel = facts.get("build_fingerprint"), facts.get("wheel")
        if key and wheel:
            if not Path(wheel).is_file():
                raise InstallerError(f"the {name} wheel {wheel} is no longer in the cache",
                                     hint="rebuild it: " + command(prefix, "run", name, "--force"))
            for f in Path(wheel).parent.iterdir():
                mirrorlayout.place(f, stage / "wheels" / name / key / f.name)
    shutil.copy2(prefix / state.RECEIPT, stage / "receipt.json")
    own = _own_wheel(stage / "installer", log)
    if own is None and ui is not None:
        ui.warn("rdna4-install runs from an installed wheel; the bundle carries no copy of it")

    members = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file() or p.is_symlink()):
        if path.is_symlink():
            raise InstallerError(f"{path} is a link; a bundle holds regular files only")
        members[path.relative_to(stage).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"format": FORMAT, "archs": list(receipt.get("archs") or ()),
            "target": str(receipt.get("target") or ""), "installer_version": __version__, "created": state.now(), "source_prefix": str(prefix),
            "compression": compression(), "installer_wheel": own.name if own else "", "members": members}


def _write(stage: Path, manifest: dict[str, Any], out: str) -> None:
    target = None if out == "-" else Path(out)
    tmp = None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    raw = sys.stdout.buffer if tmp is None else open(tmp, "wb")
    try:
        with _compressor(raw) as z, tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _add(tf, MANIFEST, len(data), 0o644, _BytesReader(data))
            for rel in manifest["members"]:
                path = stage / rel
                st = path.stat()
                with open(path, "rb") as f:
                    _add(tf, rel, st.st_size, 0o755 if st.st_mode & 0o111 else 0o644, f)
        if tmp is not None:
            raw.close()
            os.replace(tmp, target)  # type: ignore[arg-type]
        else:
            raw.flush()
    except BaseException:
        if tmp is not None:
            raw.close()
            tmp.unlink(missing_ok=True)
        raise


class _BytesReader:
    def __init__(self, data: bytes):
        import io

        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)


def _add(tf: tarfile.TarFile, name: str, size: int, mode: int, fileobj: Any) -> None:
    # always a regular file with neutral owner and time: the bundle depends only on content
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    tf.addfile(info, fileobj)


# --- installing from a bundle ----------------------------------------------------------

def staging_dir(cache_dir: Path, prefix: Path) -> Path:
    """Where a bundle for `prefix` is unpacked (one per target prefix; removed when done)."""
    return Path(cache_dir) / "bundles" / hashlib.sha256(str(prefix).encode()).hexdigest()[:16]


def _refuse(name: str, why: str) -> InstallerError:
    return InstallerError(f"bundle {name}: {why}; nothing was installed", hint=DAMAGED_HINT)


def _verifier(name: str, archs: tuple[str, ...]):
    def verify(root: Path) -> None:
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            members = manifest["members"]
            built_for = tuple(manifest["archs"])
        except (OSError, ValueError, KeyError, TypeError):
            raise _refuse(name, f"no readable {MANIFEST}") from None
        if manifest.get("format") != FORMAT:
            raise InstallerError(f"bundle {name} has format {manifest.get('format')!r}; this rdna4-install "
                                 f"reads format {FORMAT}",
                                 hint="install it with the rdna4-install version that made it "
                                      "(its wheel is inside the bundle, under installer/)")
        seen = set()
        for dirpath, dirs, files in os.walk(root):
            for entry in dirs + files:
                path = Path(dirpath) / entry
                rel = path.relative_to(root).as_posix()
                if path.is_symlink():
                    raise _refuse(name, f"member {rel} is a link")
                if entry in dirs or rel == MANIFEST:
                    continue
                want = members.get(rel)
                if want is None:
                    raise _refuse(name, f"member {rel} is not in the manifest")
                if path.stat().st_size != want.get("size") or sha256_file(path) != want.get("sha256"):
                    raise _refuse(name, f"member {rel} does not match its sha256 in the manifest")
                seen.add(rel)
        missing = sorted(set(members) - seen)
        if missing:
            raise _refuse(name, f"{len(missing)} member(s) missing, e.g. {missing[0]}")
        if set(built_for) != set(archs):
            what = f"target {manifest['target']} (" if manifest.get("target") else ""
            raise InstallerError(f"bundle {name} was built for {what}{','.join(built_for)}"
                                 f"{')' if what else ''}, but this install targets {','.join(archs)}; "
                                 "nothing was installed",
                                 hint="install it on a machine with those GPUs, or say that is intended: "
                                      f"--gpu-arch {','.join(built_for)}")
    return verify


def unpack(source: str, *, cache_dir: Path, prefix: Path, archs: tuple[str, ...], ui: Any) -> Path:
    """Unpack and verify the bundle `source` ("-" = stdin); nothing is placed unless every
    member matches the manifest and the bundle's archs are `archs`. Returns its folder."""
    from .unpack import CorruptArchive, extract_stream

    name = "on stdin" if source == "-" else str(source)
    dest = staging_dir(cache_dir, prefix)
    if ui is not None:
        ui.info(f"reading the bundle {name}")
    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read the bundle {source}: {exc.strerror or exc}",
                         hint="pass the file `rdna4-install bundle -o FILE` wrote, or - for stdin") from None
    try:
        reader = _decompressor(stream, name)
        extract_stream(reader, dest, verify=_verifier(name, archs), what=f"bundle {name}")
    except CorruptArchive:
        raise _refuse(name, "damaged or truncated") from None
    except _decode_errors() as exc:
        raise _refuse(name, f"damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return dest


@contextlib.contextmanager
def installing(staged: Path, cache_dir: Path) -> Iterator[None]:
    """Seed the wheel cache from the unpacked bundle and read every URL from its mirror,
    locally only, for the install inside; then drop the unpacked copy (its files are in
    the caches and the prefix by then, and a rerun reads the bundle again anyway)."""
    from . import wheelcache

    try:
        for wheel in sorted((staged / "wheels").glob("*/*/*.whl")):
            slot = wheel.parent
            meta = json.loads((slot / "build.json").read_text()) if (slot / "build.json").is_file() else {}
            wheelcache.store(cache_dir, slot.parent.name, slot.name, wheel, meta)
        mirror.use(mirror.load(staged / "mirror" / mirror.MIRROR_FILE, local_only=True))
        yield
    finally:
        mirror.use(None)
        shutil.rmtree(staged, ignore_errors=True)


def describe(manifest: dict[str, Any], out: str, seconds: float) -> str:
    size = Path(out).stat().st_size if out != "-" else sum(m["size"] for m in manifest["members"].values())
    return (f"bundle {out}: {len(manifest['members'])} members, {size / 1e6:.1f} MB "
            f"({manifest['compression']}), for {','.join(manifest['archs'])}, in {seconds:.0f} s")

