"""`manage.py indexer_demo_seed` against a real chain simulator served from a thread."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from django.core.management import CommandError, call_command

from fleetops.access.models import Organization
from fleetops.audit.models import AuditEvent
from indexer.management.commands.indexer_demo_seed import (
    NO_ORG_MESSAGE,
    NOT_DEBUG_MESSAGE,
    UNREACHABLE_MESSAGE,
)
from indexer.models import Block, Chain, ConnectionStatus, Event, IndexerState, Mode, SyncSource
from simulators.chain.server import ChainSimulator, serve_in_thread

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo_org(db, settings) -> Organization:
    settings.DEBUG = True
    return Organization.objects.create(name="Demo Fleet Co", slug="demo")


def _simulator(chain_id: str = "fleetops-sim-test") -> Iterator[tuple[ChainSimulator, str]]:
    server, simulator, url = serve_in_thread(block_interval=0, seed=1, chain_id=chain_id)
    try:
        yield simulator, url
    finally:
        server.shutdown()


@pytest.fixture
def chain_sim() -> Iterator[tuple[ChainSimulator, str]]:
    yield from _simulator()


def _seed(url: str, *extra: str) -> None:
    ws = url.replace("http://", "ws://") + "/websocket"
    call_command("indexer_demo_seed", "--rpc-url", url, "--ws-url", ws, "--block-time", "1.5", *extra)


def _audit(prefix: str = "indexer.") -> list[str]:
    return list(
        AuditEvent.objects.filter(action__startswith=prefix).order_by("id").values_list("action", flat=True)
    )


def test_seed_creates_the_sim_chain_with_the_simulators_chain_id_and_a_primary_source(demo_org, chain_sim):
    _, url = chain_sim
    _seed(url)

    chain = Chain.objects.get(slug="sim")
    assert chain.org == demo_org
    assert chain.chain_id == "fleetops-sim-test"
    assert chain.expected_block_time_seconds == 1.5
    assert chain.catchup_batch_size == 50
    assert IndexerState.objects.filter(chain=chain).exists()
    source = SyncSource.objects.get(chain=chain)
    assert (source.name, source.rpc_url, source.enabled) == ("primary", url, True)
    assert source.websocket_url == url.replace("http://", "ws://") + "/websocket"
    assert source.connection_status == ConnectionStatus.DISCONNECTED
    assert _audit() == ["indexer.chain_created", "indexer.source_created"]


def test_seeding_twice_changes_nothing_and_audits_nothing_more(demo_org, chain_sim):
    _, url = chain_sim
    _seed(url)
    before = list(Chain.objects.values()), list(SyncSource.objects.values())
    _seed(url)
    assert (list(Chain.objects.values()), list(SyncSource.objects.values())) == before
    assert len(_audit()) == 2


def test_a_backup_source_is_added_with_a_lower_priority(demo_org, chain_sim):
    _, url = chain_sim
    _seed(url, "--backup-rpc-url", url + "/")
    rows = list(SyncSource.objects.order_by("priority").values_list("name", "rpc_url", "websocket_url"))
    assert rows == [("primary", url, url.replace("http://", "ws://") + "/websocket"), ("backup", url, "")]


def test_a_restarted_simulator_makes_the_demo_chain_start_over(demo_org, chain_sim):
    simulator, url = chain_sim
    simulator.produce(12)
    _seed(url)
    call_command("indexer_run", "--chain", "sim", "--ingest-only", "--stop-at", "8")
    chain = Chain.objects.get(slug="sim")
    assert IndexerState.objects.get(chain=chain).last_indexed_height == 8
    assert Block.objects.filter(chain=chain).count() == 8
    IndexerState.objects.filter(chain=chain).update(poison_height=9, poison_attempts=3, mode=Mode.DEGRADED)

    # The next demo run: a new simulator process, back at height 1, on another port.
    for _, new_url in _simulator():
        _seed(new_url)
        state = IndexerState.objects.get(chain=chain)
        assert state.last_indexed_height == 0
        assert (state.mode, state.poison_height, state.poison_attempts) == (Mode.CATCHING_UP, None, 0)
        assert not Block.objects.filter(chain=chain).exists()
        assert not Event.objects.filter(chain=chain).exists()
        assert SyncSource.objects.get(chain=chain, name="primary").rpc_url == new_url
        assert _audit()[-3:] == ["indexer.source_updated", "indexer.rolled_back", "indexer.state_reset"]


def test_a_simulator_that_kept_its_chain_is_not_reset(demo_org, chain_sim):
    simulator, url = chain_sim
    simulator.produce(6)
    _seed(url)
    call_command("indexer_run", "--chain", "sim", "--ingest-only", "--stop-at", "4")
    simulator.produce(3)
    _seed(url)
    assert IndexerState.objects.get(chain__slug="sim").last_indexed_height == 4
    assert "indexer.state_reset" not in _audit()


def test_seed_refuses_without_debug(demo_org, chain_sim, settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match=re.escape(NOT_DEBUG_MESSAGE)):
        _seed(chain_sim[1])


def test_seed_refuses_without_the_demo_organization(db, settings, chain_sim):
    settings.DEBUG = True
    with pytest.raises(CommandError) as raised:
        _seed(chain_sim[1])
    assert str(raised.value) == NO_ORG_MESSAGE.format(slug="demo")


def test_seed_says_so_when_the_simulator_does_not_answer(demo_org):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(CommandError) as raised:
        _seed(url)
    assert str(raised.value).startswith(UNREACHABLE_MESSAGE.split("{error}")[0].format(url=url))
    assert not Chain.objects.exists()
