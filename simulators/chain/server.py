"""A deterministic CometBFT node stand-in: JSON-RPC over HTTP (GET, URI style) and a WebSocket, one port.

Standard library plus `websockets` (its sans-I/O protocol only, for WebSocket framing). Never imports
Django or the portal.

RPC (GET, query parameters; answers `{"jsonrpc":"2.0","id":-1,"result":{...}}` like a real node):
  /status                      node_info.network/version, sync_info.latest_block_*, earliest_block_height
  /block?height=H              no height = latest; block.data.txs = base64 of the raw tx bytes
  /block_results?height=H      0.34: txs_results + begin_block_events + end_block_events, base64 attributes
                               0.38: txs_results + finalize_block_events, plain attributes, app_hash
  /tx?hash=0xHEX               hash, height, index, tx (base64), tx_result
  /broadcast_tx_sync?tx=0xHEX  {code: 0, codespace: "", data: "", hash, log: ""}; the tx lands 1-3
                               (seeded) blocks later; JSON {"type": "transfer", ...} gets a transfer
                               event, anything else an `app` event; bytes with `"reject": true` get code 4;
                               the same bytes again while pending or on chain: error "tx already
                               exists in cache" (the node's mempool cache), never a second landing
  /decode?data=HEX             {"decoded": {...}}; 503 while decoder_outage; 400 {"error": "undecodable"}
  GET /websocket               subscribe {"method": "subscribe", "id": 1,
                               "params": {"query": "tm.event='NewBlockHeader'"}}
                               (or 'NewBlock'); ack {"result": {}}, then one message per new block
Errors are JSON-RPC errors with HTTP 500 (code -32603 "Internal error", or -32602 for bad params).

Control (never delayed, never failed on purpose, answered while halted; JSON in and out):
  GET|POST /control/state     head, earliest, pruned floor, knobs, shape, halted, counters, open
                               WebSocket subscribers
  POST /control/produce {"blocks": n}      -> 409 {"error": "halted"} while halted
  POST /control/reorg {"depth": d}         replace the last d blocks by another branch (same heights)
  POST /control/halt {"halted": bool}
  POST /control/knobs  any of latency_ms, error_rate, rate_limit, pruned_below, drop_websocket,
                       decoder_outage, catching_up (/status says the node is still syncing) -> the
                       knobs; drop_websocket=true closes every current socket
                       Broadcast faults (all 0 by default; drawn from their own seeded stream only
                       when set): broadcast_reject_rate (CheckTx refuses: code 13, no hash, never
                       lands), broadcast_drop_rate (accepted with a hash, never lands),
                       broadcast_fail_rate (lands with code 11 "out of gas"), broadcast_delay_blocks
                       (0 = the seeded 1-3; n = every broadcast lands exactly n blocks later).
                       Transport faults of broadcast_tx_sync (the client sees a connection closed
                       without an answer): broadcast_lost_rate (the connection drops before the node
                       takes the tx: it never lands), broadcast_hangup_rate (the node takes the tx,
                       which lands as usual, then drops the connection before answering),
                       broadcast_reply_delay_ms (the node takes the tx, then waits this long before
                       answering: a client with a shorter timeout sees a timeout)
  POST /control/shape {"shape": "0.34"|"0.38"}

Determinism: block content is drawn from random.Random(f"{seed}|{height}|{fork salt}") plus the ledger
(token balances, NFT owners) left by the previous block; faults and broadcast delays from their own
seeded streams. Same seed and same sequence of calls => the same chain.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

GENESIS_TIME = datetime(2026, 1, 1, tzinfo=UTC)
SHAPES = ("0.34", "0.38")
VERSIONS = {"0.34": "0.34.29", "0.38": "0.38.12"}
TOKEN_CONTRACTS = tuple(f"tok{i}" + hashlib.sha256(f"token-{i}".encode()).hexdigest()[:38] for i in (1, 2, 3))
NFT_CLASSES = ("sim-punks", "sim-apes")
DENOM = "utok"
SNAPSHOT_DEPTH = 100  # how deep a reorg may go
ACCOUNT_COUNT = 50
MODULE_ACCOUNT = "sim1" + hashlib.sha256(b"mint-module").hexdigest()[:38]


def address(rng: random.Random) -> str:
    return "sim1" + "".join(rng.choice("023456789acdefghjklmnpqrstuvwxyz") for _ in range(38))


def rfc3339(height: int) -> str:
    return (GENESIS_TIME + timedelta(seconds=height)).strftime("%Y-%m-%dT%H:%M:%S") + ".000000000Z"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest().upper()


EventData = tuple[str, list[tuple[str, str]]]


@dataclass
class SimTx:
    raw: bytes
    hash: str
    code: int
    log: str
    codespace: str
    gas_wanted: int
    gas_used: int
    events: list[EventData]
    broadcast: bool = False


@dataclass
class Ledger:
    balances: dict[tuple[str, str], int] = field(default_factory=dict)  # (contract, account) -> amount
    nft_owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (class, token) -> owner
    next_token: int = 1
    # nft_owners' keys kept sorted (tokens are only ever added), so picking one is not a sort per tx:
    # sorting per NFT transfer made long chains (thousands of blocks x 100 txs) quadratic.
    nft_keys: list[tuple[str, str]] = field(default_factory=list)

    def copy(self) -> Ledger:
        return Ledger(dict(self.balances), dict(self.nft_owners), self.next_token, list(self.nft_keys))


@dataclass
class SimBlock:
    height: int
    time: str
    hash: str
    parent_hash: str
    proposer: str
    salt: int
    txs: list[SimTx]
    begin_events: list[EventData]
    end_events: list[EventData]
    app_hash: str
    ledger_after: Ledger | None = None


@dataclass
class Knobs:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit: float = 0.0
    pruned_below: int = 0
    drop_websocket: bool = False
    decoder_outage: bool = False
    catching_up: bool = False
    broadcast_reject_rate: float = 0.0
    broadcast_drop_rate: float = 0.0
    broadcast_fail_rate: float = 0.0
    broadcast_delay_blocks: int = 0
    broadcast_lost_rate: float = 0.0
    broadcast_hangup_rate: float = 0.0
    broadcast_reply_delay_ms: float = 0.0


def validate_knobs(values: Any) -> dict[str, Any]:
    """Check a partial knob update; raise ValueError naming the first bad key."""
    if not isinstance(values, dict):
        raise ValueError("knobs must be a JSON object")
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in Knobs.__dataclass_fields__:
            raise ValueError(f"unknown knob {key!r}")
        if key in ("drop_websocket", "decoder_outage", "catching_up"):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be a boolean")
            checked[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(f"{key} must be a number")
        if value < 0 or value == float("inf"):
            raise ValueError(f"{key} must be a finite non-negative number")
        if key in ("error_rate", "rate_limit") and value > 1:
            raise ValueError(f"{key} must be between 0 and 1")
        if key.startswith("broadcast_") and key.endswith("_rate") and value > 1:
            raise ValueError(f"{key} must be between 0 and 1")
        if key in ("pruned_below", "broadcast_delay_blocks"):
            if int(value) != value:
                raise ValueError(f"{key} must be an integer")
            checked[key] = int(value)
        else:
            checked[key] = float(value)
    return checked


class RpcError(Exception):
    def __init__(self, data: str, *, code: int = -32603, message: str = "Internal error") -> None:
        super().__init__(data)
        self.data, self.code, self.message = data, code, message


class HangUp(Exception):
    """Close the connection without an answer (a broadcast transport fault)."""


TX_IN_CACHE = "tx already exists in cache"


def render_events(events: list[EventData], shape: str) -> list[dict[str, Any]]:
    def enc(text: str) -> str:
        return base64.b64encode(text.encode()).decode() if shape == "0.34" else text

    return [
        {
            "type": kind,
            "attributes": [{"key": enc(k), "value": enc(v), "index": True} for k, v in attributes],
        }
        for kind, attributes in events
    ]


@dataclass
class ChainSimulator:
    """All state of the simulated node; every public method is thread-safe."""

    seed: int = 1
    chain_id: str = "fleetops-sim-1"
    shape: str = "0.38"
    txs_per_block: int = 5
    # Extra Cosmos-SDK-style `message` events per successful tx (benchmarks want ~3 events per tx);
    # derived from the tx itself, no random draws, so 0 (the default) leaves the chain unchanged.
    extra_tx_events: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}")
        if self.txs_per_block < 0:
            raise ValueError("txs_per_block must be non-negative")
        if self.extra_tx_events < 0:
            raise ValueError("extra_tx_events must be non-negative")
        self.lock = threading.RLock()
        # The bodies of /block and /block_results as sent, per block object and shape: a height is
        # rendered once, not once per request (a benchmark reads thousands of heights several times;
        # a real node does not spend the indexer's CPU on it). Emptied by every control request.
        self.rendered: dict[tuple[str, int, str], tuple[SimBlock, bytes]] = {}
        self.rendered_bytes = 0
        self.knobs = Knobs()
        self.halted = False
        self.fork_counter = 0
        self.requests: Counter[str] = Counter()
        self.broadcasts = 0
        self.fault_rng = random.Random(f"{self.seed}|faults")
        self.broadcast_rng = random.Random(f"{self.seed}|broadcast")
        # Broadcast faults draw from their own stream, and only while a fault knob is set, so the
        # default chain (and the delays drawn above) stay exactly what they were without them.
        self.broadcast_fault_rng = random.Random(f"{self.seed}|broadcast-faults")
        self.failing_broadcasts: set[bytes] = set()
        self.broadcast_outcomes: Counter[str] = Counter()
        self.broadcast_counts: Counter[str] = Counter()  # tx hash -> broadcast_tx_sync calls with it
        self.broadcast_log: list[bytes] = []  # every broadcast tx's bytes, in arrival order (tests)
        accounts_rng = random.Random(f"{self.seed}|accounts")
        self.accounts = [address(accounts_rng) for _ in range(ACCOUNT_COUNT)]
        self.validators = [accounts_rng.randbytes(20).hex().upper() for _ in range(4)]
        self.pending: list[tuple[int, bytes]] = []  # (target height, raw tx)
        self.blocks: list[SimBlock] = []
        self.tx_index: dict[str, tuple[int, int]] = {}
        self.ledger = Ledger()
        self.listeners: list[Any] = []  # callables(block) run after each new block, outside the lock
        self._append_block(salt=0)

    # --- chain -------------------------------------------------------------------------------------

    @property
    def head(self) -> int:
        return len(self.blocks)

    @property
    def earliest(self) -> int:
        return max(1, min(self.knobs.pruned_below, self.head))

    def _tx(self, payload: dict[str, Any], events: list[EventData], rng: random.Random) -> SimTx:
        raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        wanted = rng.randint(80_000, 200_000)
        return SimTx(raw, sha256_hex(raw), 0, "", "", wanted, rng.randint(50_000, wanted), events)

    def _random_tx(self, rng: random.Random, height: int, index: int, salt: int) -> SimTx:
        ledger = self.ledger
        nonce = f"{height}-{index}-{salt}"
        failed = rng.random() < 0.05
        holders = [key for key, amount in ledger.balances.items() if amount > 0]
        kinds = ["mint", "nft_mint"]
        if holders:
            kinds += ["transfer", "transfer", "transfer", "burn"]
        if ledger.nft_owners:
            kinds += ["nft_transfer", "nft_transfer"]
        kind = rng.choice(kinds)
        events: list[EventData] = []
        payload: dict[str, Any] = {"type": kind, "nonce": nonce}
        if kind == "mint":
            contract, recipient = rng.choice(TOKEN_CONTRACTS), rng.choice(self.accounts)
            amount = rng.randint(100, 10_000)
            payload.update(contract=contract, recipient=recipient, amount=amount)
            events.append(
                ("mint", [("recipient", recipient), ("amount", f"{amount}{DENOM}"), ("contract", contract)])
            )
            if not failed:
                key = (contract, recipient)
                ledger.balances[key] = ledger.balances.get(key, 0) + amount
        elif kind in ("transfer", "burn"):
            contract, sender = holders[rng.randrange(len(holders))]
            amount = rng.randint(1, ledger.balances[(contract, sender)])
            payload.update(contract=contract, sender=sender, amount=amount)
            if kind == "transfer":
                recipient = rng.choice([a for a in self.accounts if a != sender])
                payload["recipient"] = recipient
                attrs = [("sender", sender), ("recipient", recipient), ("amount", f"{amount}{DENOM}")]
                events.append(("transfer", [*attrs, ("contract", contract)]))
            else:
                events.append(
                    ("burn", [("sender", sender), ("amount", f"{amount}{DENOM}"), ("contract", contract)])
                )
            if not failed:
                ledger.balances[(contract, sender)] -= amount
                if kind == "transfer":
                    key = (contract, payload["recipient"])
                    ledger.balances[key] = ledger.balances.get(key, 0) + amount
        elif kind == "nft_mint":
            class_id, recipient = rng.choice(NFT_CLASSES), rng.choice(self.accounts)
            token_id = str(ledger.next_token)
            payload.update(class_id=class_id, token_id=token_id, recipient=recipient)
            events.append(
                ("nft_mint", [("recipient", recipient), ("class_id", class_id), ("token_id", token_id)])
            )
            if not failed:
                ledger.next_token += 1
                if (class_id, token_id) not in ledger.nft_owners:
                    bisect.insort(ledger.nft_keys, (class_id, token_id))
                ledger.nft_owners[(class_id, token_id)] = recipient
        else:  # nft_transfer
            tokens = ledger.nft_keys
            class_id, token_id = tokens[rng.randrange(len(tokens))]
            sender = ledger.nft_owners[(class_id, token_id)]
            recipient = rng.choice([a for a in self.accounts if a != sender])
            payload.update(class_id=class_id, token_id=token_id, sender=sender, recipient=recipient)
            events.append(
                (
                    "nft_transfer",
                    [
                        ("sender", sender),
                        ("recipient", recipient),
                        ("class_id", class_id),
                        ("token_id", token_id),
                    ],
                )
            )
            if not failed:
                ledger.nft_owners[(class_id, token_id)] = recipient
        if rng.random() < 0.25:
            if rng.random() < 0.02:  # ~2% of payloads are undecodable on purpose
                data = (b"\xff\xfenot-json-" + nonce.encode()).hex()
            else:
                inner = {"op": kind, "memo": f"memo-{rng.randint(0, 9999)}", "nonce": nonce}
                data = json.dumps(inner, sort_keys=True).encode().hex()
            events.append(("payload", [("encoding", "sim-hex"), ("data", data)]))
        for i in range(self.extra_tx_events):
            events.append(("message", [("action", kind), ("module", "sim"), ("msg_index", str(i))]))
        tx = self._tx(payload, events, rng)
        if failed:
            tx.code, tx.codespace, tx.log, tx.events = 5, "sdk", "insufficient funds", []
            tx.gas_used = min(tx.gas_used, tx.gas_wanted // 2)
        return tx

    def _broadcast_tx(self, raw: bytes, rng: random.Random) -> SimTx:
        try:
            decoded = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            decoded = None
        text = raw.decode("utf-8", "replace")
        rejected = isinstance(decoded, dict) and decoded.get("reject") is True
        if isinstance(decoded, dict) and decoded.get("type") == "transfer":
            attrs = [(k, str(decoded.get(k, ""))) for k in ("sender", "recipient", "amount", "contract")]
            events: list[EventData] = [("transfer", attrs)]
        else:
            events = [("app", [("creator", "simulator"), ("key", sha256_hex(raw)[:16])])]
        wanted = rng.randint(80_000, 200_000)
        tx = SimTx(raw, sha256_hex(raw), 0, "", "", wanted, rng.randint(50_000, wanted), events, True)
        if rejected or ('"reject": true' in text or '"reject":true' in text):
            tx.code, tx.codespace, tx.log, tx.events = 4, "sdk", "rejected", []
        elif raw in self.failing_broadcasts:
            tx.code, tx.codespace, tx.log, tx.events = 11, "sdk", "out of gas", []
        return tx

    def _append_block(self, salt: int) -> SimBlock:
        height = self.head + 1
        parent = self.blocks[-1].hash if self.blocks else ""
        rng = random.Random(f"{self.seed}|{height}|{salt}")
        txs: list[SimTx] = []
        if height > 1:
            count = rng.randint(0, 2 * self.txs_per_block)
            txs = [self._random_tx(rng, height, i, salt) for i in range(count)]
        landing = [raw for target, raw in self.pending if target == height]
        self.pending = [(t, r) for t, r in self.pending if t != height]
        txs += [self._broadcast_tx(raw, rng) for raw in landing]
        minted = rng.randint(1_000, 5_000)
        begin: list[EventData] = [
            ("coin_received", [("receiver", MODULE_ACCOUNT), ("amount", f"{minted}{DENOM}")]),
            ("coinbase", [("minter", MODULE_ACCOUNT), ("amount", f"{minted}{DENOM}")]),
        ]
        end: list[EventData] = [
            ("fee_market", [("base_fee", str(rng.randint(1_000, 2_000))), ("mode", "EndBlock")])
        ]
        digest = hashlib.sha256()
        for part in (self.chain_id, str(height), parent, str(salt)):
            digest.update(part.encode() + b"\x00")
        for tx in txs:
            digest.update(tx.raw + b"\x00")
        block_hash = digest.hexdigest().upper()
        block = SimBlock(
            height=height,
            time=rfc3339(height),
            hash=block_hash,
            parent_hash=parent,
            proposer=self.validators[rng.randrange(len(self.validators))],
            salt=salt,
            txs=txs,
            begin_events=begin,
            end_events=end,
            app_hash=sha256_hex(f"app|{block_hash}".encode()),
            ledger_after=self.ledger.copy(),
        )
        self.blocks.append(block)
        for index, tx in enumerate(txs):
            self.tx_index[tx.hash] = (height, index)
        if len(self.blocks) > SNAPSHOT_DEPTH + 1:
            self.blocks[-SNAPSHOT_DEPTH - 2].ledger_after = None
        return block

    def _notify(self, blocks: list[SimBlock]) -> None:
        for block in blocks:
            for listener in list(self.listeners):
                listener(block)

    def produce(self, count: int = 1) -> list[SimBlock]:
        """Append `count` blocks (none while halted) and tell the listeners."""
        with self.lock:
            if self.halted:
                return []
            made = [self._append_block(self.blocks[-1].salt) for _ in range(count)]
        self._notify(made)
        return made

    def reorg(self, depth: int) -> list[SimBlock]:
        """Replace the last `depth` blocks by a branch with a new fork salt (same heights)."""
        with self.lock:
            if depth < 1 or depth > min(SNAPSHOT_DEPTH, self.head - 1):
                raise ValueError(f"depth must be between 1 and {min(SNAPSHOT_DEPTH, self.head - 1)}")
            keep = self.head - depth
            removed = self.blocks[keep:]
            del self.blocks[keep:]
            for block in removed:
                for tx in block.txs:
                    if self.tx_index.get(tx.hash, (0, 0))[0] == block.height:
                        del self.tx_index[tx.hash]
                    if tx.broadcast:
                        self.pending.append((block.height, tx.raw))
            snapshot = self.blocks[-1].ledger_after
            assert snapshot is not None
            self.ledger = snapshot.copy()
            self.fork_counter += 1
            made = [self._append_block(self.fork_counter) for _ in removed]
        self._notify(made)
        return made

    def set_halted(self, halted: bool) -> None:
        with self.lock:
            self.halted = halted

    def set_shape(self, shape: str) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}")
        with self.lock:
            self.shape = shape

    def set_knobs(self, values: Any) -> dict[str, Any]:
        checked = validate_knobs(values)
        with self.lock:
            for key, value in checked.items():
                setattr(self.knobs, key, value)
            return self.knobs_dict()

    def knobs_dict(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.knobs.__dict__)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "chain_id": self.chain_id,
                "seed": self.seed,
                "shape": self.shape,
                "head": self.head,
                "head_hash": self.blocks[-1].hash,
                "earliest": self.earliest,
                "pruned_below": self.knobs.pruned_below,
                "halted": self.halted,
                "knobs": self.knobs_dict(),
                "broadcasts": self.broadcasts,
                "broadcast_outcomes": dict(sorted(self.broadcast_outcomes.items())),
                "pending": len(self.pending),
                "forks": self.fork_counter,
                "requests": dict(sorted(self.requests.items())),
            }

    def fault(self) -> str | None:
        """'rate_limit', 'error' or None for the next RPC request (seeded)."""
        with self.lock:
            roll = self.fault_rng.random()
            if roll < self.knobs.rate_limit:
                return "rate_limit"
            if roll < self.knobs.rate_limit + self.knobs.error_rate:
                return "error"
            return None

    # --- RPC ---------------------------------------------------------------------------------------

    def _block_at(self, params: dict[str, str]) -> SimBlock:
        raw = params.get("height", "").strip().strip('"')
        if raw in ("", "0"):
            return self.blocks[-1]
        try:
            height = int(raw)
        except ValueError:
            raise RpcError(f"invalid height {raw!r}", code=-32602, message="Invalid params")
        if height < 0:
            raise RpcError("height must be greater than or equal to 0", code=-32602, message="Invalid params")
        if height > self.head:
            raise RpcError(
                f"height {height} must be less than or equal to the current blockchain height {self.head}"
            )
        if height < self.earliest:
            raise RpcError(f"height {height} is not available, lowest height is {self.earliest}")
        return self.blocks[height - 1]

    def rpc_status(self, params: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            head, first = self.blocks[-1], self.blocks[self.earliest - 1]
            return {
                "node_info": {
                    "protocol_version": {"p2p": "8", "block": "11", "app": "1"},
                    "id": self.validators[0].lower(),
                    "listen_addr": "tcp://0.0.0.0:26656",
                    "network": self.chain_id,
                    "version": VERSIONS[self.shape],
                    "channels": "40202122233038606100",
                    "moniker": "simulator",
                    "other": {"tx_index": "on", "rpc_address": "tcp://0.0.0.0:26657"},
                },
                "sync_info": {
                    "latest_block_hash": head.hash,
                    "latest_app_hash": head.app_hash,
                    "latest_block_height": str(head.height),
                    "latest_block_time": head.time,
                    "earliest_block_hash": first.hash,
                    "earliest_app_hash": first.app_hash,
                    "earliest_block_height": str(first.height),
                    "earliest_block_time": first.time,
                    "catching_up": self.knobs.catching_up,
                },
                "validator_info": {
                    "address": self.validators[0],
                    "pub_key": {"type": "tendermint/PubKeyEd25519", "value": ""},
                    "voting_power": "10",
                },
            }

    @staticmethod
    def _header(block: SimBlock, chain_id: str) -> dict[str, Any]:
        return {
            "version": {"block": "11"},
            "chain_id": chain_id,
            "height": str(block.height),
            "time": block.time,
            "last_block_id": {"hash": block.parent_hash, "parts": {"total": 1, "hash": block.parent_hash}},
            "app_hash": block.app_hash,
            "proposer_address": block.proposer,
        }

    def render_block(self, block: SimBlock) -> dict[str, Any]:
        return {
            "block_id": {"hash": block.hash, "parts": {"total": 1, "hash": block.hash}},
            "block": {
                "header": self._header(block, self.chain_id),
                "data": {"txs": [base64.b64encode(tx.raw).decode() for tx in block.txs]},
                "evidence": {"evidence": []},
                "last_commit": {
                    "height": str(max(block.height - 1, 0)),
                    "round": 0,
                    "block_id": {"hash": block.parent_hash, "parts": {"total": 1, "hash": block.parent_hash}},
                    "signatures": [],
                },
            },
        }

    def rendered_body(self, method: str, params: dict[str, str]) -> bytes:
        """The whole JSON-RPC answer of `method` (in RENDERED_ONCE), rendered once per block and
        shape while the cache holds less than RENDERED_MAX_BYTES."""
        with self.lock:
            block = self._block_at(params)
            key = (method, block.height, self.shape)
            cached = self.rendered.get(key)
            if cached is not None and cached[0] is block:
                return cached[1]
            result = getattr(self, f"rpc_{method}")(params)
        payload = json.dumps({"jsonrpc": "2.0", "id": -1, "result": result}).encode()
        with self.lock:
            still = block.height <= len(self.blocks) and self.blocks[block.height - 1] is block
            if still and self.rendered_bytes + len(payload) <= RENDERED_MAX_BYTES:
                self.rendered[key] = (block, payload)
                self.rendered_bytes += len(payload)
        return payload

    def forget_rendered(self) -> None:
        with self.lock:
            self.rendered.clear()
            self.rendered_bytes = 0

    def rpc_block(self, params: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            return self.render_block(self._block_at(params))

    def _tx_result(self, tx: SimTx, shape: str) -> dict[str, Any]:
        return {
            "code": tx.code,
            "data": "",
            "log": tx.log,
            "info": "",
            "gas_wanted": str(tx.gas_wanted),
            "gas_used": str(tx.gas_used),
            "events": render_events(tx.events, shape),
            "codespace": tx.codespace,
        }

    def rpc_block_results(self, params: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            block, shape = self._block_at(params), self.shape
            result: dict[str, Any] = {
                "height": str(block.height),
                "txs_results": [self._tx_result(tx, shape) for tx in block.txs] or None,
            }
            if shape == "0.34":
                result["begin_block_events"] = render_events(block.begin_events, shape)
                result["end_block_events"] = render_events(block.end_events, shape)
                result["validator_updates"] = None
                result["consensus_param_updates"] = None
            else:
                result["finalize_block_events"] = render_events(block.begin_events + block.end_events, shape)
                result["validator_updates"] = None
                result["consensus_param_updates"] = None
                result["app_hash"] = base64.b64encode(bytes.fromhex(block.app_hash)).decode()
            return result

    def rpc_tx(self, params: dict[str, str]) -> dict[str, Any]:
        raw = params.get("hash", "").strip().strip('"')
        text = raw[2:] if raw.lower().startswith("0x") else raw
        try:
            key = bytes.fromhex(text).hex().upper()
        except ValueError:
            raise RpcError(f"invalid hash {raw!r}", code=-32602, message="Invalid params")
        with self.lock:
            found = self.tx_index.get(key)
            if found is None or found[0] < self.earliest:
                raise RpcError(f"tx ({key}) not found")
            height, index = found
            tx = self.blocks[height - 1].txs[index]
            return {
                "hash": tx.hash,
                "height": str(height),
                "index": index,
                "tx_result": self._tx_result(tx, self.shape),
                "tx": base64.b64encode(tx.raw).decode(),
            }

    def rpc_broadcast_tx_sync(self, params: dict[str, str]) -> dict[str, Any]:
        raw = params.get("tx", "").strip()
        try:
            if raw.lower().startswith("0x"):
                tx = bytes.fromhex(raw[2:])
            elif len(raw) >= 2 and raw[0] == raw[-1] == '"':
                tx = raw[1:-1].encode()
            else:
                raise ValueError("tx must be 0x-prefixed hex or a quoted string")
        except ValueError as exc:
            raise RpcError(f"invalid tx: {exc}", code=-32602, message="Invalid params")
        if not tx:
            raise RpcError("tx is empty", code=-32602, message="Invalid params")
        with self.lock:
            self.broadcasts += 1
            self.broadcast_counts[sha256_hex(tx)] += 1
            self.broadcast_log.append(tx)
            knobs = self.knobs
            if knobs.broadcast_lost_rate and self.broadcast_fault_rng.random() < knobs.broadcast_lost_rate:
                self.broadcast_outcomes["lost"] += 1
                raise HangUp("lost before the node took it")
            if sha256_hex(tx) in self.tx_index or tx in {raw for _, raw in self.pending}:
                self.broadcast_outcomes["duplicate"] += 1
                raise RpcError(TX_IN_CACHE)
            if (
                knobs.broadcast_reject_rate
                and self.broadcast_fault_rng.random() < knobs.broadcast_reject_rate
            ):
                self.broadcast_outcomes["rejected"] += 1
                return {"code": 13, "codespace": "sdk", "data": "", "hash": "", "log": "insufficient fee"}
            if knobs.broadcast_drop_rate and self.broadcast_fault_rng.random() < knobs.broadcast_drop_rate:
                self.broadcast_outcomes["dropped"] += 1
                return {"code": 0, "codespace": "", "data": "", "hash": sha256_hex(tx), "log": ""}
            if knobs.broadcast_fail_rate and self.broadcast_fault_rng.random() < knobs.broadcast_fail_rate:
                self.broadcast_outcomes["failing"] += 1
                self.failing_broadcasts.add(tx)
            delay = int(knobs.broadcast_delay_blocks) or self.broadcast_rng.randint(1, 3)
            self.pending.append((self.head + delay, tx))
            if (
                knobs.broadcast_hangup_rate
                and self.broadcast_fault_rng.random() < knobs.broadcast_hangup_rate
            ):
                self.broadcast_outcomes["hung_up"] += 1
                raise HangUp("the node took the tx, then dropped the connection")
        return {"code": 0, "codespace": "", "data": "", "hash": sha256_hex(tx), "log": ""}

    def decode(self, data: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if self.knobs.decoder_outage:
                return 503, {"error": "decoder unavailable"}
        try:
            decoded = json.loads(bytes.fromhex(data.strip()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "undecodable"}
        if not isinstance(decoded, dict):
            return 400, {"error": "undecodable"}
        return 200, {"decoded": decoded}

    def new_block_message(self, block: SimBlock, query: str, sub_id: Any) -> dict[str, Any]:
        with self.lock:
            shape = self.shape
            if "NewBlockHeader" in query:
                data: dict[str, Any] = {
                    "type": "tendermint/event/NewBlockHeader",
                    "value": {"header": self._header(block, self.chain_id)},
                }
            else:
                value = self.render_block(block)
                if shape == "0.34":
                    value["result_begin_block"] = {"events": render_events(block.begin_events, shape)}
                    value["result_end_block"] = {"events": render_events(block.end_events, shape)}
                else:
                    events = render_events(block.begin_events + block.end_events, shape)
                    value["result_finalize_block"] = {"events": events}
                data = {"type": "tendermint/event/NewBlock", "value": value}
        return {"jsonrpc": "2.0", "id": sub_id, "result": {"query": query, "data": data}}


RPC_METHODS = ("status", "block", "block_results", "tx", "broadcast_tx_sync")
RENDERED_ONCE = ("block", "block_results")
RENDERED_MAX_BYTES = 2 * 1024**3


# --- WebSocket (websockets' sans-I/O protocol over the HTTP handler's socket) -------------------------


class Subscriber:
    def __init__(self, handler: BaseHTTPRequestHandler, protocol: ServerProtocol) -> None:
        self.handler, self.protocol = handler, protocol
        self.lock = threading.Lock()
        self.subscriptions: list[tuple[Any, str]] = []

    def flush(self) -> None:
        """Write what the protocol has queued (call with the lock held)."""
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.handler.wfile.write(chunk)
            else:  # end of stream
                self.shutdown()
        self.handler.wfile.flush()

    def send_json(self, message: Any) -> bool:
        try:
            with self.lock:
                if self.protocol.state is not State.OPEN:
                    return False
                self.protocol.send_text(json.dumps(message).encode())
                self.flush()
            return True
        except OSError:
            self.shutdown()
            return False

    def close(self) -> None:
        try:
            with self.lock:
                if self.protocol.state is State.OPEN:
                    self.protocol.send_close(1001, "dropped by the simulator")
                    self.flush()
        except OSError:
            pass
        self.shutdown()

    def shutdown(self) -> None:
        try:
            self.handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# --- HTTP --------------------------------------------------------------------------------------------


class ChainRequestHandler(BaseHTTPRequestHandler):
    server: ChainHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "chain-simulator"
    # Like a real node (Go sets TCP_NODELAY on every connection): with Nagle on, a large body after the
    # header write waits on the client's delayed ACK, ~20 ms per /block_results.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet: benchmarks send thousands
        pass

    @property
    def sim(self) -> ChainSimulator:
        return self.server.simulator

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(body).encode(), headers)

    def _send_bytes(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _rpc_error(self, error: RpcError) -> None:
        body = {
            "jsonrpc": "2.0",
            "id": -1,
            "error": {"code": error.code, "message": error.message, "data": error.data},
        }
        self._send(500, body)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        return json.loads(raw)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if path == "/websocket":
            self._websocket()
            return
        if path.startswith("/control/"):
            self._control(path, {})
            return
        if path == "/decode":
            self._count("decode")
            status, body = self.sim.decode(params.get("data", ""))
            self._send(status, body)
            return
        method = path.lstrip("/")
        if method not in RPC_METHODS:
            self._send(
                404,
                {
                    "jsonrpc": "2.0",
                    "id": -1,
                    "error": {"code": -32601, "message": "Method not found", "data": ""},
                },
            )
            return
        self._count(method)
        latency = self.sim.knobs.latency_ms
        if latency:
            time.sleep(latency / 1000)
        fault = self.sim.fault()
        if fault == "rate_limit":
            self._send(429, {"error": "rate limited"}, {"Retry-After": "1"})
            return
        if fault == "error":
            self._rpc_error(RpcError("internal error"))
            return
        try:
            if method in RENDERED_ONCE:
                self._send_bytes(200, self.sim.rendered_body(method, params))
                return
            result = getattr(self.sim, f"rpc_{method}")(params)
        except RpcError as exc:
            self._rpc_error(exc)
            return
        except HangUp:
            self._hang_up()
            return
        if method == "broadcast_tx_sync" and self.sim.knobs.broadcast_reply_delay_ms:
            time.sleep(self.sim.knobs.broadcast_reply_delay_ms / 1000)
        self._send(200, {"jsonrpc": "2.0", "id": -1, "result": result})

    def _hang_up(self) -> None:
        # No status line, no body: the client sees the connection closed under its request.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        try:
            body = self._body()
        except ValueError:
            self._send(400, {"error": "body is not JSON"})
            return
        if not path.startswith("/control/"):
            self._send(404, {"error": "not found"})
            return
        self._control(path, body)

    def _count(self, method: str) -> None:
        with self.sim.lock:
            self.sim.requests[method] += 1

    def _control(self, path: str, body: Any) -> None:
        sim = self.sim
        sim.forget_rendered()  # whatever the request changes, no body rendered before it is sent again
        if not isinstance(body, dict):
            self._send(400, {"error": "body must be a JSON object"})
            return
        try:
            if path == "/control/state":
                pass
            elif path == "/control/produce":
                blocks = body.get("blocks", 1)
                if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= 10_000:
                    raise ValueError("blocks must be an integer between 0 and 10000")
                if sim.halted:
                    self._send(409, {"error": "halted"})
                    return
                sim.produce(blocks)
            elif path == "/control/reorg":
                depth = body.get("depth")
                if isinstance(depth, bool) or not isinstance(depth, int):
                    raise ValueError("depth must be an integer")
                sim.reorg(depth)
            elif path == "/control/halt":
                halted = body.get("halted")
                if not isinstance(halted, bool):
                    raise ValueError("halted must be a boolean")
                sim.set_halted(halted)
            elif path == "/control/knobs":
                sim.set_knobs(body)
                if body.get("drop_websocket") is True:
                    self.server.drop_subscribers()
            elif path == "/control/shape":
                sim.set_shape(str(body.get("shape")))
            else:
                self._send(404, {"error": "not found"})
                return
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
            return
        with self.server.subscribers_lock:
            subscribers = len(self.server.subscribers)
        self._send(200, {**sim.state(), "subscribers": subscribers})

    def _websocket(self) -> None:
        lines = [self.requestline.encode() + b"\r\n"]
        lines += [f"{k}: {v}\r\n".encode() for k, v in self.headers.items()]
        protocol = ServerProtocol()
        protocol.receive_data(b"".join(lines) + b"\r\n")
        request = next((e for e in protocol.events_received() if isinstance(e, Request)), None)
        if request is None:
            self._send(400, {"error": "not a WebSocket request"})
            return
        response = protocol.accept(request)
        protocol.send_response(response)
        subscriber = Subscriber(self, protocol)
        with subscriber.lock:
            subscriber.flush()
        if response.status_code != 101:
            self.close_connection = True
            return
        self._count("websocket")
        self.server.add_subscriber(subscriber)
        try:
            self._websocket_loop(subscriber)
        finally:
            self.server.remove_subscriber(subscriber)
            self.close_connection = True

    def _websocket_loop(self, subscriber: Subscriber) -> None:
        protocol = subscriber.protocol
        while True:
            try:
                data = self.rfile.read1(65536)
            except OSError:
                data = b""
            with subscriber.lock:
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()
                try:
                    subscriber.flush()  # pongs and close replies
                except OSError:
                    return
            for event in events:
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    self._websocket_message(subscriber, bytes(event.data))
            if not data or protocol.state is State.CLOSED:
                return

    def _websocket_message(self, subscriber: Subscriber, data: bytes) -> None:
        try:
            message = json.loads(data)
            method, sub_id = message.get("method"), message.get("id")
            params = message.get("params") or {}
        except (ValueError, AttributeError):
            subscriber.send_json(
                {"jsonrpc": "2.0", "id": -1, "error": {"code": -32700, "message": "Parse error", "data": ""}}
            )
            return
        if method == "subscribe" and isinstance(params, dict):
            query = str(params.get("query") or "")
            if "NewBlock" not in query:
                error = {"code": -32602, "message": "Invalid params", "data": f"unsupported query {query!r}"}
                subscriber.send_json({"jsonrpc": "2.0", "id": sub_id, "error": error})
                return
            with subscriber.lock:
                subscriber.subscriptions.append((sub_id, query))
            subscriber.send_json({"jsonrpc": "2.0", "id": sub_id, "result": {}})
        elif method in ("unsubscribe", "unsubscribe_all"):
            with subscriber.lock:
                subscriber.subscriptions.clear()
            subscriber.send_json({"jsonrpc": "2.0", "id": sub_id, "result": {}})
        else:
            error = {"code": -32601, "message": "Method not found", "data": str(method)}
            subscriber.send_json({"jsonrpc": "2.0", "id": sub_id, "error": error})


class ChainHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], simulator: ChainSimulator, block_interval: float = 0.0
    ) -> None:
        super().__init__(address, ChainRequestHandler)
        self.simulator = simulator
        self.block_interval = block_interval
        self.subscribers: list[Subscriber] = []
        self.subscribers_lock = threading.Lock()
        self.stopping = threading.Event()
        simulator.listeners.append(self.publish)
        self.producer: threading.Thread | None = None
        if block_interval > 0:
            self.producer = threading.Thread(target=self._produce_loop, name="chain-producer", daemon=True)
            self.producer.start()

    def _produce_loop(self) -> None:
        while not self.stopping.wait(self.block_interval):
            self.simulator.produce(1)

    def add_subscriber(self, subscriber: Subscriber) -> None:
        with self.subscribers_lock:
            self.subscribers.append(subscriber)

    def remove_subscriber(self, subscriber: Subscriber) -> None:
        with self.subscribers_lock:
            if subscriber in self.subscribers:
                self.subscribers.remove(subscriber)

    def drop_subscribers(self) -> None:
        with self.subscribers_lock:
            dropped, self.subscribers = self.subscribers, []
        for subscriber in dropped:
            subscriber.close()

    def publish(self, block: SimBlock) -> None:
        with self.subscribers_lock:
            current = list(self.subscribers)
        for subscriber in current:
            with subscriber.lock:
                subscriptions = list(subscriber.subscriptions)
            for sub_id, query in subscriptions:
                subscriber.send_json(self.simulator.new_block_message(block, query, sub_id))

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-answer is not the simulator's problem

    def shutdown(self) -> None:
        self.stopping.set()
        self.drop_subscribers()
        super().shutdown()
        self.server_close()


def make_server(
    host: str = "127.0.0.1", port: int = 0, *, block_interval: float = 0.0, **options: Any
) -> ChainHTTPServer:
    """A server (not yet serving) for ChainSimulator(**options); the simulator is `server.simulator`.

    With block_interval > 0 a daemon thread produces one block every block_interval seconds (not
    while halted); with 0 blocks come only from /control/produce.
    """
    return ChainHTTPServer((host, port), ChainSimulator(**options), block_interval)


def serve_in_thread(
    host: str = "127.0.0.1", port: int = 0, *, block_interval: float = 0.0, **options: Any
) -> tuple[ChainHTTPServer, ChainSimulator, str]:
    """Serve on a free loopback port from a daemon thread: (server, simulator, base_url).

    base_url is "http://host:port"; the WebSocket is ws://host:port/websocket. Stop with
    server.shutdown().
    """
    server = make_server(host, port, block_interval=block_interval, **options)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="chain-simulator", daemon=True
    ).start()
    bound_host, bound_port = server.server_address[:2]
    return server, server.simulator, f"http://{bound_host!s}:{bound_port}"


__all__ = [
    "ChainHTTPServer",
    "ChainSimulator",
    "Knobs",
    "make_server",
    "serve_in_thread",
    "validate_knobs",
]
