"""The Redis data model of the job service: key names, the Lua scripts that change job state
atomically, and how a job record reads back. No I/O here: the job stores run the scripts
(service/blocking_jobstore.py, service/api/async_jobstore.py), service/job_queue.py reads the queue.

Keys (prefix `scdd` by default; one Redis instance, not Redis Cluster: scripts derive keys):
- `<p>:job:<id>`                 hash: the job record (state, stage, progress, times, spec JSON, ...)
- `<p>:job:<id>:events`          stream: the job's events, trimmed to about SCDD_EVENTS_MAXLEN
- `<p>:job:<id>:curves`          hash: `<attempt>/<stage>/<loop>` -> that loop's downsampled metric curve as JSON
                                 (at most SCDD_CURVE_POINTS points, over the whole run: service/curves.py)
- `<p>:tenant:<t>:jobs`          sorted set (score 0): the tenant's job ids; ids sort by creation time
- `<p>:tenant:<t>:state:<s>`     sorted set: the tenant's jobs in state s (listing by state, quotas)
- `<p>:tenant:<t>:bytes`         string: bytes of the tenant's stored job specs, finished jobs included (the storage
                                 bound, with the number of ids in `<p>:tenant:<t>:jobs`)
- `<p>:idem:<t>:<sha256(key)>`   hash {job, body}: Idempotency-Key -> job, expires
- `<p>:rate:<t>`                 hash {tokens, at}: the tenant's submission token bucket, expires
- `<p>:readrate:<t>`             hash {tokens, at}: the tenant's read (GET) token bucket, expires
- `<p>:archive-bytes:<t>`        hash {tokens, at}: the tenant's bucket of zip-download bytes (an hour's worth), expires
- `<p>:queue`                    stream (consumer group `dispatchers`): one message {job} per submission
- `<p>:queue:dead`               stream: dead-lettered messages {job, reason}
- `<p>:slots`                    hash: job id -> `<tenant> <gpus>` of each job holding a run slot (dispatched,
                                 running, or reserved while its submit to Ray is retried): the cluster-wide bounds
- `<p>:tenants`                  set: every tenant that submitted a job (fair share looks at their queued jobs)
- `<p>:served`                   hash: tenant -> when it last got a run slot (round-robin between equals)
- `<p>:counts`                   hash: state -> number of jobs (metrics)
- `<p>:finished`                 sorted set: finished job ids by finish time (retention, `EXPIRE_FINISHED`)
- `<p>:expiring`                 sorted set: job ids to delete at the score's time whatever the retention (jobs
                                 cancelled before they were dispatched: `CANCEL`)
- `<p>:expired`                  sorted set: `<tenant>/<id>` of expired jobs whose artifacts the GC has not
                                 removed yet (service/gc.py), by expiry time
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from api_schema import JobOut

GROUP = "dispatchers"
JOB_ID = re.compile(r"^j-[0-9a-f]{20}$")  # what new_job_id makes


@dataclass(frozen=True)
class Keys:
    prefix: str = "scdd"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def curves(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:curves"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def tenant_state(self, tenant: str, state: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:state:{state}"

    def tenant_bytes(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:bytes"

    def rate(self, tenant: str) -> str:
        return f"{self.prefix}:rate:{tenant}"

    def read_rate(self, tenant: str) -> str:
        return f"{self.prefix}:readrate:{tenant}"

    def archive_bytes(self, tenant: str) -> str:
        return f"{self.prefix}:archive-bytes:{tenant}"

    def idempotency(self, tenant: str, key_hash: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{key_hash}"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:queue:dead"

    @property
    def slots(self) -> str:
        return f"{self.prefix}:slots"

    @property
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    @property
    def served(self) -> str:
        return f"{self.prefix}:served"

    @property
    def counts(self) -> str:
        return f"{self.prefix}:counts"

    @property
    def finished(self) -> str:
        return f"{self.prefix}:finished"

    @property
    def expired(self) -> str:
        return f"{self.prefix}:expired"

    @property
    def expiring(self) -> str:
        return f"{self.prefix}:expiring"


def attempt_of(record: Mapping[str, str]) -> int:
    """The job's attempt: 1, then one more per resume (`RESUME`)."""
    return int(record.get("attempt") or 1)


def submission_id(job_id: str, attempt: int) -> str:
    """The Ray job of one attempt: the job id for the first (as before resumes existed), `<id>-a<n>` after, since
    Ray refuses a second submission with the same id."""
    return job_id if attempt == 1 else f"{job_id}-a{attempt}"


def new_job_id() -> str:
    """`j-` + 12 hex digits of milliseconds + 8 random: unique, and ids sort by creation time."""
    return f"j-{int(time.time() * 1000):012x}{os.urandom(4).hex()}"


# Whether a job in `state` (nil: no record) is live: queued, dispatched or running.
_LIVE = """
local function live(state) return state == 'queued' or state == 'dispatched' or state == 'running' end
"""

# Moves a job to state `to` (keeping the per-tenant state sets, counts and the run slots right)
# and, when given, appends an event to the job's stream in the same step.
_MOVE = """
local function move(prefix, job_key, cur, to, now)
  local id = redis.call('HGET', job_key, 'id')
  local tenant = redis.call('HGET', job_key, 'tenant')
  redis.call('HSET', job_key, 'state', to, 'updated_at', now)
  if cur ~= to then
    redis.call('ZREM', prefix .. ':tenant:' .. tenant .. ':state:' .. cur, id)
    redis.call('ZADD', prefix .. ':tenant:' .. tenant .. ':state:' .. to, 0, id)
    redis.call('HINCRBY', prefix .. ':counts', cur, -1)
    redis.call('HINCRBY', prefix .. ':counts', to, 1)
    if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
      redis.call('HDEL', prefix .. ':slots', id)
      redis.call('HSET', job_key, 'finished_at', now)
      redis.call('ZADD', prefix .. ':finished', now, id)
    end
  end
end
local function event(job_key, maxlen, kind, data)
  if data ~= '' then
    redis.call('XADD', job_key .. ':events', 'MAXLEN', '~', maxlen, '*', 'type', kind, 'data', data)
  end
end
"""

# KEYS: job, idempotency (or any name when unused), queue, tenant jobs, tenant queued, tenant
# dispatched, tenant running, counts, tenants, tenant bytes. ARGV: id, tenant, now, spec JSON, body hash, quota,
# idempotency TTL, '1' when an idempotency key is given, the job's wall-clock limit in seconds after dispatch (0: none),
# jobs the tenant may keep stored, spec bytes the tenant may keep stored.
# Returns {'created'|'existing'|'conflict'|'taken'|'quota'|'stored', job id, active count, or for 'stored'
# 'jobs <n>' / 'bytes <n>': what is stored already}; 'taken': a record with this id exists already (it is never
# overwritten).
CREATE = """
if ARGV[8] == '1' then
  local prior = redis.call('HMGET', KEYS[2], 'job', 'body')
  if prior[1] then
    if prior[2] ~= ARGV[5] then return {'conflict', prior[1]} end
    return {'existing', prior[1]}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken', ARGV[1]} end
local active = redis.call('ZCARD', KEYS[5]) + redis.call('ZCARD', KEYS[6]) + redis.call('ZCARD', KEYS[7])
if active >= tonumber(ARGV[6]) then return {'quota', tostring(active)} end
local kept = redis.call('ZCARD', KEYS[4])
if kept >= tonumber(ARGV[10]) then return {'stored', 'jobs ' .. kept} end
local stored = tonumber(redis.call('GET', KEYS[10]) or '0')
if stored + #ARGV[4] > tonumber(ARGV[11]) then return {'stored', 'bytes ' .. stored} end
redis.call('INCRBY', KEYS[10], #ARGV[4])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'tenant', ARGV[2], 'state', 'queued', 'progress', '0',
  'created_at', ARGV[3], 'updated_at', ARGV[3], 'spec', ARGV[4], 'cancel_requested', '0', 'attempts', '0',
  'timeout_s', ARGV[9])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[1])
redis.call('HINCRBY', KEYS[8], 'queued', 1)
redis.call('SADD', KEYS[9], ARGV[2])
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[2], 'job', ARGV[1], 'body', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return {'created', ARGV[1]}
"""

# KEYS: job. ARGV: prefix, to, allowed states (comma-separated), now, events maxlen, event type,
# event JSON ('' for none), then field/value pairs to set. Returns {1, previous state} when moved,
# {0, current state} when the job is in a state not allowed, {-1, ''} when there is no such job.
TRANSITION = _MOVE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {-1, ''} end
local allowed = false
for state in string.gmatch(ARGV[3], '[^,]+') do
  if state == cur then allowed = true end
end
if not allowed then return {0, cur} end
move(ARGV[1], KEYS[1], cur, ARGV[2], ARGV[4])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
event(KEYS[1], ARGV[5], ARGV[6], ARGV[7])
return {1, cur}
"""

# KEYS: job, expiring. ARGV: prefix, now, events maxlen, job_finished event JSON (for a queued job), seconds a job
# cancelled while queued is kept.
# A queued job is cancelled at once (and deleted ARGV[5] seconds later: `expiring`, whatever the retention); a
# dispatched or running one gets the cancel flag (its driver stops at its next check; the dispatcher stops the Ray
# job after the grace period).
# Returns {'cancelled'|'requested'|'final'|'missing', state}.
CANCEL = _MOVE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
if cur == 'succeeded' or cur == 'failed' or cur == 'cancelled' then return {'final', cur} end
if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'cancel_requested_at', ARGV[2], 'updated_at', ARGV[2])
end
if cur == 'queued' then
  move(ARGV[1], KEYS[1], cur, 'cancelled', ARGV[2])
  redis.call('HSET', KEYS[1], 'error', 'cancelled before it was dispatched')
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[5]), redis.call('HGET', KEYS[1], 'id'))
  event(KEYS[1], ARGV[3], 'job_finished', ARGV[4])
  return {'cancelled', 'cancelled'}
end
return {'requested', cur}
"""

# KEYS: job, tenant queued, tenant dispatched, tenant running, queue, tenant bytes. ARGV: prefix, now, events maxlen,
# the `job_resumed` event JSON (without its attempt), the tenant's active-job quota, the spec JSON to run ('' keeps
# it).
# Puts a failed or cancelled job back in the queue as its next attempt (`attempt` + 1) on the same record and
# output: its end (error, finish time, summary, cancel flag) is cleared, it leaves `finished` (retention), and the
# event history goes on with `job_resumed`. Returns {'queued', attempt} or {'state', current state} when it is not
# failed or cancelled, {'quota', active count}, {'missing', ''}.
RESUME = _MOVE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
if cur ~= 'failed' and cur ~= 'cancelled' then return {'state', cur} end
local active = redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4])
if active >= tonumber(ARGV[5]) then return {'quota', tostring(active)} end
local id = redis.call('HGET', KEYS[1], 'id')
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '1') + 1
move(ARGV[1], KEYS[1], cur, 'queued', ARGV[2])
redis.call('ZREM', ARGV[1] .. ':finished', id)
redis.call('ZREM', ARGV[1] .. ':expiring', id)
redis.call('HDEL', KEYS[1], 'error', 'finished_at', 'dispatched_at', 'started_at', 'summary', 'stage',
  'cancel_requested_at', 'last_error')
redis.call('HSET', KEYS[1], 'attempt', tostring(attempt), 'cancel_requested', '0', 'attempts', '0', 'progress', '0')
if ARGV[6] ~= '' then
  redis.call('INCRBY', KEYS[6], #ARGV[6] - redis.call('HSTRLEN', KEYS[1], 'spec'))
  redis.call('HSET', KEYS[1], 'spec', ARGV[6])
end
local resumed = cjson.decode(ARGV[4])
resumed['attempt'] = attempt
event(KEYS[1], ARGV[3], 'job_resumed', cjson.encode(resumed))
redis.call('XADD', KEYS[5], '*', 'job', id)
return {'queued', tostring(attempt)}
"""

# KEYS: job. ARGV: prefix, now, the attempt the claiming driver belongs to, the driver's token. The Ray entrypoint's
# claim: queued or dispatched -> running, only for the job's current attempt (a driver of an earlier attempt that
# Ray starts late never runs). The same driver claiming again (its first answer was lost in a Redis outage) finds its
# own claim: {1, 'running'}. Returns {1, previous state}, {0, current state}, {-1, ''} (no job) or {-2, current
# attempt}.
CLAIM = _MOVE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {-1, ''} end
local attempt = redis.call('HGET', KEYS[1], 'attempt') or '1'
if attempt ~= ARGV[3] then return {-2, attempt} end
if cur == 'running' and ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'claimed_by') == ARGV[4] then
  return {1, cur}
end
if cur ~= 'queued' and cur ~= 'dispatched' then return {0, cur} end
move(ARGV[1], KEYS[1], cur, 'running', ARGV[2])
redis.call('HSET', KEYS[1], 'started_at', ARGV[2], 'claimed_by', ARGV[4])
return {1, cur}
"""

# Deletes one job from Redis: its record, events, curves, index entries and stored bytes; its `<tenant>/<id>` goes to
# `expired` for the artifact GC. Returns 1, or 0 when there is no such record.
_FORGET = """
local function forget(prefix, id, now)
  local job_key = prefix .. ':job:' .. id
  local fields = redis.call('HMGET', job_key, 'tenant', 'state')
  local tenant, state = fields[1], fields[2]
  redis.call('ZREM', prefix .. ':finished', id)
  redis.call('ZREM', prefix .. ':expiring', id)
  if not tenant then return 0 end
  redis.call('ZREM', prefix .. ':tenant:' .. tenant .. ':jobs', id)
  redis.call('ZREM', prefix .. ':tenant:' .. tenant .. ':state:' .. state, id)
  redis.call('HINCRBY', prefix .. ':counts', state, -1)
  local bytes_key = prefix .. ':tenant:' .. tenant .. ':bytes'
  if redis.call('DECRBY', bytes_key, redis.call('HSTRLEN', job_key, 'spec')) <= 0 then redis.call('DEL', bytes_key) end
  redis.call('DEL', job_key, job_key .. ':events', job_key .. ':curves')
  redis.call('ZADD', prefix .. ':expired', now, tenant .. '/' .. id)
  return 1
end
"""

# Retention. KEYS: finished, expiring. ARGV: prefix, cutoff (finish time; '' when retention is off), now, at most
# this many jobs. Deletes (`forget`) each job finished before the cutoff and each in `expiring` whose time has come.
# Returns the number of jobs deleted.
EXPIRE_FINISHED = _FORGET + """
local gone = 0
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do gone = gone + forget(ARGV[1], id, ARGV[3]) end
if ARGV[2] ~= '' then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
  for _, id in ipairs(ids) do gone = gone + forget(ARGV[1], id, ARGV[3]) end
end
return gone
"""

# A tenant deletes a finished job (DELETE /v1/jobs/{id}). KEYS: job. ARGV: prefix, now, tenant.
# Returns {'deleted', state} | {'active', state} (not finished: cancel it first) | {'missing', ''}.
DELETE = _LIVE + _FORGET + """
local fields = redis.call('HMGET', KEYS[1], 'state', 'tenant', 'id')
if not fields[1] or fields[2] ~= ARGV[3] then return {'missing', ''} end
if live(fields[1]) then return {'active', fields[1]} end
forget(ARGV[1], fields[3], ARGV[2])
return {'deleted', fields[1]}
"""

# A per-tenant token bucket (submissions, reads, bytes of zip downloads). KEYS: the tenant's bucket. ARGV: now (s),
# tokens per second, burst (bucket size), the tokens this request costs. Returns {1, 0} when they were taken, else
# {0, seconds until there are as many (ceil)}; a refused request takes nothing.
TAKE_TOKEN = """
local now, rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= cost then
  tokens = tokens - cost
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
if taken == 1 then return {1, 0} end
return {0, math.ceil((cost - tokens) / rate)}
"""

# Fair share of the run slots. KEYS: slots, tenants, served. ARGV: prefix, job id, tenant, the job's GPUs,
# max jobs at once, max GPUs at once (0: no bound), now.
# A tenant gets a slot only when no other tenant with a job waiting (queued, holding no slot) is owed one
# first: one with fewer slots, or as many but served longer ago. So slots go round-robin between tenants
# with queued jobs (max-min fairness on running jobs), and a tenant with 50 queued jobs cannot starve one
# with 1. The owed tenant's job is held for even when it waits for GPUs (no small job overtakes it).
# KEYS: slots, tenants, served, the job. Only a live job (queued, dispatched or running) gets or keeps a slot: the
# dispatcher reads a job before it reserves, and a cancel in between must not leave a slot to a finished job (a slot
# of a final or missing job is freed here, and by SWEEP_SLOTS).
# Returns {1, 'held'|'reserved'} or {0, 'full'|'gpus'|'owed:<tenant>'|'final'|'missing'}.
RESERVE = _LIVE + """
local state = redis.call('HGET', KEYS[4], 'state')
if not live(state) then
  redis.call('HDEL', KEYS[1], ARGV[2])
  if state then return {0, 'final'} end
  return {0, 'missing'}
end
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return {1, 'held'} end
local taken, gpus, per_tenant = 0, 0, {}
for _, holder in ipairs(redis.call('HVALS', KEYS[1])) do
  local tenant, n = string.match(holder, '^(.*) (%d+)$')
  taken = taken + 1
  gpus = gpus + tonumber(n)
  per_tenant[tenant] = (per_tenant[tenant] or 0) + 1
end
if taken >= tonumber(ARGV[5]) then return {0, 'full'} end
local mine = per_tenant[ARGV[3]] or 0
local my_turn = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
for _, other in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if other ~= ARGV[3] then
    local theirs = per_tenant[other] or 0
    if theirs < mine or (theirs == mine and tonumber(redis.call('HGET', KEYS[3], other) or '0') < my_turn) then
      for _, id in ipairs(redis.call('ZRANGE', ARGV[1] .. ':tenant:' .. other .. ':state:queued', 0, -1)) do
        if redis.call('HEXISTS', KEYS[1], id) == 0 then return {0, 'owed:' .. other} end
      end
    end
  end
end
local max_gpus = tonumber(ARGV[6])
if max_gpus > 0 and gpus + tonumber(ARGV[4]) > max_gpus then return {0, 'gpus'} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[7])
return {1, 'reserved'}
"""

# Frees the run slots of jobs that are final or gone (a slot left by a crash between steps, or by an older
# version's RESERVE). KEYS: slots. ARGV: prefix. Returns the job ids freed.
SWEEP_SLOTS = _LIVE + """
local freed = {}
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not live(redis.call('HGET', ARGV[1] .. ':job:' .. id, 'state')) then
    redis.call('HDEL', KEYS[1], id)
    table.insert(freed, id)
  end
end
return freed
"""

def _number(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def job_out(record: Mapping[str, str]) -> JobOut:
    summary = record.get("summary")
    return JobOut(
        id=record["id"],
        state=record["state"],
        stage=record.get("stage") or None,
        progress=float(record.get("progress") or 0.0),
        created_at=float(record["created_at"]),
        updated_at=float(record["updated_at"]),
        dispatched_at=_number(record.get("dispatched_at")),
        started_at=_number(record.get("started_at")),
        finished_at=_number(record.get("finished_at")),
        cancel_requested=record.get("cancel_requested") == "1",
        attempt=attempt_of(record),
        error=record.get("error") or None,
        summary=json.loads(summary) if summary else None,
        spec=json.loads(record["spec"]),
    )


def finished_event(job_id: str, status: str, error: str | None = None) -> dict[str, Any]:
    """The `job_finished` event the service itself writes when it ends a job (cancel while queued,
    dead letter, a driver that died): the fields every `job_finished` has, as the driver's has them."""
    return {"type": "job_finished", "job_id": job_id, "status": status, "error": error}


def event_json(event: dict[str, Any]) -> str:
    """An event as stored in a job's stream, stamped with the time it is written."""
    return json.dumps({**event, "time": round(time.time(), 3)})
