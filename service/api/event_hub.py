"""One reader of job events per API process, fanned out to every open event stream.

A stream (`GET /v1/jobs/{id}/events`) no longer blocks in Redis itself: the hub holds one connection and
one blocking `XREAD` over the event streams of every job someone follows, and puts each new entry into
the queue of each subscriber of that job. A subscriber first reads what it missed (after its
Last-Event-ID) with short, non-blocking `XRANGE` pages on the API's shared pool, then takes entries
from its queue, skipping those it has sent. So N open streams cost one Redis connection, not N.

A backlog is read one page (PAGE entries) at a time, and the next page only once the stream has sent the last
(a generator the response pulls from; uvicorn stops pulling while the client's socket is full): a job's 10 000
kept events cost a stream one page of memory, not the whole backlog, so a reconnect storm of 1 000 streams does
not hold 1 000 backlogs at once.

The order of the steps is what makes it lossless: a subscriber registers before it reads, the hub
pushes every entry past a job's cursor to every subscriber registered at that moment, and a
subscriber reads up to the cursor it finds after registering. A subscriber too slow to empty its
queue (QUEUE_SIZE entries behind) is marked lagging and catches up from Redis again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Optional

import redis
import redis.asyncio as aioredis

from service.records import Keys

log = logging.getLogger("scdd.api.events")

Entry = tuple[str, str, str]  # (stream id, event type, event JSON)
QUEUE_SIZE = 1000
PAGE = 200


def stream_id(value: str) -> tuple[int, int]:
    """A Redis stream id as a comparable pair: '1732190000000-3' -> (1732190000000, 3)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


class Subscriber:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.queue: asyncio.Queue[Entry] = asyncio.Queue(QUEUE_SIZE)
        self.lagging = False

    def push(self, entry: Entry) -> None:
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.lagging = True  # it reads what it missed from Redis (EventHub.entries)


class _Followed:
    def __init__(self):
        self.cursor: Optional[str] = None  # the last entry pushed; None until a subscriber has read the backlog
        self.subscribers: set[Subscriber] = set()


class EventHub:
    """`entries(job_id, after)` yields the job's events after `after`, as they come, until the caller stops."""

    def __init__(self, reader: aioredis.Redis, store: aioredis.Redis, keys: Keys, block_ms: int = 1000):
        self.reader, self.store, self.keys, self.block_ms = reader, store, keys, block_ms
        self.jobs: dict[str, _Followed] = {}
        self._someone = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # -- the reader ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scdd-event-hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            following = {self.keys.events(job_id): job_id for job_id, followed in self.jobs.items()
                         if followed.cursor is not None}
            if not following:
                self._someone.clear()
                await self._someone.wait()
                continue
            try:
                answer = await self.reader.xread({key: self.jobs[job_id].cursor for key, job_id in following.items()},
                                                 count=PAGE, block=self.block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("event hub: Redis unreachable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
                continue
            except redis.RedisError as exc:  # e.g. a key of another type: the reader must not die with it
                log.error("event hub: XREAD failed (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
                continue
            for key, entries in answer or []:
                followed = self.jobs.get(following[key])
                if followed is None or followed.cursor is None:  # nobody follows it now, or a new follower reads it
                    continue
                for entry_id, fields in entries:
                    if stream_id(entry_id) <= stream_id(followed.cursor):  # followed anew meanwhile, from later on
                        continue
                    followed.cursor = entry_id
                    for subscriber in followed.subscribers:
                        subscriber.push((entry_id, fields["type"], fields["data"]))

    # -- a subscriber ----------------------------------------------------------------------------
    def _subscribe(self, job_id: str) -> Subscriber:
        subscriber = Subscriber(job_id)
        self.jobs.setdefault(job_id, _Followed()).subscribers.add(subscriber)
        return subscriber

    def _unsubscribe(self, subscriber: Subscriber) -> None:
        followed = self.jobs.get(subscriber.job_id)
        if followed is not None:
            followed.subscribers.discard(subscriber)
            if not followed.subscribers:
                del self.jobs[subscriber.job_id]

    async def _pages(self, job_id: str, after: str, until: str = "+") -> AsyncIterator[list[Entry]]:
        """The job's entries in (after, until], from Redis, one page (at most PAGE entries) at a time: the next page is
        read only when the caller has taken this one, so a stream holds one page whatever its backlog."""
        while True:
            page = await self.store.xrange(self.keys.events(job_id), f"({after}", until, count=PAGE)
            if page:
                yield [(entry_id, fields["type"], fields["data"]) for entry_id, fields in page]
            if len(page) < PAGE:
                return
            after = page[-1][0]

    async def _catch_up(self, subscriber: Subscriber, after: str) -> AsyncIterator[Entry]:
        """What the queue will not bring: the entries after `after` up to the job's cursor (all of them when the
        hub does not read the job yet; the hub then starts from the last of them)."""
        followed = self.jobs[subscriber.job_id]
        if followed.cursor is None:
            start = after
            async for page in self._pages(subscriber.job_id, after):
                for entry in page:
                    yield entry
                after = page[-1][0]
            if followed.cursor is None:
                if after == start:  # nothing new: the hub starts at the stream's end, never past it (whatever id
                    # the client sent, or the entries after it would never be pushed to anyone)
                    last = await self.store.xrevrange(self.keys.events(subscriber.job_id), count=1)
                    after = min(after, last[0][0] if last else "0-0", key=stream_id)
                followed.cursor = followed.cursor or after
                self._someone.set()
        while stream_id(followed.cursor) > stream_id(after):
            until = followed.cursor
            async for page in self._pages(subscriber.job_id, after, until):
                for entry in page:
                    yield entry
            after = until

    async def entries(self, job_id: str, after: str, idle_s: float) -> AsyncIterator[Optional[Entry]]:
        """The job's entries after `after`, in order, each once; None once it has caught up with what Redis held,
        and after each `idle_s` without an entry (the caller's cue to check whether the job has ended, and to send
        a keep-alive)."""
        subscriber = self._subscribe(job_id)
        try:
            sent = stream_id(after)
            async for entry in self._catch_up(subscriber, after):
                if stream_id(entry[0]) > sent:
                    sent = stream_id(entry[0])
                    yield entry
            yield None  # caught up
            while True:
                if subscriber.lagging:  # entries were dropped: read them from Redis again
                    subscriber.lagging = False
                    while not subscriber.queue.empty():
                        subscriber.queue.get_nowait()
                    async for entry in self._catch_up(subscriber, f"{sent[0]}-{sent[1]}"):
                        if stream_id(entry[0]) > sent:
                            sent = stream_id(entry[0])
                            yield entry
                try:
                    entry = await asyncio.wait_for(subscriber.queue.get(), idle_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if stream_id(entry[0]) > sent:
                    sent = stream_id(entry[0])
                    yield entry
        finally:
            self._unsubscribe(subscriber)

    async def has_after(self, job_id: str, after: str) -> bool:
        """Whether Redis holds an entry after `after` (a `job_finished` followed by a resume's entries)."""
        return bool(await self.store.xrange(self.keys.events(job_id), f"({after}", "+", count=1))

    async def rest(self, job_id: str, after: str) -> AsyncIterator[Entry]:
        """Every entry after `after` now in Redis (a finished job's last ones), page by page."""
        async for page in self._pages(job_id, after):
            for entry in page:
                yield entry
