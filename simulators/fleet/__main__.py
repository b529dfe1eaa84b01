"""python -m simulators.fleet --host 127.0.0.1 --port 8701 --devices 300 --seed 1 [--latency-ms 0] ..."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from simulators.fleet.server import make_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.fleet", description="A deterministic fleet gateway simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701, help="0 picks a free port")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--power-delay-s", type=float, default=5.0)
    parser.add_argument(
        "--all-healthy", action="store_true", help="every device active, paired, with a driver"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--no-effect-fraction", type=float, default=0.0)
    parser.add_argument("--offline-fraction", type=float, default=0.0)
    parser.add_argument("--maintenance-fraction", type=float, default=0.0)
    parser.add_argument("--stale-fraction", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        server = make_server(
            args.host,
            args.port,
            devices_count=args.devices,
            seed=args.seed,
            power_delay_s=args.power_delay_s,
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            no_effect_fraction=args.no_effect_fraction,
            offline_fraction=args.offline_fraction,
            maintenance_fraction=args.maintenance_fraction,
            stale_fraction=args.stale_fraction,
            all_healthy=args.all_healthy,
        )
    except ValueError as exc:
        print(f"fleet simulator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fleet simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever(), which runs on this (the main) thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"fleet simulator listening on http://{host!s}:{port} ({args.devices} devices)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
