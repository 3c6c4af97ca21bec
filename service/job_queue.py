"""The job queue as the dispatchers consume it (blocking client): a Redis Stream (`<prefix>:queue`, one
message {job} per submission, appended by the API's create script) read through the consumer group
`dispatchers`, and the dead-letter stream `<prefix>:queue:dead`.

A message stays pending until its consumer acknowledges it; `hold` keeps a consumer's messages from
looking idle, `take_over` claims those of a consumer silent for longer than `idle_ms`.
"""

from __future__ import annotations

from typing import Iterator

import redis

from service.records import GROUP, Keys

DEAD_LETTERS_MAXLEN = 100000

Message = tuple[str, str]  # (message id, job id)


class JobQueue:
    def __init__(self, client: redis.Redis, keys: Keys, consumer: str):
        self.redis, self.keys, self.consumer = client, keys, consumer

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            self.redis.xgroup_create(self.keys.queue, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def hold(self, message_ids: list[str]) -> None:
        """Reset the idle time of these messages of this consumer, so that no other takes them over."""
        if message_ids:
            self.redis.xclaim(self.keys.queue, GROUP, self.consumer, 0, message_ids, justid=True)

    def take_over(self, idle_ms: int, count: int = 50) -> Iterator[Message]:
        """Claim, for this consumer, every message idle for at least `idle_ms` (its consumer went silent)."""
        start = "0-0"
        while True:
            start, messages, _deleted = self.redis.xautoclaim(self.keys.queue, GROUP, self.consumer, idle_ms, start,
                                                              count=count)
            for message_id, fields in messages:
                yield message_id, fields.get("job", "")
            if start == "0-0" or not messages:
                return

    def read(self, count: int, block_ms: int) -> list[Message]:
        """Up to `count` messages never delivered before, waiting up to `block_ms` for the first."""
        answer = self.redis.xreadgroup(GROUP, self.consumer, {self.keys.queue: ">"}, count=count, block=block_ms)
        return [(message_id, fields.get("job", ""))
                for _stream, messages in answer or [] for message_id, fields in messages]

    def ack(self, message_id: str) -> None:
        """Acknowledge the message and delete it: XACK alone keeps it in the stream forever."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.queue, GROUP, message_id)
            pipe.xdel(self.keys.queue, message_id)
            pipe.execute()

    def dead_letter(self, message_id: str, job_id: str, reason: str) -> None:
        """Record the message in the dead-letter stream (the caller acknowledges it)."""
        self.redis.xadd(self.keys.dead, {"job": job_id, "message": message_id, "reason": reason,
                                         "dispatcher": self.consumer}, maxlen=DEAD_LETTERS_MAXLEN, approximate=True)
