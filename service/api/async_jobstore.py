"""Job records, the queue and events in Redis, as the API uses them: the asyncio client. The dispatcher and
the Ray job entrypoint use the blocking one, service/blocking_jobstore.py."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Optional

import redis.asyncio as aioredis

from service import records
from service.records import JOB_ID, Keys

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class AsyncJobStore:
    def __init__(self, client: aioredis.Redis, prefix: str, events_maxlen: int, idempotency_ttl_s: int):
        self.redis, self.keys = client, Keys(prefix)
        self.events_maxlen, self.idempotency_ttl_s = events_maxlen, idempotency_ttl_s
        self._create = client.register_script(records.CREATE)
        self._cancel = client.register_script(records.CANCEL)
        self._resume = client.register_script(records.RESUME)
        self._take_token = client.register_script(records.TAKE_TOKEN)
        self._delete = client.register_script(records.DELETE)

    async def create(self, job_id: str, tenant: str, spec: dict[str, Any], quota: int,
                     idempotency_key_hash: Optional[str], body_hash: str, timeout_s: float, max_jobs_kept: int,
                     max_stored_bytes: int) -> tuple[str, str]:
        """('created' | 'existing' | 'conflict' | 'taken', job id), ('quota', active job count) or ('stored',
        'jobs <n>' | 'bytes <n>': the tenant's storage bound is reached); 'taken' leaves the record of that id as it
        was."""
        k = self.keys
        idem = k.idempotency(tenant, idempotency_key_hash) if idempotency_key_hash else k.idempotency(tenant, "-")
        outcome, value = await self._create(
            keys=[k.job(job_id), idem, k.queue, k.tenant_jobs(tenant), *(k.tenant_state(tenant, s) for s in
                  ("queued", "dispatched", "running")), k.counts, k.tenants, k.tenant_bytes(tenant)],
            args=[job_id, tenant, f"{time.time():.3f}", json.dumps(spec, sort_keys=True), body_hash, quota,
                  self.idempotency_ttl_s, "1" if idempotency_key_hash else "0", f"{timeout_s:g}", max_jobs_kept,
                  max_stored_bytes])
        return outcome, value

    async def get(self, job_id: str, tenant: str) -> Optional[dict[str, str]]:
        """The record, or None when there is no such job *of this tenant*."""
        if not JOB_ID.match(job_id):
            return None
        record = await self.redis.hgetall(self.keys.job(job_id))
        return record if record and record.get("tenant") == tenant else None

    async def curves(self, job_id: str) -> dict[str, str]:
        """The job's stored curves: `<attempt>/<stage>/<loop>` -> curve JSON (service/curves.py)."""
        return await self.redis.hgetall(self.keys.curves(job_id))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def state(self, job_id: str) -> Optional[str]:
        return await self.redis.hget(self.keys.job(job_id), "state")

    async def list(self, tenant: str, state: Optional[str], limit: int, cursor: Optional[str]) -> tuple[list[dict], Optional[str]]:
        index = self.keys.tenant_state(tenant, state) if state else self.keys.tenant_jobs(tenant)
        ids = await self.redis.zrevrangebylex(index, f"({cursor}" if cursor else "+", "-", start=0, num=limit + 1)
        page = ids[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in page:
                pipe.hgetall(self.keys.job(job_id))
            found = [record for record in await pipe.execute() if record]
        return found, (page[-1] if len(ids) > limit else None)

    async def cancel(self, job_id: str, queued_kept_s: float) -> tuple[str, str]:
        """records.CANCEL; a job cancelled while queued is deleted `queued_kept_s` later."""
        event = records.event_json(records.finished_event(job_id, "cancelled", "cancelled before it was dispatched"))
        outcome, state = await self._cancel(keys=[self.keys.job(job_id), self.keys.expiring],
                                            args=[self.keys.prefix, f"{time.time():.3f}", self.events_maxlen, event,
                                                  f"{queued_kept_s:g}"])
        return outcome, state

    async def delete(self, job_id: str, tenant: str) -> tuple[str, str]:
        """records.DELETE: ('deleted', state) | ('active', state) | ('missing', '')."""
        outcome, state = await self._delete(keys=[self.keys.job(job_id)],
                                            args=[self.keys.prefix, f"{time.time():.3f}", tenant])
        return outcome, state

    async def resume(self, job_id: str, tenant: str, quota: int, spec: Optional[dict[str, Any]],
                     event: dict[str, Any]) -> tuple[str, str]:
        """Queue a failed or cancelled job again as its next attempt (records.RESUME), with `spec` when it changes.
        ('queued', attempt) | ('state', current state) | ('quota', active count) | ('missing', '')."""
        k = self.keys
        outcome, value = await self._resume(
            keys=[k.job(job_id), *(k.tenant_state(tenant, s) for s in ("queued", "dispatched", "running")), k.queue,
                  k.tenant_bytes(tenant)],
            args=[k.prefix, f"{time.time():.3f}", self.events_maxlen, records.event_json(event), quota,
                  json.dumps(spec, sort_keys=True) if spec is not None else ""])
        return outcome, value

    async def take_tokens(self, bucket: str, per_second: float, burst: float, cost: float = 1) -> tuple[bool, int]:
        """`cost` tokens of the token bucket at key `bucket` (records.TAKE_TOKEN): (True, 0) when taken, else (False,
        seconds to wait)."""
        taken, wait = await self._take_token(keys=[bucket], args=[f"{time.time():.3f}", per_second, burst, cost])
        return taken == 1, int(wait)

    async def take_submit_token(self, tenant: str, per_minute: float, burst: int) -> tuple[bool, int]:
        """(True, 0) when the tenant may submit now, else (False, seconds to wait)."""
        return await self.take_tokens(self.keys.rate(tenant), per_minute / 60, burst)

    async def memory(self) -> tuple[int, int]:
        """(used_memory, maxmemory) of Redis in bytes; maxmemory 0 means no limit."""
        info = await self.redis.info("memory")
        return int(info["used_memory"]), int(info.get("maxmemory", 0))

    async def counts(self) -> dict[str, int]:
        return {state: int(n) for state, n in (await self.redis.hgetall(self.keys.counts)).items()}
