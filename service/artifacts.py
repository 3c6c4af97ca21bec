"""Read-only access to one job's artifacts (local folder or any fsspec URL), with path checks.

A requested path is relative to the job's prefix and must name a file the listing shows: no
absolute paths, no `.`/`..` segments, no backslashes, percent signs or control characters (the
URL was already decoded once; a second encoding is refused, not decoded), and for local folders
the real path (symlinks resolved) must stay inside the prefix.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
import re
import zipfile
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

UNSAFE = re.compile(r"[\\%\x00-\x1f\x7f]")


class UnsafePath(ValueError):
    pass


def check_relative(path: str) -> str:
    if not path or len(path) > 1024 or path.startswith("/") or UNSAFE.search(path):
        raise UnsafePath(path)
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(path)
    return path


class JobArtifacts:
    def __init__(self, prefix_url: str):
        self.fs, self.root = fsspec.core.url_to_fs(prefix_url)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def _fresh(self, path: str) -> None:
        """Forget the object store's cached listings of `path` and its parents: fsspec hands every request the same
        cached filesystem, and a listing cached before the job wrote report.json would hide it until restart."""
        if not self.local:
            self.fs.invalidate_cache(path)

    def list(self) -> list[tuple[str, int]]:
        self._fresh(self.root)
        if not self.fs.exists(self.root):
            return []
        found = self.fs.find(self.root, detail=True)
        files = []
        for full, info in sorted(found.items()):
            rel = posixpath.relpath(full, self.root)
            if info.get("type") == "file" and not rel.startswith(".."):
                files.append((rel, int(info.get("size") or 0)))
        return files

    def locate(self, rel: str) -> str | None:
        """The full path of file `rel`, or None when there is no such file inside the prefix."""
        full = f"{self.root}/{check_relative(rel)}"
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


class _Chunks:
    """A write-only, unseekable file whose writes are collected until `take` (zipfile then writes data descriptors)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def zip_stream(artifacts: JobArtifacts, files: list[tuple[str, int]], folder: str) -> Iterator[bytes]:
    """The job's `files` as one zip archive (every entry under `folder`/), made while it is sent: memory stays at
    one chunk of one file, whatever the size of the set."""
    out = _Chunks()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for rel, _size in files:
            full = artifacts.locate(rel)
            if full is None:  # gone since the listing, or a symlink out of the job's folder
                continue
            with archive.open(f"{folder}/{rel}", "w", force_zip64=True) as entry:
                for block in artifacts.stream(full):
                    entry.write(block)
                    if chunk := out.take():  # (an empty chunk would end a chunked answer early)
                        yield chunk
            if chunk := out.take():
                yield chunk
    yield out.take()  # the central directory
