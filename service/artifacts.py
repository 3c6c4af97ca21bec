"""Read-only access to one job's artifacts (local folder or any fsspec URL): paged listings and path checks (the
streamed zip of the set is service/archive.py).

A requested path is relative to the job's prefix and must name a file the listing shows: no
absolute paths, no `.`/`..` segments, no backslashes, percent signs or control characters (the
URL was already decoded once; a second encoding is refused, not decoded), and for local folders
the real path (symlinks resolved) must stay inside the prefix. A listing leaves out what this check refuses
(`servable`), so everything it shows can be downloaded; scdd stores a class whose name has such a character under
a safe folder name (scdd/layout.py class_folders), so only older outputs or foreign files hold one.

What a user sees is the distilled set, not the run's bookkeeping: `state/` (tens of thousands of resume
records on a large job) is never listed, downloaded or archived. A 1000-class IPC-50 job has 50 000 images, so
a listing is never a walk of everything. A local folder is walked lazily and in path order from the page's
start, so a page costs what it shows. On an object store, where a LIST answers 1000 keys at a time, once the
job has written `manifest.json` (every image and its size) the images come from the manifest (parsed once per
version, kept in a small LRU) and only the top level and its small folders (teacher/) are listed; while the job
runs, the listing reads only the folder the prefix selects.
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
import threading
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


def servable(path: str) -> bool:
    """Whether the single-file route serves `path` as far as its name goes (for a folder key ending in "/", whether a
    listing prefix may name it). A listing shows only such paths, so it never shows a file the route refuses (a
    class folder with % or \\ written before scdd stored such classes under safe folder names, a foreign file)."""
    try:
        check_relative(path[:-1] if path.endswith("/") else path)
    except UnsafePath:
        return False
    return True


def within(real: str, root: str) -> bool:
    """Whether resolved path `real` is folder `root` or lies below it (the one containment check of the service:
    artifact reads, the zip's folders, admission's data roots)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


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
        if not servable(key):  # the single-file route would refuse it: not listed (nor a folder of such names)
            cut = key.find("/", len(prefix)) if delimiter else -1
            if cut >= 0 and not servable(key[:cut]):
                items = since(after(key[:cut + 1]))
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
        """Where a listing of `prefix` reads. A local folder: itself, walked lazily (a page opens the few class
        folders it shows, ~10 ms, where parsing a 50 000-image manifest costs the first page ~0.7 s). An object
        store: the manifest (+ the top level) once written, one GET instead of a LIST per 1000 keys; else the
        folder."""
        images = None if self.local else self.manifest()
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
        """Every file a listing shows (state/ and names the API refuses aside): for small jobs and tests; the API
        pages with `page`."""
        return [entry for entry in self.source()("") if not hidden(entry[0]) and servable(entry[0])]

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
            if not within(real, root) or not os.path.isfile(real):
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
        """The files the zip holds, lazily in path order (nothing is collected: memory does not follow the count).
        Names the API refuses are among them: the archive route checks every one before it answers
        (service/archive.py plan_archive)."""
        return (entry for entry in self.source()("") if archived(entry[0]))
