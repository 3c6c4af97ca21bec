"""API keys: bearer tokens mapped to tenants, kept only as SHA-256 hashes, compared in constant time.

Keys come from `SCDD_API_KEYS` (`tenant=key,tenant=key`, hashed as they are read) and/or the file
at `SCDD_API_KEYS_FILE` (YAML or JSON, hashes only):

    tenants:
      vision-team:
        keys_sha256: [<64 hex digits>, ...]
        max_active_jobs: 4        # optional; default SCDD_MAX_ACTIVE_JOBS
        limits:                   # optional, each defaults to its SCDD_* setting (service/budget.py)
          max_workers: 2          # workers (and so GPUs) of one job
          max_image_iterations: 1000000   # recover: images x iterations of one job
          max_epochs: 300         # any one training schedule (teacher, SSL, probe, student)
          max_wall_clock_s: 7200  # a job is stopped and failed ("timeout") this long after dispatch
          max_job_memory_gib: 64  # the estimated peak memory of one process of a job (service/budget.py)
          max_jobs_kept: 500      # jobs the tenant keeps stored, finished ones included (SCDD_MAX_JOBS_KEPT)
          max_stored_bytes: 16777216  # bytes of job specs it keeps stored (SCDD_MAX_STORED_BYTES)

`python -m service.auth new TENANT` prints a fresh key and the line to put in that file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import yaml

TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyConfigError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "scdd_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Limits:
    """What one job of a tenant may ask for (service/budget.py checks a spec against them), and what the tenant may
    keep stored (the create script checks those)."""

    max_workers: int
    max_image_iterations: int
    max_epochs: int
    max_wall_clock_s: float
    # The estimated peak memory (GiB) of one process of a job; None: SCDD_MAX_JOB_MEMORY_GIB (the node's memory
    # bounds every job as well).
    max_job_memory_gib: Optional[float] = None
    # Jobs and bytes of job specs the tenant keeps stored, finished ones included; None: SCDD_MAX_JOBS_KEPT,
    # SCDD_MAX_STORED_BYTES.
    max_jobs_kept: Optional[int] = None
    max_stored_bytes: Optional[int] = None


@dataclass(frozen=True)
class Tenant:
    name: str
    max_active_jobs: int
    limits: Limits


class ApiKeys:
    def __init__(self, entries: list[tuple[bytes, Tenant]]):
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, key: str) -> Optional[Tenant]:
        """Compares the key's hash with every stored hash (no early exit), so timing says nothing."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    @classmethod
    def load(cls, pairs: Optional[str], path: Optional[str], default_quota: int,
             default_limits: Optional[Limits] = None) -> "ApiKeys":
        limits = default_limits or UNLIMITED
        entries: list[tuple[bytes, Tenant]] = []
        for pair in filter(None, (part.strip() for part in (pairs or "").split(","))):
            name, sep, key = pair.partition("=")
            if not sep or not key:
                raise KeyConfigError(f"SCDD_API_KEYS: expected tenant=key pairs separated by commas, got {pair.split('=')[0]!r}...")
            entries.append((hashlib.sha256(key.encode()).digest(), Tenant(_tenant_name(name), default_quota, limits)))
        if path:
            entries += _load_file(Path(path), default_quota, limits)
        return cls(entries)


def _tenant_name(name: str) -> str:
    if not TENANT.match(name):
        raise KeyConfigError(f"tenant name {name!r}: use lower-case letters, digits, '-' and '_' (at most 63)")
    return name


UNLIMITED = Limits(max_workers=10**6, max_image_iterations=10**18, max_epochs=10**9, max_wall_clock_s=0)


NUMBER_LIMITS = ("max_wall_clock_s", "max_job_memory_gib")  # the limits that may be fractions; the others are integers


def _limits(path: Path, name: str, given: object, defaults: Limits) -> Limits:
    if given is None:
        return defaults
    if not isinstance(given, dict) or set(given) - set(Limits.__dataclass_fields__):
        raise KeyConfigError(f"API key file {path}: tenants.{name}.limits must be a mapping of "
                             f"{', '.join(Limits.__dataclass_fields__)}")
    for key, value in given.items():
        number = key in NUMBER_LIMITS
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                (not number and (not isinstance(value, int) or value < 1)) or \
                (key == "max_job_memory_gib" and value <= 0) or (key == "max_stored_bytes" and value < 65536):
            raise KeyConfigError(f"API key file {path}: tenants.{name}.limits.{key} must be a positive "
                                 f"{'number' if number else 'integer'}")
    return replace(defaults, **given)


def _load_file(path: Path, default_quota: int, default_limits: Limits) -> list[tuple[bytes, Tenant]]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KeyConfigError(f"API key file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise KeyConfigError(f"API key file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
        raise KeyConfigError(f"API key file {path}: expected a mapping 'tenants: {{name: {{keys_sha256: [...]}}}}'")
    entries = []
    for name, entry in data["tenants"].items():
        hashes = (entry or {}).get("keys_sha256") if isinstance(entry, dict) else None
        if not isinstance(hashes, list) or not all(isinstance(h, str) and HEX64.match(h) for h in hashes):
            raise KeyConfigError(f"API key file {path}: tenants.{name}.keys_sha256 must be a list of SHA-256 hex digests")
        quota = entry.get("max_active_jobs", default_quota)
        if not isinstance(quota, int) or quota < 1:
            raise KeyConfigError(f"API key file {path}: tenants.{name}.max_active_jobs must be a positive integer")
        tenant = Tenant(_tenant_name(str(name)), quota, _limits(path, name, entry.get("limits"), default_limits))
        entries += [(bytes.fromhex(h), tenant) for h in hashes]
    return entries


def write_key_file(path: Path, tenant: str) -> str:
    """A new key for `tenant` in a new key file at `path`; returns the key (shown once)."""
    key = new_key()
    path.write_text(yaml.safe_dump({"tenants": {_tenant_name(tenant): {"keys_sha256": [hash_key(key)]}}}))
    return key


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "new":
        sys.exit("usage: python -m service.auth new TENANT")
    fresh = new_key()
    print(f"key (give it to the tenant; it is not stored): {fresh}")
    print(f"tenants:\n  {_tenant_name(sys.argv[2])}:\n    keys_sha256: [{hash_key(fresh)}]")
