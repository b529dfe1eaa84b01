"""python -m simulators.chain --port 26657 --seed 1 --chain-id fleetops-sim-1 --block-interval 1.0
--shape 0.38 [--txs-per-block 5] [--extra-tx-events 0] [--broadcast-reject-rate 0.0]"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from simulators.chain.server import SHAPES, make_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.chain", description="A deterministic CometBFT chain simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=26657, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chain-id", default="fleetops-sim-1")
    parser.add_argument(
        "--block-interval",
        type=float,
        default=1.0,
        help="seconds between blocks; 0 = only on POST /control/produce",
    )
    parser.add_argument("--shape", choices=SHAPES, default="0.38")
    parser.add_argument("--txs-per-block", type=int, default=5, help="mean txs per block (0..2x)")
    parser.add_argument(
        "--extra-tx-events", type=int, default=0, help="extra `message` events per successful tx"
    )
    parser.add_argument(
        "--broadcast-reject-rate",
        type=float,
        default=0.0,
        help="share of broadcast_tx_sync calls CheckTx refuses (code 13, no hash); the demo's re-stakes",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.block_interval < 0:
        print("chain simulator: --block-interval must be non-negative", file=sys.stderr)
        return 2
    try:
        server = make_server(
            args.host,
            args.port,
            block_interval=args.block_interval,
            seed=args.seed,
            chain_id=args.chain_id,
            shape=args.shape,
            txs_per_block=args.txs_per_block,
            extra_tx_events=args.extra_tx_events,
        )
    except ValueError as exc:
        print(f"chain simulator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"chain simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs on this (the main) thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.broadcast_reject_rate:
        try:
            server.simulator.set_knobs({"broadcast_reject_rate": args.broadcast_reject_rate})
        except ValueError as exc:
            print(f"chain simulator: --broadcast-reject-rate: {exc}", file=sys.stderr)
            server.server_close()
            return 2
    host, port = server.server_address[:2]
    print(
        f"chain simulator listening on http://{host!s}:{port} (ws://{host!s}:{port}/websocket, "
        f"chain {args.chain_id}, shape {args.shape})",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
