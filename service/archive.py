"""The streamed zip of a job's artifacts: what the archive route sends, made while it is sent.

Before it answers, the route walks the listing once (`plan_archive`): the file count (at most
SCDD_MAX_ARCHIVE_FILES), the bytes (counted against the tenant's SCDD_ARCHIVE_BYTES_PER_HOUR) and every name,
so a name the API cannot serve is refused with a clear error instead of being found after a 200 was sent.

Entries are STORED (the images are PNGs), each with a data descriptor; the central directory spools to a
temporary file, so memory does not follow the number of files. Files are read with the sizes the listing gave
(service/artifacts.py): no exists/HEAD call per file.
"""

from __future__ import annotations

import os
import posixpath
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

from service.artifacts import Entry, JobArtifacts, UnsafePath, check_relative, servable, within


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
            inside = within(real, self.root)
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


# -- before the answer: what the zip will hold ----------------------------------------------------------------
REFUSED_SHOWN = 3  # names of refused files an error message quotes


@dataclass
class ArchivePlan:
    """What one walk of the listing found: the files the zip would hold and their bytes; the names the API refuses
    (the first few, and how many); whether there are more files than the bound (the walk stops there)."""

    files: int = 0
    bytes: int = 0
    refused: list[str] = field(default_factory=list)
    refused_count: int = 0
    over: bool = False


def plan_archive(entries: Iterable[Entry], max_files: int) -> ArchivePlan:
    """Walk `entries` once (lazily: nothing is collected), up to the first file past `max_files`."""
    plan = ArchivePlan()
    for rel, size in entries:
        if not servable(rel):
            plan.refused_count += 1
            if len(plan.refused) < REFUSED_SHOWN:
                plan.refused.append(rel)
            continue
        if plan.files == max_files:
            plan.over = True
            break
        plan.files += 1
        plan.bytes += max(size, 0)
    return plan


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


def zip_pieces(reader: Reader, entries: Iterable[Entry], folder: str, when: Optional[float] = None,
               max_files: Optional[int] = None) -> Iterator[bytes]:
    """The zip of `entries` (every name under `folder`/), at most `max_files` of them. Whether a file goes in is
    decided before its header is sent: a file gone since the listing, one past `max_files` (a running job that wrote
    more since the route counted) or a name the API's path check refuses (the route refuses those before it answers;
    this is the check of last resort) is left out and named in SKIPPED.txt at the end, so a half-sent archive never
    breaks on one file."""
    writer = ZipWriter(when)
    try:
        yield from _zip_entries(writer, reader, entries, folder, max_files)
    finally:  # also when the download stops half-way: the spooled central directory is deleted now
        writer.central.close()


def _zip_entries(writer: ZipWriter, reader: Reader, entries: Iterable[Entry], folder: str,
                 max_files: Optional[int] = None) -> Iterator[bytes]:
    skipped, more = [], 0
    for rel, size in entries:
        try:
            if max_files is not None and writer.count >= max_files:
                chunks, why = None, "past the archive's file limit (SCDD_MAX_ARCHIVE_FILES): download it on its own"
            else:
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


def reader_for(artifacts: JobArtifacts) -> Reader:
    return LocalReader(artifacts.root) if artifacts.local else StoreReader(artifacts.fs, artifacts.root)


def zip_stream(artifacts: JobArtifacts, entries: Iterable[Entry], folder: str,
               max_files: Optional[int] = None) -> Generator[bytes, None, None]:
    """The job's archive as sent: `zip_pieces` in chunks of 64 KB or more."""
    return coalesce(zip_pieces(reader_for(artifacts), entries, folder, max_files=max_files))
