"""The Prefect server's Redis message broker, without losing events.

imageopt's Prefect servers name this module in ``PREFECT_MESSAGING_BROKER``.
It is prefect-redis's broker with two races taken out; in a 1,800-item run at
600 items a minute each lost a few task-run states, with no error anywhere,
so that their task runs showed Running or Scheduled for good.

- **Publishing.** The API gathers the events of each client connection into
  a batch, which it publishes when full and every
  ``PREFECT_REDIS_MESSAGING_PUBLISHER_PUBLISH_EVERY``. prefect-redis empties
  the batch after a round trip to Redis (to drop duplicates), and an event
  that arrived during that round trip was emptied with it, unpublished. Here
  a batch is taken out of the publisher before anything is awaited, and what
  fails to reach Redis goes back into the next batch.
- **Trimming.** Every consumer of a stream trims it now and then to what all
  of the stream's consumer groups have read. prefect-redis finds the group
  that has read least by comparing stream ids as strings. A stream id is
  ``<milliseconds>-<sequence>``, and ``5-42`` sorts before ``5-7`` as a
  string: a group that had read up to ``5-7`` when another was at ``5-42``
  lost ``5-8`` to ``5-41`` unread. Here ids are compared as numbers, and a
  group's entries that are delivered but not acknowledged are kept too, for
  a consumer that restarts to claim again. Groups whose consumers have all
  been idle for longer than
  ``PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD`` are left out, as
  prefect-redis leaves them out, so that an abandoned group holds nothing up;
  a group that has not read anything yet keeps the whole stream.
"""

from __future__ import annotations

import json
import time

from prefect_redis import messaging as _redis
from prefect_redis.client import get_async_redis_client
from prefect_redis.messaging import (
    RedisMessagingConsumerSettings,
    break_topic,
    ephemeral_subscription,
)
from redis.exceptions import ResponseError

# Prefect checks that a broker module has all four; break_topic serves
# Prefect's own tests.
__all__ = ["Consumer", "Publisher", "break_topic", "ephemeral_subscription"]


class Publisher(_redis.Publisher):
    """prefect-redis's publisher, taking each batch out before publishing it."""

    async def _publish_current_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self.deduplicate_by:
            batch = await self.cache.without_duplicates(self.deduplicate_by, batch)
        for sent, message in enumerate(batch):
            try:
                await self._client.xadd(
                    self.stream,
                    {
                        "data": message.data,
                        "attributes": json.dumps(message.attributes),
                    },
                )
            except Exception:
                unsent = batch[sent:]
                if self.deduplicate_by:
                    await self.cache.forget_duplicates(self.deduplicate_by, unsent)
                self._batch[:0] = unsent
                raise


class Consumer(_redis.Consumer):
    """prefect-redis's consumer, trimming with :func:`trim_stream`."""

    async def _trim_stream_if_necessary(
        self, latest_delivered_id: str | None = None
    ) -> None:
        now = time.monotonic()
        if self._last_trimmed is None:
            self._last_trimmed = now
        if now - self._last_trimmed <= self.trim_every.total_seconds():
            return
        await trim_stream(self.stream, reader_at=latest_delivered_id)
        await _redis._cleanup_empty_consumer_groups(self.stream)
        self._last_trimmed = now


def stream_id(text: str) -> tuple[int, int]:
    """A Redis stream id as numbers, in the order Redis keeps them."""
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


async def trim_stream(stream: str, *, reader_at: str | None = None) -> int:
    """Drop the entries every active consumer of ``stream`` is done with.

    ``reader_at`` is the last id a reader outside any group has taken. An
    active group keeps what it has not read yet and what it has read but not
    acknowledged. Returns the number of entries dropped.
    """
    client = get_async_redis_client()
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError as exc:
        if _redis._is_missing_stream_error(exc):
            return 0
        raise

    idle_ms = RedisMessagingConsumerSettings().trim_idle_threshold.total_seconds()
    idle_ms *= 1000
    floors = []
    if reader_at and reader_at != "0-0":
        floors.append(stream_id(reader_at))
    for group in groups:
        consumers = await client.xinfo_consumers(stream, group["name"])
        if consumers and all(c["idle"] > idle_ms for c in consumers):
            continue
        floors.append(stream_id(group["last-delivered-id"]))
        pending = await client.xpending(stream, group["name"])
        if pending["pending"]:
            floors.append(stream_id(pending["min"]))
    if not floors:
        return 0

    milliseconds, sequence = min(floors)
    if (milliseconds, sequence) == (0, 0):
        return 0
    return await client.xtrim(
        stream, minid=f"{milliseconds}-{sequence}", approximate=False
    )
