"""Access to a job's archive beyond the API key: short-lived signed links, and the per-tenant bounds on downloads
(zips running at once on this process; bytes of zips started per hour, across processes, in Redis).

A browser cannot put an Authorization header on its own downloads, so the console asks for a short-lived link
(`POST .../archive-link`) and lets the browser download to disk from it, instead of holding the zip in memory.
The link's token is an HMAC-SHA256 over (tenant, job id, expiry) with a key every API replica shares: the
setting SCDD_LINK_SECRET, else a random one made once and kept in Redis (SET NX: the first replica wins).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
from collections import Counter

from fastapi import HTTPException, Request

from service.api.streams import Slot

NEW_LINK = "ask for a new one: POST /v1/jobs/{id}/archive-link (the console's Download all does)"


class ArchiveSlots:
    """Zip downloads open per tenant on this API process: each holds a client connection and reads the store for
    as long as the download takes, so one tenant cannot take all of the process's threads and bandwidth."""

    def __init__(self, per_tenant: int):
        self.per_tenant = per_tenant
        self.open: Counter[str] = Counter()
        self._lock = threading.Lock()  # released from the server's worker threads, taken on the event loop

    def take(self, tenant: str) -> Slot:
        with self._lock:
            if self.open[tenant] >= self.per_tenant:
                raise HTTPException(429, f"tenant {tenant!r} has {self.open[tenant]} archive downloads running, its "
                                         "limit (SCDD_MAX_ARCHIVES_PER_TENANT): wait for one to finish",
                                    headers={"Retry-After": "10"})
            self.open[tenant] += 1
        return Slot(self, tenant)

    def _give_back(self, tenant: str) -> None:
        with self._lock:
            self.open[tenant] -= 1
            if self.open[tenant] <= 0:
                del self.open[tenant]


# Bytes of zip downloads a tenant may start: a token bucket (records.TAKE_TOKEN, `Keys.archive_bytes`) of
# SCDD_ARCHIVE_BYTES_PER_HOUR bytes that refills at that many an hour, so at most that many bytes start in one go and,
# on average, per hour; a download costs its bytes, and a refused one takes nothing.


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


async def take_archive_bytes(request: Request, tenant: str, job_id: str, size: int) -> None:
    """Count a zip download of `size` bytes against the tenant's SCDD_ARCHIVE_BYTES_PER_HOUR (in Redis, so every API
    process counts against one bound) as it starts: 429 with Retry-After when the last hour's downloads leave too
    little, 413 when this one alone is more than an hour's allowance (waiting would never help)."""
    limit = request.app.state.settings.archive_bytes_per_hour
    per_file = f"GET /v1/jobs/{job_id}/artifacts/{{path}} (paths from GET /v1/jobs/{job_id}/artifacts)"
    if size > limit:
        raise HTTPException(413, f"the archive of job {job_id} is {_size(size)}, more than a tenant may download as "
                                 f"zips in an hour ({_size(limit)}, SCDD_ARCHIVE_BYTES_PER_HOUR): download its files "
                                 f"one by one with {per_file}, or ask the operator to raise SCDD_ARCHIVE_BYTES_PER_HOUR")
    store = request.app.state.store
    taken, wait = await store.take_tokens(store.keys.archive_bytes(tenant), limit / 3600, limit, size)
    if not taken:
        raise HTTPException(429, f"tenant {tenant!r} has used its allowance of zip downloads ({_size(limit)} an hour, "
                                 f"SCDD_ARCHIVE_BYTES_PER_HOUR): this archive ({_size(size)}) fits in it again in "
                                 f"{int(wait)} s; retry then, or download single files with {per_file}",
                            headers={"Retry-After": str(int(wait))})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_link(secret: bytes, tenant: str, job_id: str, expires: int) -> str:
    """`<payload>.<mac>`: the payload (tenant, expiry) travels in the token, the job id is the URL's."""
    payload = _b64(json.dumps([tenant, expires]).encode())
    mac = hmac.new(secret, f"{tenant}\n{job_id}\n{expires}".encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def verify_link(secret: bytes, token: str, job_id: str, now: float) -> str:
    """The tenant a token was made for, or 401 saying to ask for a new link (forged, for another job, expired: the
    request then carries no valid credentials, as with a wrong API key)."""
    try:
        payload, mac = token.split(".")
        tenant, expires = json.loads(_unb64(payload))
        want = hmac.new(secret, f"{tenant}\n{job_id}\n{int(expires)}".encode(), hashlib.sha256).digest()
        valid = hmac.compare_digest(want, _unb64(mac))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise HTTPException(401, f"this download link is not valid for job {job_id!r}: {NEW_LINK}")
    if expires < now:
        raise HTTPException(401, f"this download link expired {now - expires:.0f} s ago: {NEW_LINK}")
    return tenant


async def link_secret(request: Request) -> bytes:
    """The links' key: SCDD_LINK_SECRET, else the one in Redis (made by whichever replica asked first)."""
    settings = request.app.state.settings
    if settings.link_secret is not None:
        return settings.link_secret.get_secret_value().encode()
    store = request.app.state.store
    key = f"{store.keys.prefix}:link-secret"
    secret = await store.redis.get(key)
    if secret is None:
        await store.redis.set(key, secrets.token_hex(32), nx=True)
        secret = await store.redis.get(key)
    return secret.encode()
