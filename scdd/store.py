"""The artifact store: files under one URL prefix, through fsspec (a local folder, s3://, ...).

Writes are atomic on local disks (write to a temporary name, then rename), and object stores
write whole objects, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec

from scdd.errors import DataError


class ArtifactStore:
    def __init__(self, url: str, **storage_options: Any):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _abs(self, rel: str) -> str:
        rel = rel.strip("/")
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise ValueError(f"path {rel!r} leaves the store")
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel.strip('/')}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        if self._local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._abs(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._abs(rel))

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all files under `prefix`, sorted."""
        base = self._abs(prefix)
        if not self.fs.exists(base):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in self.fs.find(base))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))


def read_url(url: str) -> bytes:
    """Read a whole file given by local path or fsspec URL."""
    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"file {url} does not exist; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{url} is a folder, expected a file") from None
