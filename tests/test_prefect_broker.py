"""The Prefect server's broker trims streams without dropping unread events.

Against the machine's Redis, on streams of the test's own, with ids set by
hand so that consumer groups stand within one millisecond, where comparing
ids as strings goes wrong.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
import redis
from prefect_redis.messaging import Cache

from imageopt.prefect_broker import Consumer, Publisher, stream_id, trim_stream
from imageopt.services import DEFAULT_REDIS_URL

ENTRIES = 50


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("PREFECT_REDIS_MESSAGING_URL", f"{DEFAULT_REDIS_URL}/0")
    client = redis.Redis.from_url(DEFAULT_REDIS_URL, db=0, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"these tests need Redis at {DEFAULT_REDIS_URL}: start it")
    yield client
    client.close()


@pytest.fixture
def stream(client):
    """A stream of ENTRIES entries, ids 5-1 to 5-50: one millisecond's worth."""
    name = f"imageopt-test-{uuid.uuid4().hex}"
    for sequence in range(1, ENTRIES + 1):
        client.xadd(name, {"n": str(sequence)}, id=f"5-{sequence}")
    yield name
    client.delete(name)


def read(client, stream: str, group: str, count: int, *, ack: int | None = None):
    """Read ``count`` entries as ``group`` (creating it), acknowledging ``ack``."""
    if group not in {g["name"] for g in client.xinfo_groups(stream)}:
        client.xgroup_create(stream, group, id="0")
    [[_, entries]] = client.xreadgroup(group, f"{group}-1", {stream: ">"}, count=count)
    ids = [entry_id for entry_id, _ in entries]
    acknowledged = ids if ack is None else ids[:ack]
    if acknowledged:
        client.xack(stream, group, *acknowledged)
    return ids


def test_stream_ids_compare_as_numbers():
    assert stream_id("5-7") < stream_id("5-42")
    assert stream_id("9-99") < stream_id("10-0")
    assert stream_id("12") == (12, 0)


def test_a_group_within_the_same_millisecond_loses_nothing(client, stream):
    read(client, stream, "slow", 7)
    read(client, stream, "fast", 42)

    dropped = asyncio.run(trim_stream(stream))

    # As strings, 5-42 is the lower, and 5-8 to 5-41 would go unread.
    assert dropped == 6
    assert client.xrange(stream, count=1)[0][0] == "5-7"
    assert read(client, stream, "slow", 100)[0] == "5-8"


def test_delivered_but_unacknowledged_entries_are_kept(client, stream):
    read(client, stream, "recorder", 10, ack=3)
    read(client, stream, "persister", ENTRIES)

    dropped = asyncio.run(trim_stream(stream))

    assert dropped == 3
    pending = client.xpending_range(stream, "recorder", "-", "+", 100)
    assert [p["message_id"] for p in pending] == [f"5-{n}" for n in range(4, 11)]
    claimed = client.xclaim(stream, "recorder", "recorder-2", 0, ["5-4"])
    assert claimed[0][1] == {"n": "4"}


def test_a_reader_outside_groups_holds_the_stream_too(client, stream):
    read(client, stream, "recorder", ENTRIES)

    assert asyncio.run(trim_stream(stream, reader_at="5-20")) == 19
    assert client.xlen(stream) == ENTRIES - 19


def test_a_group_that_has_read_nothing_keeps_the_whole_stream(client, stream):
    read(client, stream, "recorder", ENTRIES)
    client.xgroup_create(stream, "new", id="0")

    assert asyncio.run(trim_stream(stream)) == 0
    assert client.xlen(stream) == ENTRIES


def test_an_abandoned_group_holds_nothing_up(client, stream, monkeypatch):
    monkeypatch.setenv("PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD", "1")
    read(client, stream, "abandoned", 2)
    time.sleep(1.2)
    read(client, stream, "recorder", 30)

    assert asyncio.run(trim_stream(stream)) == 29
    assert client.xrange(stream, count=1)[0][0] == "5-30"


def test_a_missing_stream_is_left_alone(client):
    assert asyncio.run(trim_stream(f"imageopt-test-{uuid.uuid4().hex}")) == 0


def test_the_consumer_trims_with_it(client, stream):
    read(client, stream, "slow", 7)
    read(client, stream, "fast", 42)
    consumer = Consumer(stream, group="slow", trim_every=timedelta(0))

    async def trim_twice() -> None:
        # The first call starts the clock, as prefect-redis's does.
        await consumer._trim_stream_if_necessary()
        await asyncio.sleep(0.01)
        await consumer._trim_stream_if_necessary()

    asyncio.run(trim_twice())

    assert client.xrange(stream, count=1)[0][0] == "5-7"


def test_an_event_arriving_while_a_batch_is_published_is_published_too(client):
    topic = f"imageopt-test-{uuid.uuid4().hex}"

    async def publish() -> None:
        # Its de-duplication marks carry the topic's name too, to be cleaned up.
        cache = Cache(topic)
        publisher = Publisher(topic, cache, deduplicate_by="id", batch_size=100)
        async with publisher:
            await publisher.publish_data(b"first", {"id": "1"})
            # The periodic publish starts, and waits on Redis to drop
            # duplicates; an event comes in meanwhile.
            periodic = asyncio.create_task(publisher._publish_current_batch())
            await asyncio.sleep(0)
            await publisher.publish_data(b"second", {"id": "2"})
            await periodic

    try:
        asyncio.run(publish())
        published = [fields["data"] for _, fields in client.xrange(topic)]
        assert published == ["first", "second"]
    finally:
        client.delete(topic, *client.keys(f"*{topic}*"))
