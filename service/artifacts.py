"""Read-only access to one job's artifacts (local folder or any fsspec URL): paged listings, path checks and the
streamed zip of the whole set.

A requested path is relative to the job's prefix and must name a file the listing shows: no
absolute paths, no `.`/`..` segments, no backslashes, percent signs or control characters (the
URL was already decoded once; a second encoding is refused, not decoded), and for local folders
the real path (symlinks resolved) must stay inside the prefix.

What a user sees is the distilled set, not the run's bookkeeping: `state/` (tens of thousands of resume
records on a large job) is never listed, downloaded or archived. A 1000-class IPC-50 job has 50 000 images, so
a listing is never a walk of everything: once the job has written `manifest.json` (every image and its size) the
images come from the manifest (parsed once per version, kept in a small LRU) and only the top level and its small
folders (teacher/) are listed; while the job runs, the listing walks only the folder the prefix selects, lazily
and in path order, so a page costs what it shows.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import logging
import mimetypes
import os
import posixpath
import re
import stat
import struct
import tempfile
import threading
import time
import zlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

UNSAFE = re.compile(r"[\\%\x00-\x1f\x7f]")
STATE = "state/"  # the run's resume bookkeeping (scdd/layout.py): never a user's artifact
MANIFEST = "manifest.json"
IMAGES = "images/"
ARCHIVED_FILES = frozenset({MANIFEST, "report.json", "grid.png"})
ARCHIVED_FOLDERS = (IMAGES, "teacher/")

Entry = tuple[str, int]  # (path, bytes); a key ending in "/" is a folder (size -1) in one-level listings
Since = Callable[[str], Iterator[Entry]]  # the entries whose keys are >= a start key, in key order


class UnsafePath(ValueError):
    pass


class BadCursor(ValueError):
    pass


def check_relative(path: str) -> str:
    if not path or len(path) > 1024 or path.startswith("/") or UNSAFE.search(path):
        raise UnsafePath(path)
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(path)
    return path


def check_prefix(prefix: str) -> str:
    """A listing prefix is a path (checked as one) that may end in "/" or stop inside a name ("images/3" also
    selects images/30/); "" selects everything."""
    if prefix:
        check_relative(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def hidden(path: str) -> bool:
    return path.startswith(STATE)


def archived(path: str) -> bool:
    """What the zip of a job holds: the distilled set, its manifest, report, preview and teacher."""
    return path in ARCHIVED_FILES or path.startswith(ARCHIVED_FOLDERS)


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor(cursor) from None


def after(key: str) -> str:
    """The smallest key that sorts after `key` and, for a folder ("images/3/"), after everything in it: "/" is
    followed by "0" in code point order, so every path under images/3/ sorts before images/30."""
    return f"{key[:-1]}0" if key.endswith("/") else f"{key}\x00"


class Sorted:
    """Entries in key order, searched by bisection: a page starts in O(log n) however deep it is."""

    def __init__(self, entries: dict[str, int]):
        self.paths = sorted(entries)
        self.sizes = array("q", (entries[path] for path in self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def since(self, start: str) -> Iterator[Entry]:
        paths, sizes = self.paths, self.sizes
        for i in range(bisect_left(paths, start), len(paths)):
            yield paths[i], sizes[i]


@dataclass
class Page:
    files: list[Entry] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    next_cursor: Optional[str] = None


def paginate(since: Since, prefix: str = "", cursor: Optional[str] = None, limit: int = 1000,
             delimiter: bool = False) -> Page:
    """One page of the entries under `prefix` after `cursor`. With `delimiter`, what lies in a sub-folder of the
    prefix is shown once, as that folder (S3's CommonPrefixes), and the walk jumps past it."""
    start = max(prefix, after(decode_cursor(cursor))) if cursor else prefix
    page, last, items = Page(), "", since(start)
    while True:
        entry = next(items, None)
        if entry is None or not entry[0].startswith(prefix):
            return page
        key, size = entry
        if hidden(key):
            items = since(after(STATE))
            continue
        if len(page.files) + len(page.folders) == limit:
            page.next_cursor = encode_cursor(last)
            return page
        cut = key.find("/", len(prefix)) if delimiter else -1
        if cut >= 0:
            last = key[:cut + 1]
            page.folders.append(last)
            items = since(after(last))
        else:
            last = key
            page.files.append(entry)


class _ManifestCache:
    """Parsed manifests (their images as a `Sorted`), by job prefix, for the version (mtime or ETag, size) they
    were read at: paging through 50 000 images parses a 16 MB manifest once, not once per page (a file that is not
    a manifest is remembered as None, not read again). Least recently used out past `size` jobs (each ~100 bytes
    per image); one parse per job at a time, other readers wait for it."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: OrderedDict[str, tuple[object, Optional[Sorted]]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def _hit(self, key: str, version: object) -> Optional[tuple[Optional[Sorted]]]:
        """(the index,) when `key` is cached at `version`, else None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != version:
                return None
            self._entries.move_to_end(key)
            return (found[1],)

    def get(self, key: str, version: object, load: Callable[[], Optional[Sorted]]) -> Optional[Sorted]:
        if hit := self._hit(key, version):
            return hit[0]
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            if hit := self._hit(key, version):
                return hit[0]
            index = load()
            with self._lock:
                self._loading.pop(key, None)
                self._entries[key] = (version, index)
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return index

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


MANIFESTS = _ManifestCache()


def manifest_images(data: bytes) -> Optional[Sorted]:
    """The images a manifest lists (scdd's write_manifest: {"images": [{"path", "bytes", ...}]}), or None when it
    is not one (a half-written or foreign file: the listing then walks the folder). Only plain paths under images/
    are taken: the manifest is the job's own file, and a path out of its folder must not reach a reader."""
    try:
        images = json.loads(data).get("images")
        found = {entry["path"]: int(entry["bytes"]) for entry in images
                 if isinstance(entry.get("path"), str) and entry["path"].startswith(IMAGES)}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return Sorted({path: size for path, size in found.items()
                   if not any(part in ("", ".", "..") for part in path.split("/"))})


def _utf8(name: str) -> bool:
    """File names that cannot be UTF-8 (undecodable bytes as surrogates) cannot be put in JSON or a zip."""
    try:
        name.encode()
        return True
    except UnicodeEncodeError:
        return False


class JobArtifacts:
    def __init__(self, prefix_url: str):
        self.url = prefix_url
        self.fs, self.root = fsspec.core.url_to_fs(prefix_url)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def _fresh(self, path: str) -> None:
        """Forget the object store's cached listings of `path` and its parents: fsspec hands every request the same
        cached filesystem, and a listing cached before the job wrote report.json would hide it until restart."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    # -- listings --------------------------------------------------------------------------------------
    def source(self, prefix: str = "", delimiter: bool = False) -> Since:
        """Where a listing of `prefix` reads: the manifest (+ the top level) once written, else the folder."""
        images = self.manifest()
        if images is not None:
            extras = self._extras()
            return lambda start: heapq.merge(images.since(start), extras.since(start))
        base = prefix[:prefix.rfind("/") + 1]  # the folder holding what the prefix selects
        if self.local:
            return Sorted(dict(self._scan(base))).since if delimiter else lambda start: self._walk(base, start)
        return Sorted(dict(self._ls(base) if delimiter else self._find(base))).since

    def page(self, prefix: str = "", cursor: Optional[str] = None, limit: int = 1000, delimiter: bool = False) -> Page:
        return paginate(self.source(prefix, delimiter), prefix, cursor, limit, delimiter)

    def list(self) -> list[Entry]:
        """Every file (state/ aside): for small jobs and tests; the API pages with `page`."""
        return [entry for entry in self.source()("") if not hidden(entry[0])]

    def manifest(self) -> Optional[Sorted]:
        """The manifest's images, from the cache while the file is unchanged; None before the job wrote it."""
        full = self._full(MANIFEST)
        try:
            if self.local:
                info = os.stat(full)
                version: object = (info.st_mtime_ns, info.st_size)
            else:
                self._fresh(full)
                info = self.fs.info(full)
                version = (info.get("ETag") or info.get("mtime") or info.get("LastModified"), info.get("size"))
        except (FileNotFoundError, NotADirectoryError):
            return None

        def load() -> Optional[Sorted]:
            images = manifest_images(self.fs.cat_file(full))
            if images is None:
                log.warning("%s is not a manifest of images; listing the folder instead", full)
            return images

        return MANIFESTS.get(self.url, version, load)

    def _extras(self) -> Sorted:
        """What the manifest does not list: the top-level files and the small folders beside images/ (teacher/)."""
        found: dict[str, int] = {}
        for key, size in (self._scan("") if self.local else self._ls("")):
            if key in (IMAGES, STATE):
                continue
            if key.endswith("/"):
                found.update(self._walk(key, "") if self.local else self._find(key))
            else:
                found[key] = size
        return Sorted(found)

    def _scan(self, base: str) -> Iterator[Entry]:
        """One level of local folder `base` ("" or ending in "/"): files with sizes, sub-folders as "name/" (-1).
        Symlinks are skipped (the job writes none; one could point out of its folder)."""
        try:
            scanner = os.scandir(self._full(base) or "/")
        except (FileNotFoundError, NotADirectoryError):
            return
        with scanner:
            for item in scanner:
                if not _utf8(item.name) or item.is_symlink():
                    continue
                if item.is_dir(follow_symlinks=False):
                    if f"{base}{item.name}/" != STATE:
                        yield f"{base}{item.name}/", -1
                elif item.is_file(follow_symlinks=False):
                    try:
                        yield f"{base}{item.name}", item.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue

    def _walk(self, base: str, start: str) -> Iterator[Entry]:
        """The files under local folder `base`, lazily and in key order from `start`: folders that sort wholly
        before `start` are not opened, and a page stops the walk once it is full."""
        for key, size in sorted(self._scan(base)):
            if key.endswith("/"):
                if after(key) > start:
                    yield from self._walk(key, start)
            elif key >= start:
                yield key, size

    def _ls(self, base: str) -> Iterator[Entry]:
        """One level of object-store folder `base`, as `_scan`."""
        full = self._full(base)
        self._fresh(full)
        try:
            listed = self.fs.ls(full, detail=True)
        except FileNotFoundError:
            return
        for info in listed:
            name = info["name"].rstrip("/")
            if not name.startswith(f"{self.root}/"):
                continue
            rel = name[len(self.root) + 1:]
            if info.get("type") == "directory":
                if f"{rel}/" != STATE:
                    yield f"{rel}/", -1
            else:
                yield rel, int(info.get("size") or 0)

    def _find(self, base: str) -> Iterator[Entry]:
        """Every file under object-store folder `base`; from the top, folder by folder, so state/ is not listed."""
        if not base:
            for key, size in self._ls(""):
                if key.endswith("/"):
                    yield from self._find(key)
                else:
                    yield key, size
            return
        full = self._full(base)
        self._fresh(full)
        try:
            found = self.fs.find(full, detail=True)
        except FileNotFoundError:
            return
        for name, info in found.items():
            rel = posixpath.relpath(name, self.root)
            if info.get("type") == "file" and not rel.startswith("..") and not hidden(rel):
                yield rel, int(info.get("size") or 0)

    # -- one file --------------------------------------------------------------------------------------
    def locate(self, rel: str) -> str | None:
        """The full path of file `rel`, or None when there is no such file inside the prefix (state/ is not one)."""
        full = f"{self.root}/{check_relative(rel)}"
        if hidden(rel):
            return None
        if self.local:
            real, root = os.path.realpath(full), os.path.realpath(self.root)
            if not real.startswith(root + os.sep) or not os.path.isfile(real):
                return None
            return real
        self._fresh(full)
        return full if self.fs.isfile(full) else None

    def stream(self, full: str, chunk: int = 1 << 16) -> Iterator[bytes]:
        with self.fs.open(full, "rb") as handle:
            while block := handle.read(chunk):
                yield block

    def size(self, full: str) -> int:
        return int(self.fs.size(full))

    @staticmethod
    def media_type(rel: str) -> str:
        return mimetypes.guess_type(rel)[0] or "application/octet-stream"

    # -- the archive -----------------------------------------------------------------------------------
    def archive_entries(self) -> Iterator[Entry]:
        """The files the zip holds, lazily in path order (nothing is collected: memory does not follow the count)."""
        return (entry for entry in self.source()("") if archived(entry[0]))

    def reader(self) -> "Reader":
        return LocalReader(self.root) if self.local else StoreReader(self.fs, self.root)


class LocalReader:
    """Opens listed local files for the zip: the folder's real path is checked once per folder (the listing is in
    path order), the file itself opened without following a symlink (then fstat: a regular file?); no path stat
    or exists call per file."""

    CHUNK = 1 << 16  # a read allocates its whole size first, whatever the file's

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._folder: tuple[Optional[str], Optional[str]] = (None, None)  # (the last folder, its real path if inside)

    def _real_folder(self, rel: str) -> Optional[str]:
        folder = posixpath.dirname(rel)
        if self._folder[0] != folder:
            real = os.path.realpath(os.path.join(self.root, folder))
            inside = real == self.root or real.startswith(self.root + os.sep)
            self._folder = (folder, real if inside else None)
        return self._folder[1]

    def open(self, rel: str, size: int) -> Optional[Iterator[bytes]]:
        """The file's bytes as chunks, or None when it is not a regular file inside the job's folder (now)."""
        folder = self._real_folder(rel)
        if folder is None:
            return None
        try:
            fd = os.open(os.path.join(folder, posixpath.basename(rel)), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone, or a symlink
            return None
        handle = os.fdopen(fd, "rb", buffering=0)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            handle.close()
            return None
        return self._chunks(handle)

    def _chunks(self, handle) -> Iterator[bytes]:
        with handle:
            while block := handle.read(self.CHUNK):
                yield block


class StoreReader:
    """Reads listed object-store files for the zip with the size the listing gave: one GET per file (ranged GETs
    of 8 MB for larger ones, e.g. a teacher checkpoint), no HEAD or exists call."""

    CHUNK = 8 << 20

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def open(self, rel: str, size: int) -> Optional[Iterator[bytes]]:
        full = f"{self.root}/{rel}"
        try:
            first = self.fs.cat_file(full) if size <= self.CHUNK else self.fs.cat_file(full, start=0, end=self.CHUNK)
        except FileNotFoundError:
            return None
        return chain([first], self._rest(full, size)) if size > self.CHUNK else iter([first])

    def _rest(self, full: str, size: int) -> Iterator[bytes]:
        for offset in range(self.CHUNK, size, self.CHUNK):
            yield self.fs.cat_file(full, start=offset, end=min(offset + self.CHUNK, size))  # (s3fs: by keyword)


Reader = LocalReader | StoreReader


# -- the zip format ----------------------------------------------------------------------------------------
ZIP64_LIMIT = 0xFFFFFFFF
COUNT_LIMIT = 0xFFFF
FLAGS = 0x08 | 0x800  # sizes and CRC in a data descriptor after the data; names are UTF-8


def _dos_time(when: float) -> tuple[int, int]:
    t = time.localtime(when)
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return clock, ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


class ZipWriter:
    """A zip written front to back while it is sent: each entry STORED (images are PNGs already; deflate would
    cost CPU for nothing) with a local header, its bytes and a data descriptor (CRC and size, known only after
    the bytes), ZIP64 fields where a size, an offset or the count needs them. The central directory records go to
    a spooled temporary file (in memory up to 1 MB, on disk above) and are streamed at the end, so memory does not
    grow with the number of entries."""

    def __init__(self, when: Optional[float] = None, spool_bytes: int = 1 << 20):
        self.offset = 0
        self.count = 0
        self.central = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        self.time, self.date = _dos_time(time.time() if when is None else when)

    def _out(self, data: bytes) -> bytes:
        self.offset += len(data)
        return data

    def entry(self, name: str, chunks: Iterable[bytes], size_hint: int = 0) -> Iterator[bytes]:
        """The entry's bytes. A ZIP64 local header is written when the listed size needs it (the descriptor then
        carries 8-byte sizes); a file that grew past 4 GiB since it was listed aborts the archive."""
        encoded, start = name.encode(), self.offset
        zip64 = size_hint >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if zip64 else b""
        sizes = ZIP64_LIMIT if zip64 else 0
        yield self._out(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, FLAGS, 0, self.time,
                                    self.date, 0, sizes, sizes, len(encoded), len(extra)) + encoded + extra)
        crc = size = 0
        for chunk in chunks:
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
            yield self._out(chunk)
        if size >= ZIP64_LIMIT and not zip64:
            raise ValueError(f"{name} grew past 4 GiB while it was archived")
        yield self._out(struct.pack("<IIQQ" if zip64 else "<IIII", 0x08074B50, crc, size, size))
        self._record(encoded, crc, size, start)
        self.count += 1

    def _record(self, name: bytes, crc: int, size: int, offset: int) -> None:
        big = [value for value in (size, size, offset) if value >= ZIP64_LIMIT]
        extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
        self.central.write(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45 if big else 20, FLAGS, 0, self.time, self.date, crc,
            min(size, ZIP64_LIMIT), min(size, ZIP64_LIMIT), len(name), len(extra), 0, 0, 0, 0o100644 << 16,
            min(offset, ZIP64_LIMIT)) + name + extra)

    def finish(self) -> Iterator[bytes]:
        """The central directory, then its end records (ZIP64 ones past 65 534 entries or 4 GiB)."""
        start, size = self.offset, self.central.tell()
        self.central.seek(0)
        while block := self.central.read(1 << 16):
            yield self._out(block)
        self.central.close()
        if self.count >= COUNT_LIMIT or size >= ZIP64_LIMIT or start >= ZIP64_LIMIT:
            end64 = self.offset
            yield self._out(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, self.count, self.count, size,
                                        start))
            yield self._out(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
        yield self._out(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(self.count, COUNT_LIMIT),
                                    min(self.count, COUNT_LIMIT), min(size, ZIP64_LIMIT), min(start, ZIP64_LIMIT), 0))


SKIPPED_SHOWN = 1000  # SKIPPED.txt names at most this many files (then a count): it stays short


def _skipped_text(skipped: list[str], more: int) -> bytes:
    lines = ["Files of this job that are not in this archive:", *skipped]
    if more:
        lines.append(f"... and {more} more")
    return ("\n".join(lines) + "\n").encode()


def coalesce(pieces: Iterable[bytes], size: int = 1 << 16) -> Generator[bytes, None, None]:
    """Pieces joined into chunks of at least `size` bytes (a few header bytes per yield would cost a thread hop
    each in the server); never an empty chunk (that would end a chunked answer early)."""
    buffer = bytearray()
    for piece in pieces:
        if len(piece) >= size:  # a file's chunk: sent as it is, after what was waiting
            if buffer:
                yield bytes(buffer)
                buffer.clear()
            yield piece
            continue
        buffer += piece
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def zip_pieces(reader: Reader, entries: Iterable[Entry], folder: str, when: Optional[float] = None) -> Iterator[bytes]:
    """The zip of `entries` (every name under `folder`/). Whether a file goes in is decided before its header is
    sent: a name the API's path check refuses (a class folder with % or \\) or a file gone since the listing is left
    out and named in SKIPPED.txt at the end, so a half-sent archive never breaks on one file."""
    writer = ZipWriter(when)
    try:
        yield from _zip_entries(writer, reader, entries, folder)
    finally:  # also when the download stops half-way: the spooled central directory is deleted now
        writer.central.close()


def _zip_entries(writer: ZipWriter, reader: Reader, entries: Iterable[Entry], folder: str) -> Iterator[bytes]:
    skipped, more = [], 0
    for rel, size in entries:
        try:
            chunks = reader.open(check_relative(rel), size)
            why = "gone since the listing, or not a regular file" if chunks is None else ""
        except UnsafePath:
            chunks, why = None, "its name has a character the API refuses (% \\ or a control character)"
        if chunks is None:
            if len(skipped) < SKIPPED_SHOWN:
                skipped.append(f"{rel!r}: {why}")
            else:
                more += 1
            continue
        yield from writer.entry(f"{folder}/{rel}", chunks, size)
    if skipped:
        yield from writer.entry(f"{folder}/SKIPPED.txt", [_skipped_text(skipped, more)])
    yield from writer.finish()


def zip_stream(artifacts: JobArtifacts, entries: Iterable[Entry], folder: str) -> Generator[bytes, None, None]:
    """The job's archive as sent: `zip_pieces` in chunks of 64 KB or more."""
    return coalesce(zip_pieces(artifacts.reader(), entries, folder))
