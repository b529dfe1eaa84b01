"""The catch-up's fetch pipeline against the chain simulator on loopback: the next batch is fetched
once and served from what was fetched ahead; a moved start or a failed height drops it."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest

from indexer.readahead import ReadAhead
from indexer.rpc.client import CometRpc, HeightUnavailable, SourceConfig
from simulators.chain.server import serve_in_thread


def control(url: str, what: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(f"{url}/control/{what}", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def ahead() -> Iterator[tuple[ReadAhead, str]]:
    server, _simulator, url = serve_in_thread(seed=3)
    control(url, "produce", {"blocks": 30})
    rpc = CometRpc([SourceConfig("primary", url, 1)], attempts=1, retry_base=0.01)
    pipeline = ReadAhead(rpc)
    try:
        yield pipeline, url
    finally:
        pipeline.close()
        rpc.close()
        server.shutdown()


def results_asked(url: str) -> int:
    return int(control(url, "state")["requests"].get("block_results", 0))


def test_the_next_batch_is_fetched_once_and_served_from_the_read_ahead(ahead):
    pipeline, url = ahead
    first = pipeline.fetch(range(1, 6), max_in_flight=4, ahead=range(6, 11))
    second = pipeline.fetch(range(6, 11), max_in_flight=4)
    assert [b.height for b in first + second] == list(range(1, 11))
    assert all(b.block.parent_hash == a.block.hash for a, b in pairwise(first + second))
    assert results_asked(url) == 10


def test_a_moved_start_drops_what_was_fetched_ahead(ahead):
    pipeline, url = ahead
    pipeline.fetch(range(1, 6), max_in_flight=4, ahead=range(6, 11))
    deadline = time.monotonic() + 30
    while results_asked(url) < 10 and time.monotonic() < deadline:  # 6-10 fetched ahead
        time.sleep(0.01)
    assert results_asked(url) == 10
    control(url, "reorg", {"depth": 27})  # heights 4-30 replaced: what was fetched ahead is stale
    moved = pipeline.fetch(range(3, 8), max_in_flight=4)  # the rollback moved the start back to 3
    now = [pipeline.rpc.block(h).hash for h in range(3, 8)]
    assert [b.height for b in moved] == [3, 4, 5, 6, 7]
    assert [b.block.hash for b in moved] == now


def test_a_height_no_source_has_fails_its_batch_and_drops_the_rest(ahead):
    pipeline, _url = ahead
    with pytest.raises(HeightUnavailable):
        pipeline.fetch(range(28, 33), max_in_flight=4, ahead=range(33, 38))
    assert [b.height for b in pipeline.fetch(range(20, 25), max_in_flight=2)] == [20, 21, 22, 23, 24]


def test_a_single_height_at_the_tip_is_fetched_inline(ahead):
    pipeline, _url = ahead
    assert [b.height for b in pipeline.fetch(range(7, 8), max_in_flight=8)] == [7]
