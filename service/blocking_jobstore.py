"""Job records in Redis as the dispatcher and the Ray job entrypoint use them: the blocking (synchronous)
client. The API uses the asyncio one, service/api/async_jobstore.py; both run the scripts of service/records.py."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service import curves, records
from service.records import Keys


class BlockingJobStore:
    def __init__(self, client: redis.Redis, prefix: str = "scdd", events_maxlen: int = 10000):
        self.redis, self.keys, self.events_maxlen = client, Keys(prefix), events_maxlen
        self._transition = client.register_script(records.TRANSITION)
        self._claim = client.register_script(records.CLAIM)
        self._reserve = client.register_script(records.RESERVE)
        self._sweep_slots = client.register_script(records.SWEEP_SLOTS)
        self._expire = client.register_script(records.EXPIRE_FINISHED)
        self._write_curves = client.register_script(curves.WRITE)

    @classmethod
    def connect(cls, url: str, prefix: str = "scdd", events_maxlen: int = 10000) -> "BlockingJobStore":
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30,
                                      retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
                                      retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        return cls(client, prefix, events_maxlen)

    def get(self, job_id: str) -> Optional[dict[str, str]]:
        return self.redis.hgetall(self.keys.job(job_id)) or None

    def transition(self, job_id: str, to: str, allowed: tuple[str, ...], event: Optional[dict[str, Any]] = None,
                   **fields: Any) -> tuple[bool, str]:
        """Move the job to `to` if it is in one of `allowed`, set `fields` and append `event`, in one step.
        Returns (moved, the state it was in)."""
        flat = [str(part) for pair in fields.items() for part in pair]
        moved, state = self._transition(keys=[self.keys.job(job_id)], args=[
            self.keys.prefix, to, ",".join(allowed), f"{time.time():.3f}", self.events_maxlen,
            (event or {}).get("type", ""), records.event_json(event) if event else "", *flat])
        return moved == 1, state

    def claim(self, job_id: str, attempt: int, token: str = "") -> tuple[int, str]:
        """The driver of `attempt` takes the job: queued/dispatched -> running (records.CLAIM). (1, previous state),
        (0, current state: not claimable), (-1, '') no job, (-2, current attempt) a newer attempt owns it. `token`: the
        driver's own, so that its claim sent again (the answer was lost) finds the job claimed by itself."""
        claimed, value = self._claim(keys=[self.keys.job(job_id)],
                                     args=[self.keys.prefix, f"{time.time():.3f}", str(attempt), token])
        return int(claimed), value

    def finish(self, job_id: str, status: str, allowed: tuple[str, ...], error: Optional[str] = None,
               event: Optional[dict[str, Any]] = None, **fields: Any) -> tuple[bool, str]:
        """End the job as `status` with its `job_finished` event (the driver's own, or the service's),
        unless it has ended already."""
        return self.transition(job_id, status, allowed, event or records.finished_event(job_id, status, error),
                               **({"error": error} if error else {}), **fields)

    def reserve(self, job_id: str, tenant: str, gpus: int, max_running: int, max_gpus: int = 0) -> tuple[bool, str]:
        """Take a run slot for the job (cluster-wide, fair between tenants: records.RESERVE), unless it holds one;
        only while the job is live. (True, 'held' | 'reserved') or (False, 'full' | 'gpus' | 'owed:<tenant>' | 'final' |
        'missing')."""
        taken, why = self._reserve(keys=[self.keys.slots, self.keys.tenants, self.keys.served, self.keys.job(job_id)],
                                   args=[self.keys.prefix, job_id, tenant, gpus, max_running, max_gpus,
                                         f"{time.time():.6f}"])
        return taken == 1, why

    def sweep_slots(self) -> list[str]:
        """Free the run slots of final or missing jobs (records.SWEEP_SLOTS); the job ids freed."""
        return list(self._sweep_slots(keys=[self.keys.slots], args=[self.keys.prefix]))

    def active_count(self) -> int:
        """Jobs holding a run slot (dispatched, running, or being submitted)."""
        return self.redis.hlen(self.keys.slots)

    def append_event(self, job_id: str, event: dict[str, Any], **fields: Any) -> None:
        """One event into the job's stream, and `fields` (stage, progress) into its record."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.events(job_id), {"type": event["type"], "data": json.dumps(event)},
                      maxlen=self.events_maxlen, approximate=True)
            pipe.hset(self.keys.job(job_id), mapping={"updated_at": f"{time.time():.3f}", **fields})
            pipe.execute()

    def curves(self, job_id: str) -> dict[str, str]:
        """The job's stored curves: `<attempt>/<stage>/<loop>` -> curve JSON (service/curves.py)."""
        return self.redis.hgetall(self.keys.curves(job_id))

    def write_curves(self, job_id: str, fields: dict[str, str]) -> bool:
        """Store these curves of the job, unless its record is gone (ended and expired). True when written."""
        if not fields:
            return False
        flat = [part for pair in fields.items() for part in pair]
        return self._write_curves(keys=[self.keys.job(job_id), self.keys.curves(job_id)], args=flat) == 1

    def record_submit_failure(self, job_id: str, error: str) -> None:
        """Count a failed submit to Ray and keep its error (the dispatcher dead-letters after too many)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.job(job_id), "attempts", 1)
            pipe.hset(self.keys.job(job_id), "last_error", error)
            pipe.execute()

    def expire_finished(self, retention_s: Optional[float], batch: int = 200) -> int:
        """Delete up to `batch` jobs that finished more than `retention_s` ago (None: none by age) and up to `batch`
        whose own expiry has come (cancelled while queued): record, events, index entries, stored bytes; their
        artifacts wait in `expired` for the GC (service/gc.py). Returns how many went."""
        now = time.time()
        cutoff = "" if retention_s is None else f"{now - retention_s:.3f}"
        return int(self._expire(keys=[self.keys.finished, self.keys.expiring],
                                args=[self.keys.prefix, cutoff, f"{now:.3f}", batch]))

    def expired_jobs(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(tenant, job id) of expired jobs whose artifacts are still to be removed, oldest first."""
        return [tuple(entry.split("/", 1)) for entry in self.redis.zrange(self.keys.expired, 0, limit - 1)]

    def artifacts_removed(self, tenant: str, job_id: str) -> None:
        self.redis.zrem(self.keys.expired, f"{tenant}/{job_id}")

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.keys.job(job_id), "cancel_requested") == "1"
