"""The artifact store: files under one URL prefix, through fsspec (a local folder, s3://, ...).

Writes are atomic on local disks (write to a temporary name, then rename), and object stores
write whole objects, so a reader never sees half a file.

A store pickles as its URL and storage options (never a live connection), so a Ray worker gets an
equal store that opens its own. On object stores the listing cache is dropped before every
`list`/`exists`, so files other processes wrote are seen.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fsspec

from scdd.errors import DataError

if TYPE_CHECKING:
    from api_schema.spec import OutputSpec, S3Spec

S3_PROTOCOLS = ("s3", "s3a")
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or a profile (AWS_PROFILE or "
    "output.s3.profile), in the environment of every process that writes"
)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


class ArtifactStore:
    def __init__(self, url: str, **storage_options: Any):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except ImportError as exc:
            raise DataError(
                f"artifact store {self.url} needs the fsspec backend for {_protocol(self.url)}:// ({exc}); "
                f"install it (s3://: pip install s3fs)"
            ) from None
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __reduce__(self):
        return _reopen, (type(self), self.url, self.storage_options)

    def reopen(self) -> ArtifactStore:
        """An equal store with its own connection (what a pickled copy gets)."""
        return _reopen(type(self), self.url, self.storage_options)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (other.url, other.storage_options) == (self.url, self.storage_options)

    def __hash__(self) -> int:
        return hash((type(self), self.url, json.dumps(self.storage_options, sort_keys=True, default=str)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _abs(self, rel: str) -> str:
        rel = rel.strip("/")
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise ValueError(f"path {rel!r} leaves the store")
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.url}/{rel}" if rel else self.url

    @contextmanager
    def _named_errors(self, action: str, rel: str, missing_ok: bool = False) -> Iterator[None]:
        """Object-store failures (missing bucket, credentials, endpoint) as a DataError naming the URL
        and the fix, instead of a botocore traceback. Local stores raise what the OS raises."""
        if self._local:
            yield
            return
        try:
            yield
        except DataError:
            raise
        except FileNotFoundError as exc:
            if missing_ok:
                raise
            raise DataError(
                f"cannot {action} {self.url_of(rel)}: {exc}; the bucket of {self.url} must exist "
                f"(create it, or fix the URL) and be visible with these credentials"
            ) from None
        except PermissionError as exc:
            raise DataError(
                f"cannot {action} {self.url_of(rel)}: access denied ({exc}); check the credentials "
                f"({_CREDENTIALS_HINT}) and the bucket policy"
            ) from None
        except Exception as exc:  # botocore's errors share no base class with OSError
            kind = type(exc).__name__
            if kind in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
                raise DataError(f"cannot {action} {self.url_of(rel)}: {exc}; {_CREDENTIALS_HINT}") from None
            if kind in ("EndpointConnectionError", "ConnectTimeoutError", "InvalidEndpointURL", "ConnectionError") \
                    or isinstance(exc, OSError):
                raise DataError(
                    f"cannot {action} {self.url_of(rel)}: {exc}; check the endpoint "
                    f"(output.s3.endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the bucket name"
                ) from None
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        if self._local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            with self._named_errors("write", rel):
                self.fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        with self._named_errors("read", rel, missing_ok=True):
            return self.fs.cat_file(self._abs(rel))

    def exists(self, rel: str) -> bool:
        path = self._abs(rel)
        if self._local:
            return self.fs.exists(path)
        with self._named_errors("check", rel):
            self.fs.invalidate_cache()
            return self.fs.exists(path)

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all files under `prefix`, sorted ([] when there are none)."""
        base = self._abs(prefix)
        root = self.root.rstrip("/") + "/"
        if self._local:
            if not self.fs.exists(base):
                return []
            found = self.fs.find(base)
        else:
            # Object stores have no folders: an empty prefix does not "exist", and find() on it
            # returns []; a missing bucket raises (named by _named_errors).
            with self._named_errors("list", prefix):
                self.fs.invalidate_cache()
                found = [p for p in self.fs.find(base) if not p.endswith("/")]
        return sorted(p.removeprefix(root) for p in found)

    def check_writable(self) -> None:
        """Fail early, with the URL and the fix, when an object store's bucket is missing or unreachable
        (a no-op for local stores, whose folders are made on first write)."""
        if self._local:
            return
        bucket = self.root.split("/", 1)[0]
        with self._named_errors("open", ""):
            self.fs.invalidate_cache()
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise DataError(
                    f"bucket {bucket!r} of {self.url} does not exist at this endpoint (or these credentials cannot "
                    f"see it); create it, or fix the URL or the endpoint (output.s3.endpoint_url, AWS_ENDPOINT_URL)"
                ) from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))


def _reopen(cls: type[ArtifactStore], url: str, storage_options: dict[str, Any]) -> ArtifactStore:
    return cls(url, **storage_options)


def s3_storage_options(s3: S3Spec | None) -> dict[str, Any]:
    """s3fs options from the spec's s3 section. Credentials are left to botocore's environment chain,
    and so are the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and region (AWS_DEFAULT_REGION)
    when the spec leaves them out, so a pickled store carries no secrets."""
    # A fresh S3FileSystem per store: fsspec's instance cache would otherwise hand a later job a
    # client (and listing cache) built under an earlier environment.
    options: dict[str, Any] = {"skip_instance_cache": True}
    if s3 is None:
        return options
    if s3.endpoint_url:
        options["endpoint_url"] = s3.endpoint_url
    if s3.region:
        options["client_kwargs"] = {"region_name": s3.region}
    if s3.profile:
        options["profile"] = s3.profile
    return options


def open_store(output: OutputSpec, url: str | None = None) -> ArtifactStore:
    """The artifact store at `url` (default `output.url`), with `output.s3` applied to s3:// URLs.

    For an object store the bucket is checked at once, so a wrong URL, a missing bucket or missing
    credentials fail here with a DataError naming the URL and the fix.
    """
    url = url or output.url
    if not url:
        raise DataError("no output URL given; set output.url (--out)")
    protocol = _protocol(url)
    if protocol not in S3_PROTOCOLS:
        return ArtifactStore(url)
    if not urlsplit(url).netloc:
        raise DataError(f"output URL {url} names no bucket; write it as {protocol}://<bucket>/<prefix>")
    store = ArtifactStore(url, **s3_storage_options(output.s3))
    store.check_writable()
    return store


def read_url(url: str) -> bytes:
    """Read a whole file given by local path or fsspec URL."""
    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"file {url} does not exist; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{url} is a folder, expected a file") from None
