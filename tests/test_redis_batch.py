"""redis_batch.py: script calls of one loop round go to a real redis-server as one
pipeline, and each caller gets its own reply or error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from spendgate.ledger_factory import redis_client
from spendgate.redis_batch import MAX_BATCH, ScriptBatch
from tests.helpers.redis_server import free_port

ECHO = "return {ARGV[1], redis.call('INCR', 'batch:n')}"
FAIL = "if ARGV[1] == 'bad' then return redis.error_reply('bad one') end return ARGV[1]"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Any]:
    made = redis_client(redis_url)
    yield made
    await made.aclose()


async def connections(client: Any) -> int:
    return int((await client.info("stats"))["total_connections_received"])


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(client: Any) -> None:
    script = client.register_script(ECHO)
    batch = ScriptBatch(client)
    before = await connections(client)  # the pool's one connection is open now
    n = MAX_BATCH + 72  # more than one pipeline's worth
    got = await asyncio.gather(*(batch.run(script, [f"c{i}"]) for i in range(n)))
    assert [g[0] for g in got] == [f"c{i}".encode() for i in range(n)]
    assert sorted(g[1] for g in got) == list(range(1, n + 1))  # each ran exactly once
    # 200 concurrent calls one by one would each check a connection out of the pool
    # and open up to its bound; batched, they all went over the batch's own one.
    assert await connections(client) == before + 1
    await batch.close()


async def test_one_calls_error_stays_with_it(client: Any) -> None:
    from redis.exceptions import ResponseError

    script = client.register_script(FAIL)
    batch = ScriptBatch(client)
    got = await asyncio.gather(
        *(batch.run(script, [a]) for a in ("a", "bad", "c")), return_exceptions=True
    )
    assert got[0] == b"a" and got[2] == b"c"
    assert isinstance(got[1], ResponseError) and "bad one" in str(got[1])


async def test_scripts_flushed_from_redis_are_loaded_again(client: Any) -> None:
    script = client.register_script(ECHO)
    batch = ScriptBatch(client)
    await batch.run(script, ["warm"])
    await client.script_flush()  # as after a Redis restart: EVALSHA says NOSCRIPT
    for size in (1, 5):
        got = await asyncio.gather(*(batch.run(script, [f"x{i}"]) for i in range(size)))
        assert [g[0] for g in got] == [f"x{i}".encode() for i in range(size)]
        await client.script_flush()


@pytest.mark.parametrize("size", [1, 4])
async def test_unreachable_redis_fails_every_caller(size: int) -> None:
    from redis.exceptions import ConnectionError as RConnectionError

    client = redis_client(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    try:
        script = client.register_script(ECHO)
        batch = ScriptBatch(client)
        got = await asyncio.gather(
            *(batch.run(script, [str(i)]) for i in range(size)), return_exceptions=True
        )
        assert len(got) == size
        assert all(isinstance(g, (RConnectionError, ConnectionError, OSError)) for g in got)
    finally:
        await client.aclose()
